"""Colocated worker groups on a local Ray CPU cluster (gloo): they train exactly like one process, survive a rank
killed mid-update or stopped, resume after the driver dies, and say what the cluster lacks.

Settings keep every sampler call one prompt group (rollout.batch_size == rollout.group_size), so a rollout's numbers
do not depend on how groups are split over workers. The learner splits each minibatch over the worker groups and
sums their gradients, so the weights after 3 iterations differ from the one-process run's only by float32 summation
order (measured ~1e-7 relative; the bound is 1e-5, the issue's tolerance).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch

import mixgrpo.driver.ray_workers as ray_workers
from mixgrpo.results.analysis import load_run
from mixgrpo.engine.checkpoint import read_model_weights
from mixgrpo.cli import quickstart_path
from mixgrpo.config import load_config
from mixgrpo.driver.ray_workers import RayWorkers
from mixgrpo.driver.trainer import Trainer
from policies.toy import make_toy_policy, save_toy_policy

pytestmark = pytest.mark.ray

ITERATIONS = 3
CLUSTER_CPUS = 4


def tiny(weights, *extra):
    return ["sampler.num_steps=4", "window.size=2", "window.shift_interval=1", "rollout.prompts_per_iteration=2",
            "rollout.group_size=2", "rollout.batch_size=2", "train.num_videos=1", "train.device=cpu",
            "learner.micro_batch_size=2", "learner.optimizer_steps=2", "train.threads=1", f"policy.weights={weights}",
            f"train.iterations={ITERATIONS}", "train.checkpoint_every=1", "train.keep_checkpoints=5", *extra]


TRAINING = {"lora": ["learner.lora.enabled=true", "learner.lora.rank=4"], "full": [],
            "fsdp": ["learner.sharding=fsdp"]}
LAYOUTS = {"2x1": ["rollout.backend=ray", "rollout.num_workers=2"],
           "1x2": ["rollout.backend=ray", "rollout.num_workers=1", "rollout.sp_size=2"]}


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


def train(run_dir, weights, *extra) -> Path:
    Trainer(load_config(quickstart_path(), tiny(weights, *extra)), run_dir=run_dir).run()
    return run_dir


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return read_model_weights(run_dir / "checkpoints" / f"iter_{ITERATIONS:06d}", ema=False)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    return (num / sum(float(a[k].double().pow(2).sum()) for k in a)) ** 0.5


def events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_runs(weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    return {name: train(root / name, weights, *extra) for name, extra in (("lora", TRAINING["lora"]),
                                                                          ("full", []))}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("training", ["lora", "fsdp"])
def test_colocated_groups_train_like_one_process(cluster, weights, local_runs, tmp_path, layout, training):
    run_dir = train(tmp_path / "run", weights, *TRAINING[training], *LAYOUTS[layout])
    reference = local_runs["lora" if training == "lora" else "full"]
    assert relative_difference(final_weights(reference), final_weights(run_dir)) < 1e-5
    run, local = load_run(run_dir), load_run(reference)
    assert list(run.metrics["iteration"]) == list(range(ITERATIONS))
    assert (run.metrics["learner/world_size"] == 2).all() and (local.metrics["learner/world_size"] == 1).all()
    assert (run.metrics["ratio/first_step"] - 1.0).abs().max() < 1e-5  # on-policy before the first step
    # Same samples and rewards as the local run: the updates agree closely enough to sample alike.
    pd.testing.assert_frame_equal(run.samples[["iteration", "seed", "prompt"]], local.samples[["iteration", "seed",
                                                                                                "prompt"]])
    started = [e for e in events(run_dir) if e["kind"] == "workers_started"]
    assert [(e["world_size"], e["sharding"]) for e in started] == [(2, "fsdp" if training == "fsdp" else "none")]
    if training == "fsdp":  # no whole model anywhere: the checkpoint holds torch.distributed.checkpoint shards
        assert (run_dir / "checkpoints" / f"iter_{ITERATIONS:06d}" / "dcp").is_dir()


class FaultyWorkers(RayWorkers):
    """Breaks rank 1 as the update of iteration 1 (the 2nd update) starts: kills it (and waits until it is gone) or
    stops it (SIGSTOP). Rank 0 then runs its part of the update into a collective that cannot complete."""

    fault = "kill"
    updates = 0

    def update(self, advantages_B, plan):
        FaultyWorkers.updates += 1
        if FaultyWorkers.updates == 2:
            victim = self.actors[1]
            if FaultyWorkers.fault == "kill":
                ray.kill(victim, no_restart=True)
                deadline = time.monotonic() + 60
                while True:  # the kill is asynchronous: wait until the actor is gone
                    try:
                        ray.get(victim.__ray_ready__.remote(), timeout=5)
                    except ray.exceptions.RayActorError:
                        break
                    assert time.monotonic() < deadline, "the killed actor is still answering after 60 s"
                    time.sleep(0.1)
            else:
                os.kill(ray.get(victim.__ray_call__.remote(lambda actor: os.getpid())), signal.SIGSTOP)
        return super().update(advantages_B, plan)


@pytest.mark.parametrize("fault,training", [("kill", "lora"), ("stop", "lora"), ("kill", "fsdp")])
def test_a_rank_killed_or_stopped_mid_update_is_restarted_and_every_iteration_runs_once(
        cluster, weights, tmp_path, monkeypatch, fault, training):
    setting = [*TRAINING[training], *LAYOUTS["2x1"], "rollout.recovery=snapshot"]
    undisturbed = train(tmp_path / "undisturbed", weights, *setting)
    FaultyWorkers.fault, FaultyWorkers.updates = fault, 0
    monkeypatch.setattr(ray_workers, "RayWorkers", FaultyWorkers)
    tick = time.monotonic()
    run_dir = train(tmp_path / "run", weights, *setting, "rollout.timeout_s=5")
    assert FaultyWorkers.updates >= 3
    restarts = [e for e in events(run_dir) if e["kind"] == "worker_restarted"]
    assert [(e["iteration"], e["attempt"]) for e in restarts] == [(1, 1)]
    assert ("died" if fault == "kill" else "rollout.timeout_s") in restarts[0]["error"]
    run = load_run(run_dir)
    assert list(run.metrics["iteration"]) == list(range(ITERATIONS))  # the interrupted iteration once
    assert not run.samples.duplicated(["iteration", "seed"]).any()
    # The redone iteration started from the state the interrupted one began with: the same weights at the end.
    assert relative_difference(final_weights(undisturbed), final_weights(run_dir)) < 1e-6
    if fault == "stop":
        assert time.monotonic() - tick < 120  # the stopped rank was given up on after rollout.timeout_s, not hung


def test_recovery_stop_ends_the_run_with_an_event_and_the_way_to_resume(cluster, weights, tmp_path, monkeypatch):
    FaultyWorkers.fault, FaultyWorkers.updates = "kill", 0
    monkeypatch.setattr(ray_workers, "RayWorkers", FaultyWorkers)
    with pytest.raises(RuntimeError, match=r"iteration 1: a .* rollout.recovery=stop: resume the run with --resume"):
        train(tmp_path / "run", weights, *TRAINING["fsdp"], *LAYOUTS["2x1"])  # auto = stop under FSDP
    assert [e["iteration"] for e in events(tmp_path / "run") if e["kind"] == "worker_failed"] == [1]
    assert list(load_run(tmp_path / "run").metrics["iteration"]) == [0]  # what finished stays; --resume goes on


def test_driver_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(cluster, weights, tmp_path):
    reference = train(tmp_path / "reference", weights, *LAYOUTS["2x1"])
    run_dir = tmp_path / "killed"
    # One worker group here, two in the reference run: the split of groups over workers must not matter either.
    command = [sys.executable, "-m", "mixgrpo", "train", str(quickstart_path()),
               *tiny(weights, "rollout.backend=ray", "rollout.num_workers=1"), "--run-dir", str(run_dir)]
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
    assert relative_difference(final_weights(reference), final_weights(run_dir)) < 1e-5
    kinds = events(run_dir)
    assert [e["ray"] for e in kinds if e["kind"] == "workers_started"] == ["joined", "joined"]
    assert [e["iteration"] for e in kinds if e["kind"] == "resume"] == [ITERATIONS - 1]
    run = load_run(run_dir)
    assert list(run.metrics["iteration"]) == list(range(ITERATIONS))
    pd.testing.assert_frame_equal(run.samples[["iteration", "prompt", "seed"]],
                                  load_run(reference).samples[["iteration", "prompt", "seed"]])


def test_preflight_says_what_is_missing_when_asking_for_more_workers_than_cpus(cluster, weights):
    want = CLUSTER_CPUS + 2
    cfg = load_config(quickstart_path(), tiny(weights, "rollout.backend=ray", f"rollout.num_workers={want}",
                                              f"rollout.prompts_per_iteration={want}"))
    with pytest.raises(RuntimeError, match=rf"need {want} CPUs for {want} worker groups x sp_size 1 "
                                           rf"\(\d+ free of {CLUSTER_CPUS} in the cluster\).*rollout.num_workers"):
        RayWorkers(cfg)


def test_asking_for_more_workers_than_the_cluster_has_is_one_line_from_the_cli(cluster, weights, tmp_path, capsys):
    from mixgrpo.cli import main

    want = CLUSTER_CPUS + 2
    status = main(["train", *tiny(weights, "rollout.backend=ray", f"rollout.num_workers={want}",
                                  f"rollout.prompts_per_iteration={want}"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and err[0].startswith(f"mixgrpo: error: Ray resources are not available: need {want} CPUs")
    assert not (tmp_path / "run").exists()  # found before the run directory was made


def test_sequence_parallel_degrees_that_do_not_fit_fail_before_any_model_loads(weights, tmp_path):
    cfg = load_config(quickstart_path(), tiny(weights, "rollout.backend=ray", "rollout.sp_size=3"))
    with pytest.raises(ValueError, match=r"rollout.sp_size=3 does not fit this model \(2 heads, Skiparse k=2\)"):
        Trainer(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_rollout_throughput_bench_tiny_smoke(cluster, monkeypatch, capsys):
    import runpy

    script = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "rollout_throughput.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--device", "cpu", "--tiny", "--workers", "2"])
    runpy.run_path(str(script), run_name="__main__")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["workers"] for r in rows] == [2]
    # tiny preset: 5 frames of 64 x 64 -> 2 latent frames of 8 x 8 (Wan's 4x / 8x), decoded to 3 channels
    assert all(r["videos"] == 8 and r["videos_per_s"] > 0 and r["video_shape"] == [2, 3, 8, 8] for r in rows)


def test_iteration_scaling_bench_tiny_smoke(cluster, monkeypatch, capsys):
    import runpy

    script = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "iteration_scaling.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--device", "cpu", "--tiny", "--gpus", "2", "--warmup", "0"])
    runpy.run_path(str(script), run_name="__main__")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["gpus"], r["workers"], r["world_size"]) for r in rows] == [(2, 2, 2)]
    assert rows[0]["seconds_per_iteration"] > 0 and abs(rows[0]["ratio_first_step"] - 1.0) < 1e-5


def test_a_worker_group_that_fails_to_start_frees_its_resources(cluster, weights):
    import ray

    cfg = load_config(quickstart_path(), tiny(weights, "rollout.backend=ray", "rollout.num_workers=2",
                                              "learner.lora.enabled=true", "learner.lora.targets=[no_such_module]"))
    free = ray.available_resources().get("CPU")
    with pytest.raises(Exception, match="no_such_module"):
        RayWorkers(cfg)
    deadline = time.time() + 30
    while ray.available_resources().get("CPU") != free:  # actors and placement groups released
        assert time.time() < deadline, (ray.available_resources(), ray.util.placement_group_table())
        time.sleep(0.2)
