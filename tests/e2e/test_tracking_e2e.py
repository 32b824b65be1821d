"""`mixgrpo train ... tracking.backends=[tensorboard]` as a job runs it: a separate process whose stdout is a pipe, not a
terminal. TensorBoard's own reader finds `reward/mean` for every iteration equal to metrics.parquet, and the log gets
one compact line per iteration instead of a redrawn progress bar."""

import subprocess
import sys

import pytest

from mixgrpo.results.analysis import load_run

pytest.importorskip("tensorboard", reason="TensorBoard is the tracker under test (pip install 'mixgrpo[tensorboard]')")

TINY = ["sampler.num_steps=4", "window.size=2", "rollout.prompts_per_iteration=2", "rollout.group_size=2",
        "train.num_videos=0", "learner.micro_batch_size=4", "train.device=cpu", "train.threads=1",
        "train.sample_videos_per_iteration=0"]


def test_a_job_log_gets_tensorboard_events_and_one_line_per_iteration(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mixgrpo", "train", *TINY, "train.iterations=2",
                           "tracking.backends=[tensorboard]", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    metrics = load_run(run_dir).metrics
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("reward/mean")}
    assert logged == pytest.approx(dict(zip(metrics["iteration"], metrics["reward/mean"])), rel=1e-6)  # float32

    lines = [line for line in done.stdout.splitlines() if line.startswith("it ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    for line, reward in zip(lines, metrics["reward/mean"]):
        assert f"reward {reward:.4f}±" in line and " loss " in line and " kl " in line and " clip " in line
        assert line.endswith("s/it")
    assert "mix-grpo:" not in done.stderr  # no progress bar redrawn into the log
