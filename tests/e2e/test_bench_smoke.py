"""The Mix-GRPO benchmark scripts run end to end in their CPU smoke modes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_iteration_time_tiny_prints_every_requested_variant():
    out = subprocess.run(
        [sys.executable, "experiments/bench/iteration_time.py", "--device", "cpu", "--tiny",
         "--variants", "dance_grpo,flash_star"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("dance_grpo", "flash_star"))}
    assert set(rows) == {"dance_grpo", "flash_star"}
    # Flash* samples fewer post-window steps than DanceGRPO's all-SDE rollout: its NFE column is smaller.
    assert float(rows["flash_star"][3]) < float(rows["dance_grpo"][3])
