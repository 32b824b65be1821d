"""open_clip rewards at their architecture with seeded random weights (benchmarks), on a tiny config."""

import pytest
import torch

import rewards
from reward_fixtures import random_videos


def test_clip_score_random_init_scores_and_is_seeded(tiny_open_clip):
    videos = random_videos(2, h=32, w=32)
    first = rewards.build("clip_score", arch=tiny_open_clip["arch"], random_init=True, num_frames=2)
    second = rewards.build("hpsv2", arch=tiny_open_clip["arch"], random_init=True, num_frames=2)
    a, b = first(videos, ["a cat", "a dog"]), second(videos, ["a cat", "a dog"])
    assert a.shape == (2,) and torch.isfinite(a).all() and a.abs().max() <= 1.0 + 1e-6
    assert torch.allclose(a, b)  # same seed, same architecture: the same random model in every process


def test_checkpoint_xor_random_init(tiny_open_clip):
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        rewards.build("clip_score", arch=tiny_open_clip["arch"])
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        rewards.build("clip_score", arch=tiny_open_clip["arch"], checkpoint=tiny_open_clip["checkpoint"],
                      random_init=True)
