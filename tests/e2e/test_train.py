"""End-to-end: tiny Mix-GRPO runs on the toy world through the same code path as `mixgrpo train`."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mixgrpo.results.analysis import load_run
from mixgrpo.config import load_config
from mixgrpo.cli import quickstart_path
from mixgrpo.driver.trainer import Trainer, component_means
from rewards.ensemble import ScoreTable

TINY = [
    "sampler.num_steps=4", "window.size=2", "window.shift_interval=1", "rollout.prompts_per_iteration=2",
    "rollout.group_size=2", "train.num_videos=1", "learner.optimizer_steps=2", "learner.micro_batch_size=2",
    "train.device=cpu",
]


def tiny_config(*extra):
    return load_config(quickstart_path(), [*TINY, *extra])


def test_tiny_run_changes_every_trainable_parameter_with_first_ratio_one(tmp_path):
    cfg = tiny_config("train.iterations=2", "learner.lr=1e-3")
    trainer = Trainer(cfg, run_dir=tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.workers.worker.learner.trainable_state().items()}
    trainer.run()
    after = trainer.workers.worker.learner.trainable_state()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that never changed: {unchanged[:5]}"
    run = load_run(tmp_path / "run")
    assert list(run.metrics["iteration"]) == [0, 1]
    assert run.metrics["loss"].notna().all() and torch.isfinite(torch.tensor(run.metrics["loss"].values)).all()
    # On-policy check: the first inner step sees the weights that sampled the rollouts. The recompute batches
    # samples differently from the rollout, so allow float32 reduction-order noise only.
    assert (run.metrics["ratio/first_step"] - 1.0).abs().max() < 1e-5
    assert len(run.samples) == 2 * 4
    # toy_fidelity reports its attributes; the total is their mean, so the component means average to it.
    components = [f"reward/toy_fidelity/{a}/mean" for a in ("colour", "shape", "direction")]
    parts = run.metrics[components].to_numpy()
    assert torch.isfinite(torch.tensor(parts)).all()
    assert abs(parts.mean(axis=1) - run.metrics["reward/toy_fidelity/mean"].to_numpy()).max() < 1e-5
    assert run.samples["reward/toy_fidelity/colour"].notna().all()
    assert (tmp_path / "run" / "reward_curve.png").is_file()
    assert list((tmp_path / "run" / "videos").glob("*.mp4"))


def _train_cli(run_dir, *overrides):
    return [sys.executable, "-m", "mixgrpo", "train", str(quickstart_path()), *TINY, *overrides, "--run-dir", str(run_dir)]


def test_killed_then_resumed_run_equals_an_uninterrupted_run(tmp_path):
    common = ["train.iterations=4", "train.checkpoint_every=1", "train.keep_checkpoints=5"]
    straight = tmp_path / "straight"
    subprocess.run(_train_cli(straight, *common), check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cli(killed, *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "iter_000002" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([*_train_cli(killed, *common), "--resume"], check=True, capture_output=True, timeout=600)

    final_a = load_file(str(straight / "checkpoints" / "iter_000004" / "model.safetensors"))
    final_b = load_file(str(killed / "checkpoints" / "iter_000004" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    a, b = load_run(straight), load_run(killed)
    assert list(b.metrics["iteration"]) == [0, 1, 2, 3]
    pd.testing.assert_series_equal(a.metrics["reward/mean"], b.metrics["reward/mean"])
    pd.testing.assert_frame_equal(a.samples[["iteration", "prompt", "seed", "reward"]],
                                  b.samples[["iteration", "prompt", "seed", "reward"]])


def test_component_means_use_the_same_samples_as_the_reward_mean():
    nan = math.nan
    table = ScoreTable(sample_ids=[0, 1, 2, 3], raw={"r": torch.zeros(4)}, weights={"r": 1.0}, nan_counts={"r": 0},
                       failed_ids={"r": []}, errors={}, dropped_ids=[3], dropped_groups=[1],
                       keep_B=torch.tensor([True, True, True, False]))
    assert table.details == {} and component_means(table) == {}  # built without details: nothing to log
    table.details = {"r": {"a": torch.tensor([1.0, nan, 3.0, 100.0]), "b": torch.tensor([nan, nan, nan, 1.0])}}
    means = component_means(table)
    # like reward/<name>/mean: every finite value, dropped groups included (only failed calls are NaN)
    assert means["reward/r/a/mean"] == pytest.approx(104.0 / 3) and means["reward/r/b/mean"] == 1.0
