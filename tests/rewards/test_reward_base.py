"""Reward contract: input validation, frame sampling, adapters, registry."""

from __future__ import annotations

import math

import pytest
import torch

import rewards
from rewards import registry
from rewards.base import PerFrameReward, sample_frame_indices, validate_videos
from reward_fixtures import random_videos


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))


@pytest.mark.parametrize(
    "videos, prompts, match",
    [
        (torch.rand(2, 3, 8, 8), ["a", "b"], "rank 5"),
        ((torch.rand(2, 1, 3, 8, 8) * 255).to(torch.uint8), ["a", "b"], "floating point"),
        (torch.rand(2, 1, 3, 8, 8) * 2 - 1, ["a", "b"], r"\[0, 1\]"),
        (torch.full((2, 1, 3, 8, 8), math.nan), ["a", "b"], r"\[0, 1\]"),
        (torch.rand(2, 1, 3, 8, 8), ["a"], "len\\(prompts\\) = 1"),
        (torch.rand(2, 1, 3, 8, 8), "ab", "list of str"),
    ],
)
def test_validate_videos_rejects_bad_input(videos, prompts, match):
    with pytest.raises(ValueError, match=match):
        validate_videos(videos, prompts)


def test_sample_frame_indices_evenly_spaced():
    assert sample_frame_indices(81, 4).tolist() == [0, 27, 53, 80]
    assert sample_frame_indices(3, 8).tolist() == [0, 1, 2]
    assert sample_frame_indices(5, 1).tolist() == [0]


class _FrameMean(PerFrameReward):
    def score_images(self, images_NCHW, prompts):
        return images_NCHW.mean(dim=(1, 2, 3))


def test_per_frame_reward_averages_sampled_frames():
    videos = random_videos(2, t=9)
    got = _FrameMean(num_frames=3)(videos, ["a", "b"])
    want = videos[:, [0, 4, 8]].mean(dim=(2, 3, 4)).mean(dim=1)
    torch.testing.assert_close(got, want)


def test_reward_output_shape_is_checked(clean_registry):
    rewards.register_reward("bad_shape", style="function")(lambda videos, prompts, **m: torch.zeros(3))
    with pytest.raises(ValueError, match="one score per video"):
        rewards.build("bad_shape")(random_videos(2), ["a", "b"])


def test_trl_adapter_maps_none_to_nan_and_passes_metadata(clean_registry):
    seen = {}

    @rewards.register_reward("trl_len", style="trl")
    def trl_len(prompts, completions=None, **kwargs):
        seen.update(kwargs)
        return [None if p == "skip" else float(len(p)) + c.shape[0] for p, c in zip(prompts, completions)]

    scores = rewards.build("trl_len")(random_videos(2, t=3), ["skip", "four"], difficulty=[1, 2])
    assert math.isnan(scores[0]) and scores[1].item() == 7.0
    assert seen == {"difficulty": [1, 2]}


def test_registry_errors_name_the_fix(clean_registry):
    with pytest.raises(ValueError, match="mixgrpo.rewards"):
        rewards.build("no_such_reward")
    rewards.register_reward("dup", style="function")(lambda v, p: v.mean(dim=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("dup", style="function")(lambda v, p: v.sum())
    rewards.register_reward("not_a_reward")(lambda: 3)
    with pytest.raises(ValueError, match="style='function'"):
        rewards.build("not_a_reward")


def test_builtins_registered():
    builtins = {"clip_score", "hpsv2", "pickscore", "aesthetic", "videoalign", "jpeg_compressibility",
                "temporal_flicker", "toy_fidelity"}
    assert builtins <= set(rewards.available())
