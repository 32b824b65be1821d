"""The `ray job submit` example: a valid runtime env and a script that refuses to run half-configured."""

import os
import subprocess
from pathlib import Path

import yaml

LAUNCH = Path(__file__).resolve().parents[2] / "experiments" / "launch"


def test_runtime_env_uploads_the_repository_without_git_venv_or_weights():
    env = yaml.safe_load((LAUNCH / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".git", ".venv", "*.safetensors"} <= set(env["excludes"])
    assert env["env_vars"]["PYTHONPATH"] == "."
    assert set(env) <= {"working_dir", "excludes", "env_vars", "pip", "uv", "py_modules", "conda"}


def test_submit_script_needs_a_config_and_a_cluster_address():
    script = str(LAUNCH / "submit.sh")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    usage = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    no_address = subprocess.run(["bash", script, "quickstart"], capture_output=True, text=True,
                                env=env)
    assert no_address.returncode != 0 and "set RAY_ADDRESS" in no_address.stderr
    with_address = {**env, "RAY_ADDRESS": "http://127.0.0.1:1"}  # refused before any contact with it
    misplaced = subprocess.run(["bash", script, "--run-dir", "/x", "quickstart"], capture_output=True, text=True,
                               env=with_address)
    assert misplaced.returncode == 2 and "CONFIG comes first" in misplaced.stderr
    not_a_number = subprocess.run(["bash", script, "--gpus", "abc", "quickstart"], capture_output=True, text=True,
                                  env=with_address)
    assert not_a_number.returncode == 2 and "--gpus and --cpus take a number, got 'abc'" in not_a_number.stderr
