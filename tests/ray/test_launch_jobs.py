"""docs/ray.md's cluster path, verbatim, against a real head with token authentication: `ray get-auth-token
--generate`, `RAY_AUTH_MODE=token ray start --head`, then experiments/launch/submit.sh with the toy world on CPUs.
The job succeeds with the shipped toy base (uploaded by the runtime env, not re-pretrained), its log holds compact
lines instead of a progress bar, and `ray job stop` ends a running job within seconds, its run left resumable."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "experiments" / "launch" / "submit.sh"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head started as docs/ray.md says, in a private HOME (its own ~/.ray/auth_token)."""
    home = tmp_path_factory.mktemp("home")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    ray = shutil.which("ray", path=env["PATH"])
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    assert (home / ".ray" / "auth_token").is_file()
    port, dashboard = free_port(), free_port()
    started = subprocess.run([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                              "--num-cpus=3", "--disable-usage-stats"], env={**env, "RAY_AUTH_MODE": "token"},
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{dashboard}", "ray": ray}
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(head, *args, timeout=600):
    env = {**head["env"], "RAY_ADDRESS": head["address"]}  # the client sets only this; submit.sh does the rest
    return subprocess.run(["bash", str(SUBMIT), *args], env=env, capture_output=True, text=True, timeout=timeout)


TOY = ["train.iterations=2", "train.num_videos=1", "rollout.num_workers=1", "rollout.prompts_per_iteration=2",
       "train.threads=1"]


def test_the_documented_submit_runs_the_toy_job_to_success(head, tmp_path):
    run_dir = tmp_path / "run"  # absolute, as docs/ray.md asks (shared storage on a real cluster)
    done = submit(head, "quickstart", *TOY, "rollout.num_workers=2", "--run-dir", str(run_dir))  # docs/ray.md's job
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout + done.stderr
    for name in ("config.yaml", "metrics.parquet", "samples.parquet", "reward_curve.png"):
        assert (run_dir / name).is_file(), name
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["ray"] for e in events if e["kind"] == "workers_started"] == ["joined"]
    assert pd.read_parquet(run_dir / "metrics.parquet")["learner/world_size"].tolist() == [2, 2]
    log = done.stdout + done.stderr
    assert "pretraining a new one" not in log  # the shipped toy base travelled with the upload
    assert [line.split()[1] for line in log.splitlines() if line.startswith("it ")] == ["1/2", "2/2"]
    assert "it/s]" not in log  # no progress-bar frames in the job log


def test_ray_job_stop_ends_a_running_job_within_seconds(head, tmp_path):
    run_dir = tmp_path / "long"
    queued = submit(head, "--no-wait", "quickstart", *TOY, "train.iterations=500", "--run-dir", str(run_dir),
                    timeout=120)
    assert queued.returncode == 0, queued.stderr[-2000:]
    job = re.search(r"raysubmit_[A-Za-z0-9]+", queued.stdout + queued.stderr).group(0)
    env = {**head["env"], "RAY_AUTH_MODE": "token"}
    deadline = time.time() + 180
    while not (run_dir / "metrics.parquet").is_file() or not list((run_dir / "videos").glob("it000000_*")):
        assert time.time() < deadline, "the job did not start training within 180 s"
        time.sleep(0.5)
    tick = time.time()
    stopped = subprocess.run([head["ray"], "job", "stop", "--address", head["address"], job], env=env,
                             capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert time.time() - tick < 20
    status = subprocess.run([head["ray"], "job", "status", "--address", head["address"], job], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "stopped" in (status.stdout + status.stderr).lower()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "interrupted"  # the trainer saw it and freed its workers


def test_a_client_without_the_token_is_refused(head):
    env = {**head["env"], "RAY_AUTH_MODE": "token", "HOME": "/nonexistent"}
    listed = subprocess.run([head["ray"], "job", "list", "--address", head["address"]], env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode != 0 and "token" in (listed.stdout + listed.stderr).lower()
