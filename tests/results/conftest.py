"""Fixtures of the results tests (run directories, analysis, report, notebook)."""

import shutil

import pytest
from results_synthetic import write_synthetic_run


@pytest.fixture(scope="session")
def synthetic_run_template(tmp_path_factory):
    # Written once (mp4 encoding is the slow part); tests get their own copy and may damage it.
    return write_synthetic_run(tmp_path_factory.mktemp("template") / "synthetic")


@pytest.fixture
def synthetic_run(tmp_path, synthetic_run_template):
    return shutil.copytree(synthetic_run_template, tmp_path / "synthetic")
