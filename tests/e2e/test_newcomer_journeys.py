"""The README's journeys as a newcomer types them: relative run directories, the notebook on the default run,
`mixgrpo report` on it."""

import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from mixgrpo.cli import main
from mixgrpo.results.analysis import load_run

from clone_runs import copy_into_clone, train_in_clone

REPO = Path(__file__).resolve().parents[2]
TINY = ["sampler.num_steps=4", "window.size=2", "window.shift_interval=1", "rollout.prompts_per_iteration=2",
        "rollout.group_size=2", "train.num_videos=1", "learner.optimizer_steps=1", "learner.micro_batch_size=4",
        "train.device=cpu", "train.threads=1", "train.sample_videos_per_iteration=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-iteration toy run trained with the relative `--run-dir runs/quickstart` (trained once per module)."""
    return train_in_clone(tmp_path_factory, [*TINY, "train.iterations=2", "--run-dir", "runs/quickstart"])


@pytest.fixture
def relative_run(trained, tmp_path, monkeypatch):
    """A copy of the trained run at CLONE/runs/quickstart, with the working directory at CLONE (under tmp_path)."""
    return copy_into_clone(trained, tmp_path, monkeypatch)


def test_a_relative_run_dir_stores_run_relative_video_paths_that_load_run_opens(relative_run):
    run = load_run("runs/quickstart")
    paths = [p for p in run.samples["video_path"] if p]
    assert paths and all(p.startswith("videos/") for p in paths)
    assert all(run.video(p).is_file() and run.video(p).stat().st_size > 0 for p in paths)
    moved = shutil.move("runs/quickstart", "elsewhere")  # the directory can be moved, even from another cwd
    os.chdir("/")
    assert all(load_run(relative_run / moved).video(p).is_file() for p in paths)


def test_report_on_a_relative_run_includes_the_training_sample_sheet(relative_run, capsys):
    assert main(["report", "runs/quickstart"]) == 0
    assert (relative_run / "runs" / "quickstart" / "report" / "quickstart_samples.png").is_file()
    assert "quickstart_samples.png" in capsys.readouterr().out


def test_run_video_finds_videos_of_runs_that_stored_working_directory_paths(relative_run):
    run = load_run("runs/quickstart")
    name = next(p for p in run.samples["video_path"] if p)
    assert run.video(f"runs/quickstart/{name}").is_file()  # what older runs stored


@pytest.mark.slow
def test_the_notebook_executes_on_the_default_run_dir(relative_run, monkeypatch):
    (relative_run / "experiments").mkdir()
    notebook_path = shutil.copy(REPO / "experiments" / "analysis.ipynb", relative_run / "experiments")
    monkeypatch.delenv("MIXGRPO_RUN_DIR", raising=False)
    monkeypatch.delenv("MIXGRPO_COMPARE_RUNS", raising=False)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(notebook_path, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(relative_run / "experiments")}}).execute()
    html = "".join(out["data"].get("text/html", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.outputs if "data" in out)
    assert "data:video/mp4;base64," in html


def using_it_lines():
    """The `mixgrpo ...` lines of README's "Using it" block, as argument lists without the comments."""
    import shlex

    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Using it", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert lines and all(line[0] == "mixgrpo" for line in lines)
    return [line[1:] for line in lines]


def test_the_readme_using_it_lines_run_in_order():
    """Each line parses, each `train` config loads, a fresh `train` never lands in an earlier line's run directory,
    a `--resume` continues one, and a checkpoint named later is one that an earlier run writes and keeps."""
    from mixgrpo.cli import _split_config_and_overrides, build_parser
    from mixgrpo.config import load_config

    runs: dict[Path, int] = {}  # run directory -> iterations trained so far
    for argv in using_it_lines():
        args = build_parser().parse_args(argv)
        if args.command == "train":
            config, overrides = _split_config_and_overrides(args.items)
            run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / load_config(config or "quickstart").name
            if args.resume:
                assert run_dir in runs, f"{argv} resumes {run_dir}, which no earlier line trains"
                cfg = load_config(config or "quickstart", overrides)  # the run's config plus train.iterations
                assert cfg.train.iterations > runs[run_dir], f"{argv} would resume a finished run"
            else:
                assert run_dir not in runs, f"{argv} trains into {run_dir}, which an earlier line already filled"
                cfg = load_config(config or "quickstart", overrides)
            runs[run_dir] = cfg.train.iterations
        for path in [getattr(args, "checkpoint", None), *getattr(args, "runs", [])]:
            if path and "checkpoints" in path:
                run_dir, name = Path(path).parent.parent, Path(path).name
                assert run_dir in runs and name == f"iter_{runs[run_dir]:06d}", f"{path}: no earlier line writes it"
            elif path:
                assert Path(path) in runs, f"{argv} reads {path}, which no earlier line trains"
        if args.command == "export":
            assert Path(args.source) in runs, f"{argv} exports {args.source}, which no earlier line trains"


def test_the_run_ends_with_what_it_did_and_report_prints_it_again(relative_run, capsys):
    import json

    summary = json.loads(Path("runs/quickstart/summary.json").read_text())
    assert set(summary["attributes"]) == {"colour", "shape", "direction"}
    for attribute in summary["attributes"].values():
        assert 0 <= attribute["right_before"] <= 1 and 0 <= attribute["right_after"] <= 1
    assert summary["eval_iterations"] == [-1, 1] and summary["eval_reward"]["after"] is not None
    assert set(summary["files"]) == {"start sheet", "end sheet", "reward curve"}
    assert main(["report", "runs/quickstart"]) == 0
    out = capsys.readouterr().out
    assert "held-out samples drawn right (component > 0.5), the base -> after 2 iterations:" in out
    assert "colour" in out and "end sheet: runs/quickstart/videos/end_sheet.png" in out


def test_summary_lines_without_an_evaluation_say_only_what_there_is(tmp_path):
    from mixgrpo.results.summary import summary_lines, write_summary

    assert write_summary(tmp_path) == [] and summary_lines({"attributes": {}, "eval_reward": None,
                                                            "train_reward": {"first": 0.1, "last": 0.2},
                                                            "files": {}}) == \
        ["training reward, first -> last iteration: 0.100 -> 0.200"]
