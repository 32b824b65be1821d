"""RunLog: schemas, incremental atomic writes readable mid-run, resume truncation, input validation."""

import datetime as dt
import enum
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mixgrpo.results.analysis import load_run
from mixgrpo.results.runlog import RunLog, slugify

HERE = Path(__file__).parent


def sample_rows(iteration, log=None, prompts=("a red ball", "a blue cube"), group_size=2):
    rows = []
    for g, prompt in enumerate(prompts):
        for s in range(group_size):
            video = log.video_path(iteration, prompt, s) if log else ""
            rows.append(
                {"iteration": iteration, "prompt": prompt, "group": g, "seed": 100 + g, "sample": s,
                 "reward": 0.5 + iteration, "reward/toy": float(s), "advantage": s - 0.5, "video_path": video}
            )
    return rows


def test_schema_dtypes_and_late_keys(tmp_path):
    log = RunLog(tmp_path)
    log.log_metrics({"iteration": 0, "reward/mean": 1, "nfe": 12})
    log.log_metrics({"iteration": 1, "reward/mean": 0.5, "nfe": 12, "kl": 0.25})
    log.log_samples(sample_rows(0, log))
    rows = sample_rows(1)
    rows[0]["note"] = "first with a note"
    log.log_samples(rows)

    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    assert list(metrics.columns) == ["iteration", "reward/mean", "nfe", "kl"]
    assert metrics["iteration"].dtype == "int64"
    assert all(metrics[c].dtype == "float64" for c in ["reward/mean", "nfe", "kl"])
    assert metrics["kl"].isna().tolist() == [True, False]

    samples = pd.read_parquet(tmp_path / "samples.parquet")
    for col in ["iteration", "group", "seed", "sample"]:
        assert samples[col].dtype == "int64", col
    for col in ["reward", "reward/toy", "advantage"]:
        assert samples[col].dtype == "float64", col
    for col in ["prompt", "video_path", "note"]:
        assert pd.api.types.is_string_dtype(samples[col]), col
    assert len(samples) == 8
    # Videos are stored relative to the run dir, under videos/; rows logged without one read "".
    assert samples["video_path"].iloc[0].startswith("videos/it000000_a-red-ball-")
    assert (samples["video_path"].iloc[4:] == "").all()
    assert samples["note"].tolist()[4:6] == ["first with a note", ""]


def test_empty_run_has_schema_and_dirs(tmp_path):
    RunLog(tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "videos").is_dir() and (run / "checkpoints").is_dir()
    samples = pd.read_parquet(run / "samples.parquet")
    assert len(samples) == 0 and {"iteration", "prompt", "reward", "advantage", "video_path"} <= set(samples.columns)
    assert samples["iteration"].dtype == "int64"
    assert list(pd.read_parquet(run / "metrics.parquet").columns) == ["iteration"]


class Kind(enum.Enum):
    SDE = "sde"


def test_write_config_roundtrip_and_atomic(tmp_path):
    log = RunLog(tmp_path)
    log.write_config({"train": {"lr": 1e-4, "window": (0, 4), "kind": Kind.SDE}, "out": tmp_path / "x"})
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {
        "train": {"lr": 1e-4, "window": [0, 4], "kind": "sde"}, "out": str(tmp_path / "x")}
    with pytest.raises(ValueError, match=r"config\.train\.fn has type function"):
        log.write_config({"train": {"fn": lambda x: x}})
    # The failed write kept the previous config and left no temporary file behind.
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["kind"] == "sde"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        ".lock", ".mixgrpo-run", "config.sha256", "config.yaml", "metrics.parquet", "samples.parquet"]


def test_concurrent_reader_never_sees_partial_files(tmp_path):
    run = tmp_path / "run"
    iterations = 40
    writer = subprocess.Popen([sys.executable, str(HERE / "runlog_writer.py"), str(run), str(iterations)])
    counts = []
    try:
        deadline = time.monotonic() + 30
        while not (run / "config.yaml").exists():  # the writer's last file before its first iteration
            assert writer.poll() is None and time.monotonic() < deadline, "writer died before its first write"
            time.sleep(0.01)
        while writer.poll() is None:
            loaded = load_run(run)
            assert loaded.metrics["iteration"].tolist() == list(range(len(loaded.metrics)))
            assert loaded.metrics["iteration"].dtype == "int64" and loaded.samples["reward"].dtype == "float64"
            counts.append((len(loaded.metrics), len(loaded.samples)))
    finally:
        writer.wait(timeout=30)
    assert writer.returncode == 0
    for column in zip(*counts):  # metrics rows, sample rows: each never goes backwards
        assert list(column) == sorted(column), "row counts went backwards"
    # The reads overlapped the writing: several different intermediate states were observed.
    assert len({c for c in counts if 0 < c[0] < iterations}) >= 3
    final = load_run(run)
    assert (len(final.metrics), len(final.samples)) == (iterations, 4 * iterations)


def test_resume_truncates_rows_and_videos(tmp_path):
    log = RunLog(tmp_path)
    for it in range(5):
        rows = sample_rows(it, log)
        for row in rows:
            Path(row["video_path"]).write_bytes(b"mp4")
        log.log_samples(rows)
        log.log_metrics({"iteration": it, "loss": float(it)})
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.log_metrics({"iteration": 5})
    with pytest.raises(ValueError, match="continue it with --resume"):
        RunLog(tmp_path)

    resumed = RunLog(tmp_path, resume=True)
    assert resumed.last_iteration == 4
    with pytest.raises(ValueError, match="truncate_after"):
        resumed.log_metrics({"iteration": 3, "loss": 0.0})
    resumed.truncate_after(2)
    assert pd.read_parquet(tmp_path / "metrics.parquet")["iteration"].tolist() == [0, 1, 2]
    assert sorted(set(pd.read_parquet(tmp_path / "samples.parquet")["iteration"])) == [0, 1, 2]
    videos = sorted(p.name[:8] for p in (tmp_path / "videos").iterdir())
    assert set(videos) == {"it000000", "it000001", "it000002"} and len(videos) == 12

    resumed.log_metrics({"iteration": 3, "loss": -1.0})
    resumed.log_samples(sample_rows(3))
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    assert metrics["iteration"].tolist() == [0, 1, 2, 3] and metrics["loss"].tolist() == [0, 1, 2, -1]
    assert pd.read_parquet(tmp_path / "samples.parquet").groupby("iteration").size().tolist() == [4, 4, 4, 4]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "truncate" and events[-1]["dropped_metric_rows"] == 2


def test_event_has_utc_time(tmp_path):
    log = RunLog(tmp_path)
    log.event("fault", worker=3, error="OOM")
    (record,) = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert record["kind"] == "fault" and record["worker"] == 3
    when = dt.datetime.fromisoformat(record["time"])
    assert when.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 60


def test_video_path_names(tmp_path):
    log = RunLog(tmp_path)
    a = log.video_path(12, "A cat / on a 'mat'!", 3)
    assert a.parent == tmp_path / "videos" and a.name.startswith("it000012_a-cat-on-a-mat-") and a.name.endswith(
        "_03.mp4")
    # Prompts that share a long prefix still get different files.
    long = "x" * 80
    assert log.video_path(0, long + "1", 0) != log.video_path(0, long + "2", 0)
    assert slugify("!!!").startswith("prompt-")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda log: log.log_metrics({"reward/mean": 1.0}), "needs an 'iteration'"),
        (lambda log: log.log_metrics({"iteration": 1.5}), "must be an int"),
        (lambda log: log.log_metrics({"iteration": 0, "phase": "rollout"}), "RunLog.event"),
        (lambda log: log.log_metrics({"iteration": 0, "loss": [1, 2]}), "is not a number"),
        (lambda log: log.log_samples([{"iteration": 0, "prompt": "p"}]), r"lacks required keys \['group'"),
        (lambda log: log.log_samples([{**sample_rows(0)[0], "prompt": 3}]), "holds a string"),
        (lambda log: log.event(""), "non-empty string"),
    ],
)
def test_bad_input_names_the_field(tmp_path, call, match):
    log = RunLog(tmp_path)
    with pytest.raises(ValueError, match=match):
        call(log)
    assert len(pd.read_parquet(tmp_path / "samples.parquet")) == 0
