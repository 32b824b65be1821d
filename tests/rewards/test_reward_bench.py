"""Smoke test of the reward throughput benchmark in its CPU --tiny mode."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "reward_throughput.py"


def test_reward_throughput_tiny_smoke(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--device", "cpu", "--tiny", "--frames", "5"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["rewards"] for r in lines] == ["clip_score", "hpsv2", "clip_score+hpsv2"]
    assert all(r["videos_per_s"] > 0 and r["video_shape"] == [5, 3, 64, 96] for r in lines)
