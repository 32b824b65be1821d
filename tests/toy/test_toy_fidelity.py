"""toy_fidelity orders videos by how well they match their caption."""

import pytest
import torch

import rewards
import rewards.toy_fidelity  # noqa: F401  (registers the reward)
from policies.toy.world import all_scenes, render_videos

PROMPTS = [s.caption for s in all_scenes()]


@pytest.fixture(scope="module")
def reward():
    return rewards.build("toy_fidelity")


@pytest.fixture(scope="module")
def truth():
    return render_videos(PROMPTS, list(range(len(PROMPTS))), num_frames=8, height=16, width=16)


def _swap(prompt, position, values):
    words = prompt.split()
    words[position] = values[(values.index(words[position]) + 1) % len(values)]
    return " ".join(words)


def test_registered_and_ground_truth_scores_near_the_top(reward, truth):
    assert "toy_fidelity" in rewards.available()
    parts = reward.breakdown(truth, PROMPTS)
    scores = reward(truth, PROMPTS)
    assert scores.shape == (48,) and torch.allclose(scores, parts["total"])
    assert scores.min() >= 0.9, scores.min()
    for name in ("colour", "shape", "direction"):
        assert parts[name].min() >= 0.9, name


@pytest.mark.parametrize(
    "attribute, position, values",
    [
        ("colour", 1, ["red", "green", "blue", "yellow"]),
        ("shape", 2, ["square", "circle", "triangle"]),
        ("direction", 4, ["left", "right", "up", "down"]),
    ],
)
def test_a_wrong_attribute_loses_exactly_that_attribute(reward, truth, attribute, position, values):
    # Scoring the true video against a caption with one attribute changed = a video that got that attribute wrong.
    right = reward.breakdown(truth, PROMPTS)
    wrong = reward.breakdown(truth, [_swap(p, position, values) for p in PROMPTS])
    assert (wrong["total"] < right["total"] - 0.25).all()
    assert wrong[attribute].max() < 0.1
    for other in {"colour", "shape", "direction"} - {attribute}:
        assert torch.allclose(wrong[other], right[other], atol=0.02)


def test_noise_blank_and_static_videos_score_low(reward, truth):
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(truth.shape, generator=gen)
    assert reward(noise, PROMPTS).max() < 0.15
    assert reward(torch.zeros_like(truth), PROMPTS).max() < 0.05
    static = reward.breakdown(truth[:, :1].expand_as(truth), PROMPTS)
    assert static["direction"].max() < 0.05


def test_partial_credit_is_graded(reward, truth):
    """Half the travel, a colour half-way to the target, or mild noise score between wrong and right."""
    prompts = PROMPTS[:12]
    full = reward.breakdown(truth[:12], prompts)
    half_travel = truth[:12, :4].repeat_interleave(2, dim=1)  # first half of the path, slowed down
    half = reward.breakdown(half_travel, prompts)["direction"]
    assert (half > 0.3).all() and (half < full["direction"] - 0.2).all()
    noisy = (truth + 0.08 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    noisy_total = reward(noisy, PROMPTS)
    assert (noisy_total > 0.6).all() and noisy_total.mean() < reward(truth, PROMPTS).mean()


def test_scores_are_deterministic_and_bad_inputs_rejected(reward, truth):
    assert torch.equal(reward(truth[:4], PROMPTS[:4]), reward(truth[:4], PROMPTS[:4]))
    with pytest.raises(ValueError, match="'purple'"):
        reward(truth[:1], ["a purple circle moving left"])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        reward.breakdown(truth[:1] * 2, PROMPTS[:1])
    with pytest.raises(ValueError, match="colour_sigma"):
        rewards.build("toy_fidelity", colour_sigma=0.0)


def test_background_checkerboard_measures_a_2x2_pattern_on_the_background_only(truth):
    from rewards.toy_fidelity import background_checkerboard

    clean = background_checkerboard(truth)
    assert clean.shape == (48,) and clean.max() < 2e-3  # ~5e-4 (RESULTS.md): flat background, object edges excluded
    sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(8, 8)  # +-1 in every 2x2 block
    patterned = background_checkerboard((truth + 0.02 * sign).clamp(0, 1))
    torch.testing.assert_close(patterned, torch.full((48,), 0.02), atol=2e-3, rtol=0)  # |x00 + x11 - x01 - x10| / 4
    noisy = background_checkerboard((truth + 0.02 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0)))
                                    .clamp(0, 1))
    assert (noisy < patterned).all()  # white noise is not a checkerboard
