"""`mixgrpo train --resume` as a newcomer types it: the run's own config.yaml (with or without --run-dir), what it
resumed and dropped, and a finished run reported in one line instead of a silent no-op."""

import shutil
import warnings

import pytest

from mixgrpo.cli import main
from mixgrpo.results.analysis import load_run

from clone_runs import copy_into_clone, train_in_clone

TINY = ["sampler.num_steps=4", "window.size=2", "window.shift_interval=1", "rollout.prompts_per_iteration=2",
        "rollout.group_size=2", "train.num_videos=0", "learner.optimizer_steps=1", "learner.micro_batch_size=4",
        "train.device=cpu", "train.threads=1", "train.checkpoint_every=1", "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration quickstart run in the default run directory (runs/quickstart), trained once."""
    return train_in_clone(tmp_path_factory, [*TINY, "train.iterations=2"])


@pytest.fixture
def clone(trained, tmp_path, monkeypatch):
    return copy_into_clone(trained, tmp_path, monkeypatch)


@pytest.mark.parametrize("where", [[], ["--run-dir", "runs/quickstart"]])
def test_resuming_a_finished_run_says_so_and_changes_nothing(clone, capsys, where):
    before = (clone / "runs/quickstart/metrics.parquet").read_bytes()
    events = (clone / "runs/quickstart/events.jsonl").read_text() if (clone / "runs/quickstart/events.jsonl").exists() \
        else ""
    assert main(["train", "--resume", *where]) == 0  # the run's own 2 iterations, not the quickstart's 30
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("run runs/quickstart already finished 2 iterations; raise train.iterations to continue")
    assert (clone / "runs/quickstart/metrics.parquet").read_bytes() == before
    after = (clone / "runs/quickstart/events.jsonl").read_text() if (clone / "runs/quickstart/events.jsonl").exists() \
        else ""
    assert after == events


def test_resume_extends_the_run_with_its_own_config_and_says_from_where(clone, capsys):
    assert main(["train", "--resume", "train.iterations=3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from runs/quickstart/checkpoints/iter_000002 (2 iterations done); no logged iteration was " \
           "dropped" in out
    run = load_run("runs/quickstart")
    assert list(run.metrics["iteration"]) == [0, 1, 2]
    assert run.config["sampler"]["num_steps"] == 4  # the run's config, not the shipped quickstart's


def test_resume_says_which_logged_iterations_after_the_checkpoint_it_dropped(clone, capsys):
    shutil.rmtree("runs/quickstart/checkpoints/iter_000002")  # as if killed between logging and checkpointing
    assert main(["train", "--resume", "--run-dir", "runs/quickstart"]) == 0
    out = capsys.readouterr().out
    assert "resumed from runs/quickstart/checkpoints/iter_000001 (1 iterations done); dropped 1 logged iteration(s) " \
           "after it (1), they are run again" in out
    assert list(load_run("runs/quickstart").metrics["iteration"]) == [0, 1]


def test_resume_with_another_setting_is_refused_naming_it(clone, capsys):
    assert main(["train", "--resume", "sampler.eta=0.5"]) == 2
    assert "sampler.eta: 0.7 -> 0.5" in capsys.readouterr().err


def test_resume_of_a_run_without_checkpoint_says_it_starts_over_without_a_python_warning(tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main(["train", *TINY, "train.iterations=1", "--run-dir", "fresh", "--resume"]) == 0
    assert "--resume: fresh/checkpoints holds no checkpoint yet; starting from iteration 0" in capsys.readouterr().err
