"""Advantages on hand-computed cases."""

import math
import statistics

import pytest
import torch

from mixgrpo.advantages import compute_advantages

EPS = 1e-4


def test_group_zscore_and_zero_std_group_filtered():
    rewards = {"hps": torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])}
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, keep, stats = compute_advantages(rewards, groups, clip=None, eps=EPS)
    # group 0: mean 2, unbiased std 1; group 1: constant -> filtered, advantage exactly 0
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert (adv[3:] == 0).all()
    assert keep.tolist() == [True, True, True, False, False, False]
    assert stats["num_filtered"] == 3 and stats["zero_std_fraction"] == 0.5 and stats["num_groups"] == 2
    assert stats["reward/hps/mean"] == pytest.approx(3.5)


def test_population_std_and_interleaved_group_labels():
    rewards = {"r": torch.tensor([1.0, 10.0, 3.0, 14.0])}
    groups = torch.tensor([7, 2, 7, 2])  # labels need not be 0..G-1 nor contiguous
    adv, _, stats = compute_advantages(rewards, groups, clip=None, eps=0.0, unbiased=False)
    # group 7: [1, 3] mean 2 pop-std 1; group 2: [10, 14] mean 12 pop-std 2
    torch.testing.assert_close(adv, torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    assert stats["num_filtered"] == 0


def test_global_std_uses_the_whole_batch():
    rewards = {"r": torch.tensor([1.0, 3.0, 10.0, 14.0])}
    groups = torch.tensor([0, 0, 1, 1])
    adv, _, _ = compute_advantages(rewards, groups, std="global", clip=None, eps=EPS)
    s = statistics.stdev([1.0, 3.0, 10.0, 14.0])  # sqrt(110 / 3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (s + EPS))


def test_weighted_advantage_aggregation_normalised_and_summed():
    rewards = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.0, 0.0, 3.0])}
    groups = torch.zeros(3, dtype=torch.long)
    a = [-1.0, 0.0, 1.0]  # std 1
    b = [x / math.sqrt(3.0) for x in (-1.0, -1.0, 2.0)]  # mean 1, unbiased std sqrt(3)
    adv, _, _ = compute_advantages(rewards, groups, weights={"a": 1.0, "b": 3.0}, clip=None, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.25 * x + 0.75 * y for x, y in zip(a, b)]))
    adv_sum, _, _ = compute_advantages(rewards, groups, weights={"a": 1.0, "b": 3.0}, clip=None, eps=0.0,
                                       normalize_weights=False)
    torch.testing.assert_close(adv_sum, torch.tensor([x + 3 * y for x, y in zip(a, b)]))


def test_weighted_reward_aggregation_normalises_once():
    rewards = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.0, 0.0, 3.0])}
    groups = torch.zeros(3, dtype=torch.long)
    combined = [0.25 * 1.0, 0.25 * 2.0, 0.25 * 3.0 + 0.75 * 3.0]  # [0.25, 0.5, 3.0]
    m, s = statistics.mean(combined), statistics.stdev(combined)
    adv, _, _ = compute_advantages(rewards, groups, weights={"a": 1.0, "b": 3.0}, aggregation="reward",
                                   clip=None, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([(x - m) / s for x in combined]))


def test_a_group_constant_in_one_reward_only_is_kept():
    rewards = {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([0.0, 1.0, 2.0])}
    adv, _, stats = compute_advantages(rewards, torch.zeros(3, dtype=torch.long), clip=None, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.0, 0.5]))  # a contributes 0, b has weight 1/2
    assert stats["num_filtered"] == 0 and stats["zero_std_fraction"] == 0


def test_clipping_counts_clipped_samples():
    adv, _, stats = compute_advantages({"r": torch.tensor([1.0, 2.0, 3.0])}, torch.zeros(3, dtype=torch.long),
                                       clip=0.5, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.0, 0.5]))
    assert stats["advantage/clip_fraction"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards={"r": torch.tensor([1.0, float("inf")])}), "inf"),
        (dict(rewards={"r": torch.tensor([1.0, 2.0])}, weights={"s": 1.0}), "weights must name"),
        (dict(rewards={"r": torch.tensor([1.0, 2.0])}, weights={"r": -1.0}), "sum"),
        (dict(rewards={"r": torch.tensor([1.0, 2.0])}, std="batch"), "std="),
        (dict(rewards={"r": torch.tensor([1.0, 2.0])}, aggregation="mean"), "aggregation="),
        (dict(rewards={"r": torch.tensor([1.0, 2.0, 3.0])}), "shape"),
        (dict(rewards={}), "empty"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages(group_ids=torch.tensor([0, 0]), **kwargs)


def test_single_sample_group_needs_global_std():
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages({"r": torch.tensor([1.0, 2.0, 3.0])}, torch.tensor([0, 0, 1]))


def test_nan_means_does_not_apply_and_invalid_samples_are_left_out():
    nan = float("nan")
    rewards = {"a": torch.tensor([1.0, 2.0, 3.0, 7.0]), "b": torch.tensor([0.0, nan, 2.0, 100.0])}
    groups = torch.zeros(4, dtype=torch.long)
    valid = torch.tensor([True, True, True, False])  # sample 3 was dropped by the reward set
    adv, keep, stats = compute_advantages(rewards, groups, clip=None, eps=0.0, valid_B=valid)
    # a over samples 0..2: [-1, 0, 1]; b over samples 0, 2 only: [0, 2] -> [-1/sqrt2, 1/sqrt2], sample 1 gets 0
    s = 1 / math.sqrt(2.0)
    torch.testing.assert_close(adv, torch.tensor([0.5 * (-1 - s), 0.0, 0.5 * (1 + s), 0.0]))
    assert stats["reward/b/mean"] == pytest.approx(1.0) and stats["num_filtered"] == 1
    assert keep.tolist() == [True, True, True, False]
    # reward-level aggregation: a NaN in any reward removes the sample from the combined score
    adv_r, keep_r, _ = compute_advantages(rewards, groups, aggregation="reward", clip=None, eps=0.0,
                                          valid_B=valid)
    assert adv_r[1] == 0 and adv_r[3] == 0 and adv_r[0] < 0 < adv_r[2] and keep_r.tolist() == [True, False, True, False]
