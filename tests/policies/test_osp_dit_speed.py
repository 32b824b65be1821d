"""Smoke test of the DiT speed benchmark in its CPU tiny mode (the real numbers come from the GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dit_speed_tiny_runs_both_layouts_and_profiles(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "experiments/bench/dit_speed.py", "--device", "cpu", "--tiny", "--warmup", "0",
           "--iters", "1", "--profile", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| 720p | 3x9x8 |" in result.stdout and "| 768p | 3x8x8 |" in result.stdout
    data = json.loads(out.read_text())
    assert [(r["resolution"], r["layout"]) for r in data["rows"]] == [
        ("720p", "full"), ("720p", "osp-next"), ("768p", "full"), ("768p", "osp-next")]
    for row in data["rows"]:
        prof = row["profile_s"]
        assert prof["attention"] > 0 and prof["linear"] > 0 and prof["rope"] > 0
        # Only the hybrid layout changes layout (enter, 1 switch, leave for 2 sparse blocks).
        assert (prof.get("rearrange", 0.0) > 0) == (row["layout"] == "osp-next")


def test_dit_speed_tiny_eager_then_policy_compile_one_json_line_each():
    cmd = [sys.executable, "experiments/bench/dit_speed.py", "--device", "cpu", "--tiny", "--warmup", "0",
           "--iters", "1", "--resolutions", "720p", "--layouts", "osp-next", "--compile-from-policy",
           "--compile-backend", "eager"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["layout"], r["compile"]) for r in rows] == [("osp-next", "eager"), ("osp-next", "policy")]
    assert rows[1]["compile_s"] >= 0 and all(r["median_s"] > 0 for r in rows)
