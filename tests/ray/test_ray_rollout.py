"""Ray rollouts on a local CPU cluster: same samples and updates as the local engine, faults, resume, preflight.

Settings keep every sampler call one prompt group (rollout.batch_size == rollout.group_size), so a rollout's
numbers do not depend on how groups are split over workers, and Ray runs are compared bit for bit.
"""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from safetensors.torch import load_file

import mixgrpo.ray_rollout as ray_rollout
from mixgrpo.analysis import load_run
from mixgrpo.cli import quickstart_path
from mixgrpo.config import load_config
from mixgrpo.ray_rollout import RayRolloutEngine
from mixgrpo.rollout import LocalRolloutEngine
from mixgrpo.trainer import Trainer
from policies.toy import make_toy_policy, save_toy_policy

pytestmark = pytest.mark.ray

ITERATIONS = 2
CLUSTER_CPUS = 4


def tiny(weights, *extra):
    return ["sampler.num_steps=4", "window.size=2", "window.shift_interval=1", "rollout.prompts_per_iteration=2",
            "rollout.group_size=2", "rollout.batch_size=2", "train.num_videos=1", "train.device=cpu",
            "learner.micro_batch_size=2", "train.threads=1", f"policy.weights={weights}",
            f"train.iterations={ITERATIONS}", "train.checkpoint_every=1", "train.keep_checkpoints=5", *extra]


def ray_overrides(workers=2):
    return ["rollout.backend=ray", f"rollout.num_workers={workers}"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=CLUSTER_CPUS, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # A random toy base written like the shipped one: the workers load it from the file, as they would the asset.
    return save_toy_policy(make_toy_policy(seed=3), tmp_path_factory.mktemp("toy") / "toy.safetensors")


@pytest.fixture(scope="module")
def straight(cluster, weights, tmp_path_factory):
    """Uninterrupted local and Ray (2 workers) runs of the same config, plus each engine's first rollout."""
    root = tmp_path_factory.mktemp("straight")
    out = {}
    for backend, extra in (("local", []), ("ray", ray_overrides())):
        trainer = Trainer(load_config(quickstart_path(), tiny(weights, *extra)), run_dir=root / backend)
        first = trainer.engine.rollout(trainer.request(0))
        trainer.run()
        out[backend] = {"dir": root / backend, "first": first, "engine": trainer.engine,
                        "state": {k: v.clone() for k, v in trainer.learner.trainable_state().items()}}
    return out


def assert_same_rollout(a, b, *, atol=0.0):
    assert a.request.sample_seeds == b.request.sample_seeds
    for name in ("latents", "x_t", "x_next", "log_prob", "seeds", "group_index"):
        x, y = getattr(a.trajectory, name), getattr(b.trajectory, name)
        if atol:
            torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=name)
        else:
            assert torch.equal(x, y), name
    torch.testing.assert_close(a.videos_BTCHW, b.videos_BTCHW, atol=atol, rtol=0)
    assert a.nfe == b.nfe


def final_weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / f"iter_{ITERATIONS:06d}" / "model.safetensors"))


def test_two_workers_give_the_local_rollouts_and_updates_bit_for_bit(straight):
    local, remote = straight["local"], straight["ray"]
    assert isinstance(local["engine"], LocalRolloutEngine) and isinstance(remote["engine"], RayRolloutEngine)
    assert_same_rollout(local["first"], remote["first"])
    # Later iterations sample with weights synced after each update: equal samples and rewards show the sync.
    a, b = load_run(local["dir"]), load_run(remote["dir"])
    pd.testing.assert_frame_equal(a.samples[["iteration", "prompt", "seed", "reward"]],
                                  b.samples[["iteration", "prompt", "seed", "reward"]])
    assert local["state"].keys() == remote["state"].keys()
    for name in local["state"]:
        assert torch.equal(local["state"][name], remote["state"][name]), name
    assert remote["engine"].groups == []  # Trainer.finish shut the workers down


class KillingEngine(RayRolloutEngine):
    """Kills worker group 0 just before the weights of iteration 0's update are synced, and rank 0 of group 1
    right after its share of iteration 1 was submitted (once each)."""

    killed = False
    syncs = 0

    def sync_weights(self, tensors):
        KillingEngine.syncs += 1
        if KillingEngine.syncs == 2:  # the first sync publishes the initial weights before iteration 0
            ray.kill(self.groups[0].actors[0], no_restart=True)
        super().sync_weights(tensors)

    def _submit(self, w, part):
        refs = super()._submit(w, part)
        if part.iteration == 1 and w == 1 and not KillingEngine.killed:
            KillingEngine.killed = True
            ray.kill(self.groups[w].actors[0], no_restart=True)
        return refs


def test_a_worker_killed_mid_iteration_is_replaced_and_no_sample_changes(straight, weights, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_rollout, "RayRolloutEngine", KillingEngine)
    trainer = Trainer(load_config(quickstart_path(), tiny(weights, *ray_overrides())), run_dir=tmp_path / "run")
    trainer.run()
    assert KillingEngine.killed
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events[0]["kind"] == "rollout_workers_started" and events[0]["ray"] == "connected"
    restarts = [e for e in events if e["kind"] == "worker_restarted"]
    assert [(e["worker_group"], e["iteration"], e["redone_groups"]) for e in restarts] == [(0, None, []), (1, 1, [1])]
    assert all(e["error"].startswith("ActorDiedError") for e in restarts)
    # Both recreated groups sampled iteration 1 with the weights synced after iteration 0's update.
    killed, undisturbed = load_run(tmp_path / "run"), load_run(straight["ray"]["dir"])
    columns = ["iteration", "prompt", "group", "sample", "seed", "reward"]
    pd.testing.assert_frame_equal(killed.samples[columns], undisturbed.samples[columns])
    assert not killed.samples.duplicated(["iteration", "seed"]).any()
    for name, value in straight["ray"]["state"].items():
        assert torch.equal(trainer.learner.trainable_state()[name], value), name


def test_driver_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(straight, cluster, weights, tmp_path):
    run_dir = tmp_path / "killed"
    # One worker group here, two in the reference run: the split of groups over workers must not matter either.
    command = [sys.executable, "-m", "mixgrpo", "train", str(quickstart_path()),
               *tiny(weights, *ray_overrides(workers=1)), "--run-dir", str(run_dir)]
    env = {**os.environ, "RAY_ADDRESS": cluster}  # join this cluster, as `ray job submit` does
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / f"iter_{ITERATIONS - 1:06d}" / "manifest.json").exists():
        assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no checkpoint before the last within 180 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    expected, resumed = final_weights(straight["ray"]["dir"]), final_weights(run_dir)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["ray"] for e in events if e["kind"] == "rollout_workers_started"] == ["joined", "joined"]
    assert [e["iteration"] for e in events if e["kind"] == "resume"] == [ITERATIONS - 1]
    run = load_run(run_dir)
    assert list(run.metrics["iteration"]) == list(range(ITERATIONS))
    columns = ["iteration", "prompt", "seed", "reward"]
    pd.testing.assert_frame_equal(run.samples[columns], load_run(straight["ray"]["dir"]).samples[columns])


def test_sequence_parallel_group_with_lora_matches_the_local_engine_and_syncs_only_lora(cluster, weights, tmp_path):
    cfg = load_config(quickstart_path(), tiny(weights, "rollout.backend=ray", "rollout.num_workers=1",
                                              "rollout.sp_size=2", "learner.lora.enabled=true", "learner.lora.rank=4"))
    trainer = Trainer(cfg, run_dir=tmp_path / "run")
    engine = trainer.engine
    try:
        request = trainer.request(0)
        with torch.no_grad():  # a non-zero LoRA update, so the check sees the synced tensors at work
            for name, param in trainer.policy.transformer.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        remote = engine.rollout(request)
        published = {k for ref in engine._weight_refs for k in ray.get(ref)}
        assert published and all("lora_" in k for k in published)
        assert published == {k for k, p in trainer.policy.transformer.named_parameters() if p.requires_grad}
        local = LocalRolloutEngine(trainer.policy, cfg.sampler, device=torch.device("cpu"), batch_groups=1)
        # Two ranks split tokens, heads and Skiparse subsequences: same maths, other float32 reduction splits.
        assert_same_rollout(local.rollout(request), remote, atol=1e-5)
    finally:
        engine.shutdown()
        trainer.log.close()


def test_preflight_says_what_is_missing_when_asking_for_more_workers_than_cpus(cluster, weights):
    cfg = load_config(quickstart_path(), tiny(weights, *ray_overrides(workers=CLUSTER_CPUS + 2)))
    want = CLUSTER_CPUS + 2
    with pytest.raises(RuntimeError, match=rf"need {want} CPUs for {want} worker groups x sp_size 1 "
                                           rf"\(\d+ free of {CLUSTER_CPUS} in the cluster\).*rollout.num_workers"):
        RayRolloutEngine(cfg, None, device=torch.device("cpu"))


def test_rollout_throughput_bench_tiny_smoke(cluster, monkeypatch, capsys):
    script = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "rollout_throughput.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--device", "cpu", "--tiny", "--workers", "2"])
    runpy.run_path(str(script), run_name="__main__")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["workers"] for r in rows] == [2]
    # tiny preset: 5 frames of 64 x 64 -> 2 latent frames of 8 x 8 (Wan's 4x / 8x), decoded to 3 channels
    assert all(r["videos"] == 8 and r["videos_per_s"] > 0 and r["video_shape"] == [2, 3, 8, 8] for r in rows)
