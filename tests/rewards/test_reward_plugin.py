"""The example plugin is found through real entry-point metadata after a pip install."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

import rewards
from rewards import registry

PLUGIN = Path(__file__).resolve().parents[2] / "experiments" / "reward_plugin_example"


def test_plugin_discovered_through_entry_point(tmp_path, monkeypatch):
    source = shutil.copytree(PLUGIN, tmp_path / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(source)],
        check=True,
    )
    assert list(target.glob("mixgrpo_reward_example-*.dist-info/entry_points.txt"))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    monkeypatch.syspath_prepend(str(target))
    registry.refresh_entry_points()
    try:
        assert "colorfulness" in rewards.available()
        assert "colorfulness" not in registry._REGISTRY  # listed, not imported until built
        reward = rewards.build("colorfulness", num_frames=2)
        grey = torch.full((1, 2, 3, 8, 8), 0.5)
        vivid = torch.zeros(1, 2, 3, 8, 8)
        vivid[:, :, 0, :, :4] = 1.0
        vivid[:, :, 2, :, 4:] = 1.0
        scores = reward(torch.cat([grey, vivid]), ["a", "b"])
        assert scores[0].item() == 0.0 and scores[1].item() > 0.5
        assert type(reward).__module__ == "mixgrpo_reward_example"
    finally:
        monkeypatch.undo()
        registry.refresh_entry_points()
