"""A toy run trained from inside a fresh folder, as a newcomer's clone would, and copies of it per test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mixgrpo.cli import main


def train_in_clone(tmp_path_factory, args: list[str]) -> Path:
    """Run ``mixgrpo train ARGS`` with the working directory at a new CLONE folder; return CLONE/runs/quickstart.

    The clone sits one level down in its temporary folder: tests elsewhere check that no test folder gained a
    runs/ by mistake."""
    root = tmp_path_factory.mktemp("trained") / "clone"
    root.mkdir()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", *args]) == 0
    finally:
        os.chdir(cwd)
    return root / "runs" / "quickstart"


def copy_into_clone(run: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of ``run`` at TMP/clone/runs/quickstart with the working directory at TMP/clone; returns TMP/clone."""
    shutil.copytree(run, tmp_path / "clone" / "runs" / "quickstart")
    monkeypatch.chdir(tmp_path / "clone")
    return tmp_path / "clone"
