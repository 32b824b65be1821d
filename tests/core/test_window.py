"""Window positions over iterations for every scheduler, against hand-written sequences."""

import pytest
import torch

from mixgrpo.algo.window import build_window_scheduler


def _windows(sched, n):
    out = []
    for _ in range(n):
        w = sched.window()
        out.append((w.start, w.size))
        sched.advance()
    return out


def test_progressive_moves_every_tau_and_rolls_back():
    sched = build_window_scheduler(kind="progressive", num_steps=4, size=2, shift_interval=2, stride=1)
    expected = [(0, 2), (0, 2), (1, 2), (1, 2), (2, 2), (2, 2), (3, 1), (3, 1), (0, 2), (0, 2)]
    assert _windows(sched, 10) == expected


def test_progressive_without_roll_back_stops_at_the_last_full_window():
    sched = build_window_scheduler(kind="progressive", num_steps=4, size=2, shift_interval=1, stride=1,
                                   roll_back=False)
    assert _windows(sched, 6) == [(0, 2), (1, 2), (2, 2), (2, 2), (2, 2), (2, 2)]


def test_progressive_stride_and_initial_start():
    sched = build_window_scheduler(kind="progressive", num_steps=6, size=2, start=1, shift_interval=1, stride=2)
    # 1 -> 3 -> 5 (truncated to one step) -> 7 >= 6 rolls back to the initial start 1
    assert _windows(sched, 5) == [(1, 2), (3, 2), (5, 1), (1, 2), (3, 2)]
    assert sched.sde_steps() == (5,)


def test_progressive_mixgrpo_recipe_coverage():
    # T = 25 sampler steps, max_timesteps = 23, w = 4, tau = 25, s = 1, 300 iterations: starts 0..11 only.
    sched = build_window_scheduler(kind="progressive", num_steps=23, size=4, shift_interval=25, stride=1)
    starts = [start for start, _ in _windows(sched, 300)]
    assert starts == [i // 25 for i in range(300)]


def test_frozen_window_never_moves():
    sched = build_window_scheduler(kind="frozen", num_steps=25, size=10, start=0, shift_interval=1)
    assert _windows(sched, 4) == [(0, 10)] * 4
    assert sched.sde_steps() == tuple(range(10))


def test_decay_linear_interval():
    # tau(start) = max(1, int(3 * (1 - start/4) + 1 * start/4)) = 3, 2, 2, 1 for start 0..3
    sched = build_window_scheduler(kind="decay", num_steps=4, size=1, max_shift_interval=3, min_shift_interval=1)
    starts = [s for s, _ in _windows(sched, 10)]
    assert starts == [0, 0, 0, 1, 1, 2, 2, 3, 0, 0]


def test_exp_decay_interval():
    # tau(start) = ceil(3 * exp(-1 * relu(start - 1))) = 3, 3, 2, 1 for start 0..3
    sched = build_window_scheduler(kind="exp_decay", num_steps=4, size=1, shift_interval=3, decay_rate=1.0,
                                   decay_threshold=1)
    starts = [s for s, _ in _windows(sched, 10)]
    assert starts == [0, 0, 0, 1, 1, 1, 2, 2, 3, 0]


def test_random_window_is_in_range_seeded_and_varies():
    a = _windows(build_window_scheduler(kind="random", num_steps=10, size=4, seed=3), 30)
    b = _windows(build_window_scheduler(kind="random", num_steps=10, size=4, seed=3), 30)
    c = _windows(build_window_scheduler(kind="random", num_steps=10, size=4, seed=4), 30)
    assert a == b and a != c
    assert all(0 <= s <= 6 and size == 4 for s, size in a)
    assert len({s for s, _ in a}) >= 4


@pytest.mark.parametrize("kind", ["progressive", "decay", "exp_decay", "random", "frozen"])
def test_state_round_trip_resumes_the_same_sequence(kind):
    params = dict(kind=kind, num_steps=6, size=2, shift_interval=2, max_shift_interval=3, decay_threshold=1,
                  train_fraction=0.5, seed=7)
    first = build_window_scheduler(**params)
    _windows(first, 7)
    state = first.state_dict()
    resumed = build_window_scheduler(**params)
    resumed.load_state_dict(state)
    assert torch.equal(first.train_mask(5), resumed.train_mask(5))
    assert _windows(resumed, 12) == _windows(first, 12)


def test_load_state_of_another_kind_is_refused():
    state = build_window_scheduler(kind="frozen", num_steps=6, size=2).state_dict()
    with pytest.raises(ValueError, match="same window.kind"):
        build_window_scheduler(kind="progressive", num_steps=6, size=2).load_state_dict(state)


def test_train_mask_fraction():
    # DanceGRPO: SDE on all 24 trainable steps, a random int(0.6 * 24) = 14 of them trained per sample
    sched = build_window_scheduler(kind="frozen", num_steps=24, size=24, train_fraction=0.6, seed=1)
    mask = sched.train_mask(6)
    assert mask.shape == (6, 24) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [14] * 6
    assert len({tuple(row.tolist()) for row in mask}) > 1  # per-sample choice
    sched.advance()
    assert not torch.equal(sched.train_mask(6), mask)  # per-iteration choice
    full = build_window_scheduler(kind="frozen", num_steps=10, size=4).train_mask(3)
    assert full.all() and full.shape == (3, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="sliding", num_steps=10, size=2), "window.kind"),
        (dict(kind="progressive", num_steps=10, size=11), "window.size"),
        (dict(kind="progressive", num_steps=10, size=4, start=7), "window.start"),
        (dict(kind="progressive", num_steps=10, size=4, shift_interval=0), "window.shift_interval"),
        (dict(kind="progressive", num_steps=10, size=4, stride=-1), "window.stride"),
        (dict(kind="decay", num_steps=10, size=4, min_shift_interval=5, max_shift_interval=2), "min_shift_interval"),
        (dict(kind="frozen", num_steps=10, size=4, train_fraction=0.0), "train_fraction"),
    ],
)
def test_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_window_scheduler(**kwargs)
