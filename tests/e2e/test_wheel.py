"""The installed package runs its own quickstart: build the wheel, install it into a clean folder, and run
`mixgrpo train quickstart` from another directory with nothing of the checkout on the path."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]



def test_wheel_installs_and_trains_the_quickstart_from_anywhere(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = wheels.glob("mixgrpo-*.whl")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def mixgrpo(*args):
        return subprocess.run([sys.executable, "-m", "mixgrpo", *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import mixgrpo, policies; print(mixgrpo.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr  # not the checkout
    version = mixgrpo("--version")
    assert version.returncode == 0 and version.stdout.startswith("mixgrpo 0."), version.stderr
    run = mixgrpo("train", "quickstart", "train.iterations=1", "train.num_videos=1", "rollout.prompts_per_iteration=2",
                  "train.threads=1", "--run-dir", "runs/q")
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = elsewhere / "runs" / "q"
    for name in ("config.yaml", "metrics.parquet", "samples.parquet", "reward_curve.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "iter_000001" / "manifest.json").is_file()
    # the shipped toy base was used, not a re-pretrained one (which would warn)
    assert "pretraining a new one" not in run.stderr
