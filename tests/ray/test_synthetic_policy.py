"""The synthetic benchmark policy: what every Ray worker builds from a config must be the same everywhere."""

import zlib

import pytest
import torch

from mixgrpo.config import load_config
from mixgrpo.engine.policy_factory import build_policy
from policies.synthetic import HashedTextEncoder

TINY = ["policy.kind=synthetic", "policy.preset=tiny", "policy.num_frames=5", "policy.height=64", "policy.width=64",
        "policy.dtype=float32", "policy.num_full_blocks=2", "sampler.num_steps=4", "window.size=2"]


def test_two_builds_have_equal_weights_and_wan_latent_shapes():
    a, b = (build_policy(load_config(None, TINY)) for _ in range(2))
    for (name, x), (_, y) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        assert torch.equal(x, y), name
    assert a.latent_shape() == (4, 2, 8, 8)  # tiny preset: 4 channels; 5 frames -> 2, 64 px -> 8 (Wan 4x / 8x)
    video = a.decode(torch.randn(1, *a.latent_shape()))
    assert video.shape == (1, 2, 3, 8, 8) and 0 <= video.min() and video.max() <= 1


def test_text_states_come_from_a_stable_hash_of_the_prompt():
    # Python's hash() of a str is salted per process (workers would disagree); crc32 is the same everywhere.
    states = HashedTextEncoder(8, 4)(["a red ball", "a red ball", "a blue ball"])
    expected = torch.randn(4, 8, generator=torch.Generator().manual_seed(zlib.crc32(b"a red ball")))
    assert torch.equal(states[0], expected) and torch.equal(states[1], expected)
    assert not torch.equal(states[0], states[2])


def test_a_video_size_the_latents_cannot_hold_names_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"policy.num_frames must be 4n\+1.*use 5 or 9"):
        build_policy(load_config(None, [*TINY, "policy.num_frames=6"]))
