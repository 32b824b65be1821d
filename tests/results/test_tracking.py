"""Trackers on real toy runs, read back with each tracker's own reader: TensorBoard's EventAccumulator, the
protobuf records of a W&B offline run, MLflow's client on its local store. Also: what each tracker holds after a
resume (TensorBoard: every iteration once), evaluation videos as GIFs in TensorBoard, metric names MLflow would
reject, a tracker that fails becomes an event and training goes on, and a missing tracker package is a config
error. The console line through the real `mixgrpo train` command: tests/e2e/test_tracking_e2e.py."""

import importlib.util
import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from mixgrpo.results.analysis import load_run
from mixgrpo.cli import main
from mixgrpo.config import ConfigError, load_config
from mixgrpo.results.tracking import GIF_MAX_FRAMES, build_trackers, mlflow_metric_name

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
    run = train(run_dir, "train.iterations=3", "eval.every=2", "eval.max_prompts=2", "tracking.run_name=toy-tracked",
                f"tracking.backends=[{', '.join(backends)}]")
    return run_dir, run, backends


def tensorboard_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


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


def test_tensorboard_shows_evaluation_videos_as_captioned_gifs(tracked_run):
    from PIL import Image

    from mixgrpo.results.media import read_mp4

    run_dir, _, _ = tracked_run
    events = tensorboard_events(run_dir)
    video_tags = sorted(t for t in events.Tags()["images"] if t.startswith("eval/video_"))
    assert len(video_tags) == 2 and video_tags[0] == "eval/video_00"  # eval.max_prompts=2, the first seed of each
    [mp4] = sorted((run_dir / "videos").glob("eval_iter000002_00_*.mp4"))
    frames = read_mp4(mp4)
    # each evaluation: after iteration 1 (eval.every=2) and at the end; the base model's under its own tags
    assert [image.step for image in events.Images("eval/video_00")] == [1, 2]
    assert [image.step for image in events.Images("eval_base/video_00")] == [0]
    image = events.Images("eval/video_00")[0]
    gif = Image.open(io.BytesIO(image.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == min(len(frames), GIF_MAX_FRAMES) > 1
    assert (gif.height, gif.width) == (image.height, image.width)
    # the first frame is the mp4's first frame, at its size (toy videos are under GIF_MAX_SIDE); the GIF's
    # 256-colour palette allows a small error
    first = np.asarray(gif.convert("RGB"), dtype=np.float32) / 255.0
    assert first.shape == frames[0].shape and np.abs(first - frames[0]).mean() < 0.05
    caption = events.Tensors("eval/video_00/caption/text_summary")[0]
    assert "(" in caption.tensor_proto.string_val[0].decode()  # "<prompt> (<reward>)"


def test_a_long_large_video_becomes_a_small_gif_of_the_same_duration(tmp_path):
    from PIL import Image

    from mixgrpo.results.media import write_mp4
    from mixgrpo.results.tracking import GIF_MAX_SIDE, animated_gif

    ramp = np.linspace(0.0, 1.0, 60, dtype=np.float32)[:, None, None, None]
    path = write_mp4(tmp_path / "long.mp4", np.broadcast_to(ramp, (60, 200, 400, 3)).copy(), fps=12, layout="THWC")
    data, height, width = animated_gif(path)
    gif = Image.open(io.BytesIO(data))
    assert (width, height) == (GIF_MAX_SIDE, GIF_MAX_SIDE // 2) == gif.size
    assert gif.n_frames == GIF_MAX_FRAMES
    durations = []
    for index in range(gif.n_frames):
        gif.seek(index)
        durations.append(gif.info["duration"])
    # 60 frames at 12 fps last 5 s; GIF stores frame times in hundredths of a second (<= 5 ms off per frame)
    assert abs(sum(durations) - 5000) <= 5 * GIF_MAX_FRAMES


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
        pytest.skip("mlflow is not installed (pip install 'mixgrpo[trackers]')")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    history = {m.step: m.value for m in client.get_metric_history(run_id, "reward/mean")}
    assert history == pytest.approx(dict(zip(run.metrics["iteration"], run.metrics["reward/mean"])), rel=1e-9)
    assert client.get_run(run_id).data.params["train.iterations"] == "3"
    assert client.get_run(run_id).info.run_name == "toy-tracked"  # tracking.run_name
    assert set(client.get_run(run_id).data.metrics) >= {c for c in run.metrics.columns
                                                       if c != "iteration" and run.metrics[c].notna().any()}


def test_metric_names_mlflow_would_reject_are_mapped_and_logged(tracked_run, tmp_path):
    """Reward names come from plugins and may hold characters MLflow rejects; the mapping is checked by MLflow's own
    validator and by logging a real metrics row with such names to a real file store."""
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed (pip install 'mixgrpo[trackers]')")
    import mlflow
    from mlflow.utils.validation import _validate_metric_name

    odd = ["reward/clip@336/mean", "reward/clip#336/mean", "reward/a:b/mean", "a//b", "/lead", "x/../y", "", "x" * 300]
    for name in odd:
        _validate_metric_name(mlflow_metric_name(name))  # raises MlflowException on an invalid name
    mapped = [mlflow_metric_name(n) for n in odd]
    assert len(set(mapped)) == len(odd)  # names that differ only in rejected characters stay apart
    assert mapped == [mlflow_metric_name(n) for n in odd]  # deterministic
    valid = [c for c in tracked_run[1].metrics.columns if c != "iteration"]
    assert [mlflow_metric_name(c) for c in valid] == valid  # the library's own columns keep their names
    assert mapped[0].startswith("reward/clip_336/mean-")

    _, run, _ = tracked_run
    from mixgrpo.results.tracking import TrackingConfig

    errors = []
    trackers = build_trackers(TrackingConfig(backends=["mlflow"]), tmp_path, run_name="odd", config={"a": {"b": 1}},
                              resume_step=None, on_error=lambda name, error: errors.append(error))
    row = run.metrics.iloc[0].to_dict() | {"reward/clip@336/mean": 0.25}
    trackers.log_scalars(row, step=0)
    trackers.close()
    assert errors == []
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run_id = (tmp_path / "mlflow_run_id.txt").read_text().strip()
    assert [m.value for m in client.get_metric_history(run_id, mapped[0])] == [0.25]
    assert client.get_run(run_id).data.params == {"a.b": "1"}


def test_what_each_tracker_holds_after_a_resume(tmp_path):
    """TensorBoard: each iteration once (purge_step). MLflow: the same run, the redone iteration a second value at
    its step, the later one equal to metrics.parquet. W&B: the same run id continued in a second offline segment."""
    run_dir = tmp_path / "run"
    backends = [b for b in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(b)]
    first = train(run_dir, "train.iterations=3", "train.checkpoint_every=2", f"tracking.backends=[{', '.join(backends)}]")
    shutil.rmtree(run_dir / "checkpoints" / "iter_000003")  # as if the run died before its last checkpoint
    run = train(run_dir, resume=True)
    expected = dict(zip(run.metrics["iteration"], run.metrics["reward/mean"]))
    assert list(run.metrics["iteration"]) == [0, 1, 2] and list(first.metrics["iteration"]) == [0, 1, 2]
    assert tensorboard_scalars(run_dir, "reward/mean") == pytest.approx(expected, rel=1e-6)
    if "mlflow" in backends:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
        [mlflow_run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
        history = client.get_metric_history(mlflow_run.info.run_id, "reward/mean")
        assert sorted(m.step for m in history) == [0, 1, 2, 2]
        latest = {m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}
        assert latest == pytest.approx(expected, rel=1e-9)
        assert mlflow_run.data.metrics["reward/mean"] == pytest.approx(expected[2], rel=1e-9)
    if "wandb" in backends:
        segments = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        run_id = (run_dir / "wandb_id.txt").read_text().strip()
        assert len(segments) == 2 and all(p.name == f"run-{run_id}.wandb" for p in segments)


def test_a_failing_tracker_is_an_event_and_training_goes_on(tmp_path, monkeypatch):
    import mixgrpo.results.tracking as tracking

    def broken(self, row, step):
        raise OSError("disk full")

    monkeypatch.setattr(tracking.TensorBoardTracker, "log_scalars", broken)
    with pytest.warns(UserWarning, match="tracker tensorboard failed and is switched off: OSError: disk full"):
        run = train(tmp_path / "run", "train.iterations=2", "tracking.backends=[tensorboard]")
    assert list(run.metrics["iteration"]) == [0, 1]
    failed = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["tracker"]) for e in failed if e["kind"] == "tracker_failed"] == [("tracker_failed",
                                                                                            "tensorboard")]


def test_a_tracker_that_cannot_start_is_reported_and_the_others_still_log(tmp_path):
    from mixgrpo.results.tracking import TrackingConfig

    (tmp_path / "tensorboard").write_text("a file where TensorBoard wants its folder")
    errors = []
    backends = ["tensorboard", *(["mlflow"] if importlib.util.find_spec("mlflow") else [])]
    trackers = build_trackers(TrackingConfig(backends=backends), tmp_path, run_name="r", config={},
                              resume_step=None, on_error=lambda name, error: errors.append((name, error)))
    assert [name for name, _ in errors] == ["tensorboard"] and isinstance(errors[0][1], OSError)
    assert [t.name for t in trackers.trackers] == backends[1:]
    trackers.log_scalars({"iteration": 0, "reward/mean": 0.5}, step=0)
    trackers.close()
    assert len(errors) == 1


def test_unknown_or_missing_tracker_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"tracking.backends: unknown \['neptune'\]; choose from"):
        load_config("quickstart", ["tracking.backends=[neptune]"])
    assert load_config("quickstart", ["tracking.backends=tensorboard"]).tracking.backends == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"tracking.backends must be a list of tracker names, got None; e.g. "):
        load_config("quickstart", ["tracking.backends=null"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"mlflow is not installed; pip install 'mixgrpo\[mlflow\]'"):
        load_config("quickstart", ["tracking.backends=[mlflow]"])


def test_console_line_shows_the_numbers_of_its_row():
    from mixgrpo.results.tracking import console_line

    row = {"iteration": 11, "reward/mean": 0.3125, "reward/std": 0.05, "loss": -0.001, "kl": 0.0,
           "clip_fraction": 0.02, "ratio/first_step": 1.0, "time/total": 3.44}
    line = console_line(row, total=30)
    assert line.startswith("it 12/30  reward 0.3125±0.0500  loss -1.000e-03  kl 0.000e+00  clip 0.020")
    assert line.endswith("3.4 s/it") and "eval" not in line
    assert "eval 0.5000" in console_line(row | {"eval/reward/mean": 0.5}, total=30)
    assert "reward nan±nan" in console_line({"iteration": 0}, total=1)  # a missing column is shown, not a crash
