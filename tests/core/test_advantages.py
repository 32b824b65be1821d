"""Advantages on hand-computed cases; the trainer's entry point (dropped groups, events, failure streak)."""

import math
import statistics

import pytest
import torch

from mixgrpo.algo.advantages import (
    NO_SCORES,
    DroppedGroup,
    FailureStreak,
    NothingTrainedError,
    advantages_from_scores,
    compute_advantages,
    finite_mean_std,
)

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
    # The rewards' statistics have one home, the metrics' finite_mean_std (sample std, NaN left out).
    assert not any(key.startswith("reward/") for key in stats)
    assert finite_mean_std(rewards["hps"]) == pytest.approx((3.5, float(rewards["hps"].std())))


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
    assert finite_mean_std(torch.where(valid, rewards["b"], nan)) == pytest.approx((1.0, math.sqrt(2.0)))
    assert stats["num_filtered"] == 1
    assert keep.tolist() == [True, True, True, False]
    # reward-level aggregation: sample 1 keeps a's share of the weighted sum (TRL's nansum, not re-weighted)
    adv_r, keep_r, _ = compute_advantages(rewards, groups, aggregation="reward", clip=None, eps=0.0,
                                          valid_B=valid)
    combined = [0.5 * 1 + 0.5 * 0, 0.5 * 2, 0.5 * 3 + 0.5 * 2]
    m, sd = statistics.mean(combined), statistics.stdev(combined)
    torch.testing.assert_close(adv_r, torch.tensor([(x - m) / sd for x in combined] + [0.0]))
    assert keep_r.tolist() == [True, True, True, False]


# ---- advantages_from_scores: TRL's None rule, dropped groups and their reasons ----

NAN = float("nan")


def test_a_reward_returning_none_keeps_the_group_and_matches_a_hand_computation():
    # b returned None (NaN) for sample 1: the group keeps b's z-scores over its three scored members and a's over all
    raw = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 6.0, 8.0]),
           "b": torch.tensor([0.0, NAN, 2.0, 4.0, 1.0, 2.0, 3.0, 4.0])}
    report = advantages_from_scores(raw, [0, 0, 0, 0, 1, 1, 1, 1], weights={"a": 1.0, "b": 1.0}, clip=None, eps=0.0)

    def z(values):
        m, sd = statistics.mean(values), statistics.stdev(values)
        return [(v - m) / sd for v in values]

    z_a = z([1, 2, 3, 4]) + z([5, 5, 6, 8])
    z_b = [z([0, 2, 4])[0], 0.0, *z([0, 2, 4])[1:]] + z([1, 2, 3, 4])  # the missing score contributes 0
    torch.testing.assert_close(report.advantages, torch.tensor([0.5 * x + 0.5 * y for x, y in zip(z_a, z_b)]))
    assert report.keep.all() and report.dropped == [] and report.trainable and report.events() == []
    assert report.stats["dropped_groups"] == 0 and report.stats["num_groups"] == 2


def test_reward_aggregation_sums_the_rewards_that_scored_and_leaves_out_unscored_samples():
    raw = {"a": torch.tensor([1.0, 2.0, NAN, 4.0]), "b": torch.tensor([2.0, NAN, NAN, 0.0])}
    report = advantages_from_scores(raw, ["p", "p", "p", "p"], weights={"a": 1.0, "b": 3.0}, aggregation="reward",
                                    clip=None, eps=0.0)
    combined = [0.25 * 1 + 0.75 * 2, 0.25 * 2, 0.25 * 4 + 0.75 * 0]  # sample 2: no reward scored it
    m, sd = statistics.mean(combined), statistics.stdev(combined)
    expected = [(x - m) / sd for x in combined]
    torch.testing.assert_close(report.advantages, torch.tensor(expected[:2] + [0.0] + expected[2:]))
    assert report.keep.tolist() == [True, True, False, True] and report.dropped == []
    assert report.stats["num_filtered"] == 1


def test_a_reward_that_scored_one_member_of_a_group_contributes_nothing_there():
    raw = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([NAN, 7.0, NAN])}  # b's std is undefined
    report = advantages_from_scores(raw, [0, 0, 0], weights={"a": 1.0, "b": 1.0}, clip=None, eps=0.0)
    torch.testing.assert_close(report.advantages, torch.tensor([-0.5, 0.0, 0.5]))  # b's share is 0, as if constant
    assert report.keep.all()


def test_a_group_no_reward_scored_is_dropped_with_its_reason_and_events():
    raw = {"a": torch.tensor([1.0, 2.0, NAN, NAN]), "b": torch.tensor([3.0, 1.0, NAN, NAN])}
    report = advantages_from_scores(raw, [10, 10, 11, 11], weights={"a": 1.0, "b": 1.0}, clip=None, eps=0.0)
    assert report.dropped == [DroppedGroup(11, NO_SCORES, 2)] and report.keep.tolist() == [True, True, False, False]
    alone = advantages_from_scores({k: v[:2] for k, v in raw.items()}, [10, 10], weights={"a": 1.0, "b": 1.0},
                                   clip=None, eps=0.0)
    torch.testing.assert_close(report.advantages[:2], alone.advantages)
    assert report.stats["dropped_groups"] == 1 and report.stats["num_groups"] == 1  # stats: the kept groups only
    assert report.events() == [("group_dropped", {
        "group": 11, "reason": "no reward scored any sample", "samples": 2,
        "message": "group 11 (2 samples) dropped: no reward scored any sample"})]


def test_groups_dropped_by_the_scoring_service_keep_its_reason():
    raw = {"a": torch.tensor([1.0, NAN, 3.0, 4.0])}
    reason = "reward 'a' failed for sample 's1' under on_error=drop"
    report = advantages_from_scores(raw, ["x", "x", "y", "y"], weights={"a": 1.0}, dropped={"x": reason})
    assert report.dropped == [DroppedGroup("x", reason, 2)] and report.keep.tolist() == [False, False, True, True]
    assert report.advantages[:2].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="not in group_ids"):
        advantages_from_scores(raw, ["x", "x", "y", "y"], weights={"a": 1.0}, dropped={"z": reason})
    with pytest.raises(ValueError, match=r"\[B\]=\(3,\)"):
        advantages_from_scores(raw, ["x", "x", "y"], weights={"a": 1.0})


def test_nothing_trainable_is_an_event_with_the_reason():
    raw = {"a": torch.tensor([NAN, NAN, 5.0, 5.0])}
    report = advantages_from_scores(raw, [0, 0, 1, 1], weights={"a": 1.0})
    assert not report.trainable and report.advantages.tolist() == [0.0] * 4
    kinds = [kind for kind, _ in report.events()]
    assert kinds == ["group_dropped", "no_trainable_group"]
    fields = report.events()[-1][1]
    assert fields["groups"] == 2 and fields["dropped_groups"] == 1 and fields["zero_std_groups"] == 1
    assert fields["reason"] == ("1 of 2 groups dropped (group 0: no reward scored any sample); 1 of 2 groups had no "
                                "spread (equal scores for every scored member)")
    everything_dropped = advantages_from_scores({"a": torch.full((4,), NAN)}, [0, 0, 1, 1], weights={"a": 1.0})
    assert everything_dropped.stats["num_groups"] == 0 and everything_dropped.stats["dropped_groups"] == 2
    assert math.isnan(everything_dropped.stats["advantage/mean"])  # same columns every iteration, no made-up values


def legacy_trainer_advantages(raw, keep_B, group_ids, group_size, weights, **cfg):
    """Trainer.advantages before advantages_from_scores (a NaN anywhere dropped its whole group), for comparison."""
    usable = keep_B.clone()
    for values in raw.values():
        usable &= ~values.isnan()
    usable = torch.stack([usable[group_ids == g].all() for g in group_ids])
    advantages, keep = torch.zeros(len(group_ids)), torch.zeros(len(group_ids), dtype=torch.bool)
    stats = {"dropped_groups": float((~usable).sum()) / group_size}
    if usable.any():
        result = compute_advantages({k: v[usable] for k, v in raw.items()}, group_ids[usable], weights=weights, **cfg)
        advantages[usable], keep[usable] = result.advantages, result.keep
        stats.update(result.stats)
    return advantages, keep, stats


@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("aggregation", ["advantage", "reward"])
def test_same_as_the_old_trainer_rule_when_every_score_is_finite(std, aggregation):
    g = torch.Generator().manual_seed(0)
    raw = {"a": torch.randn(16, generator=g), "b": torch.rand(16, generator=g)}
    raw["a"][4:8] = 0.5  # group 1 constant in a ...
    raw["b"][4:8] = 0.25  # ... and in b: filtered as zero-std by both
    group_ids = torch.arange(4).repeat_interleave(4)
    cfg = dict(std=std, aggregation=aggregation, clip=1.5, eps=1e-4)
    weights = {"a": 1.0, "b": 3.0}
    keep_all = torch.ones(16, dtype=torch.bool)
    old = legacy_trainer_advantages(raw, keep_all, group_ids, 4, weights, **cfg)
    new = advantages_from_scores(raw, group_ids, weights=weights, **cfg)
    torch.testing.assert_close(new.advantages, old[0], rtol=0, atol=0)
    assert new.keep.tolist() == old[1].tolist() and new.stats == old[2]
    # a reward call failed for sample 9 under on_error=drop: the table's NaN and its group 2 go, in both versions
    failed = {k: v.clone() for k, v in raw.items()}
    failed["a"][9] = NAN
    old = legacy_trainer_advantages(failed, group_ids != 2, group_ids, 4, weights, **cfg)
    new = advantages_from_scores(failed, group_ids, weights=weights, dropped={2: "reward 'a' failed"}, **cfg)
    torch.testing.assert_close(new.advantages, old[0], rtol=0, atol=0)
    assert new.keep.tolist() == old[1].tolist() and new.stats == old[2]


def test_failure_streak_counts_iterations_in_a_row_and_stops_the_run():
    trained = advantages_from_scores({"a": torch.tensor([1.0, 2.0])}, [0, 0], weights={"a": 1.0})
    nothing = advantages_from_scores({"a": torch.tensor([NAN, NAN])}, [0, 0], weights={"a": 1.0})
    streak = FailureStreak(2)
    assert [streak.record(r) for r in (nothing, trained, nothing)] == [1, 0, 1]  # a trained iteration resets it
    with pytest.raises(NothingTrainedError, match=r"2 iterations in a row \(last: 1 of 1 groups dropped \(group 0: "
                                                  r"no reward scored any sample\)\).*train.max_failed_iterations"):
        streak.record(nothing)
    with pytest.raises(ValueError, match="max_failed_iterations"):
        FailureStreak(0)
    redone = FailureStreak(2)  # an iteration redone after a worker fault counts once
    assert [redone.record(nothing, 0), redone.record(nothing, 0), redone.record(trained, 1)] == [1, 1, 0]


def test_finite_mean_std_leaves_nan_out_and_is_the_sample_std():
    nan = float("nan")
    assert finite_mean_std(torch.tensor([1.0, nan, 3.0])) == pytest.approx((2.0, math.sqrt(2.0)))
    assert finite_mean_std(torch.tensor([4.0, nan])) == (4.0, 0.0)  # one score: no spread
    mean, std = finite_mean_std(torch.tensor([nan, nan]))
    assert math.isnan(mean) and std == 0.0
