"""Trackers on real toy runs, read back with each tracker's own reader: TensorBoard's EventAccumulator, the
protobuf records of a W&B offline run, MLflow's client on its local store. Also: a resumed run shows every iteration
once in TensorBoard, a tracker that fails becomes an event and training goes on, a missing tracker package is a
config error, and logs that are not a terminal get one compact line per iteration instead of a progress bar."""

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mixgrpo.analysis import load_run
from mixgrpo.cli import main
from mixgrpo.config import ConfigError, load_config

TINY = ["sampler.num_steps=4", "window.size=2", "rollout.prompts_per_iteration=2", "rollout.group_size=2",
        "train.num_videos=0", "learner.micro_batch_size=4", "train.device=cpu", "train.threads=1",
        "train.sample_videos_per_iteration=0"]


def train(run_dir, *overrides, resume=False):
    assert main(["train", *TINY, *overrides, "--run-dir", str(run_dir), *(["--resume"] if resume else [])]) == 0
    return load_run(run_dir)


def tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    steps = [event.step for event in events.Scalars(tag)]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
    return {event.step: event.value for event in events.Scalars(tag)}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    backends = [b for b in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(b)]
    run = train(run_dir, "train.iterations=3", "eval.every=2", "eval.max_prompts=2",
                f"tracking.backends=[{', '.join(backends)}]")
    return run_dir, run, backends


def test_tensorboard_holds_every_metrics_column_per_iteration(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, run, _ = tracked_run
    expected = dict(zip(run.metrics["iteration"], run.metrics["reward/mean"]))
    assert tensorboard_scalars(run_dir, "reward/mean") == pytest.approx(expected, rel=1e-6)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    logged = set(events.Tags()["scalars"])
    columns = {c for c in run.metrics.columns if c != "iteration" and run.metrics[c].notna().any()}
    assert columns <= logged, f"metrics columns missing in TensorBoard: {sorted(columns - logged)}"
    assert {"eval/sheet", "reward_curve"} <= set(events.Tags()["images"])
    # eval/reward/mean is logged at the evaluated iterations only (every 2, and the last)
    assert sorted(tensorboard_scalars(run_dir, "eval/reward/mean")) == [1, 2]


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of a W&B offline run, read from its .wandb file: a LevelDB-style log (7-byte W&B header,
    32 KiB blocks, records of crc32 + length + type) of wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    [path] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, block, payload, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_records_every_iteration(tracked_run):
    run_dir, run, backends = tracked_run
    if "wandb" not in backends:
        pytest.skip("wandb is not installed (pip install 'mixgrpo[wandb]')")
    rows = [r for r in wandb_history(run_dir) if "reward/mean" in r]
    assert {r["_step"]: r["reward/mean"] for r in rows} == pytest.approx(
        dict(zip(run.metrics["iteration"], run.metrics["reward/mean"])), rel=1e-9)
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/videos/eval/*.mp4"))


def test_mlflow_file_store_run_records_every_iteration(tracked_run):
    run_dir, run, backends = tracked_run
    if "mlflow" not in backends:
        pytest.skip("mlflow is not installed (pip install 'mixgrpo[mlflow]')")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    history = {m.step: m.value for m in client.get_metric_history(run_id, "reward/mean")}
    assert history == pytest.approx(dict(zip(run.metrics["iteration"], run.metrics["reward/mean"])), rel=1e-9)
    assert client.get_run(run_id).data.params["train.iterations"] == "3"


def test_a_resumed_run_shows_each_iteration_once_in_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.iterations=3", "train.checkpoint_every=2", "tracking.backends=[tensorboard]")
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "iter_000003")  # as if the run died before its last checkpoint
    run = train(run_dir, resume=True)
    assert tensorboard_scalars(run_dir, "reward/mean") == pytest.approx(
        dict(zip(run.metrics["iteration"], run.metrics["reward/mean"])), rel=1e-6)


def test_a_failing_tracker_is_an_event_and_training_goes_on(tmp_path, monkeypatch):
    import mixgrpo.tracking as tracking

    def broken(self, row, step):
        raise OSError("disk full")

    monkeypatch.setattr(tracking.TensorBoardTracker, "log_scalars", broken)
    with pytest.warns(UserWarning, match="tracker tensorboard failed and is switched off: OSError: disk full"):
        run = train(tmp_path / "run", "train.iterations=2", "tracking.backends=[tensorboard]")
    assert list(run.metrics["iteration"]) == [0, 1]
    failed = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["tracker"]) for e in failed if e["kind"] == "tracker_failed"] == [("tracker_failed",
                                                                                            "tensorboard")]


def test_unknown_or_missing_tracker_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"tracking.backends: unknown \['neptune'\]; choose from"):
        load_config("quickstart", ["tracking.backends=[neptune]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"mlflow is not installed; pip install 'mixgrpo\[mlflow\]'"):
        load_config("quickstart", ["tracking.backends=[mlflow]"])


def test_logs_that_are_not_a_terminal_get_one_compact_line_per_iteration(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mixgrpo", "train", *TINY, "train.iterations=2",
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("it ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert "reward" in lines[0] and "loss" in lines[0] and "kl" in lines[0] and "clip" in lines[0]
    assert lines[0].endswith("s/it")
    assert "mix-grpo:" not in done.stderr  # no progress bar redrawn into the log
