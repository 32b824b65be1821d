"""Sliding-window schedulers: which sampler steps are SDE (stored, trained) at each training iteration.

Usage per iteration: ``scheduler.sde_steps()`` (and ``scheduler.train_mask(B)``) for the rollout and the update,
then ``scheduler.advance()``. The state (``state_dict``) is a few ints, so runs resume exactly.

Rules, following MixGRPO's ``GRPOTrainingStates`` (window size w, shift interval tau, stride s):

- ``progressive``: window = steps [start, min(start + w, num_steps)); every tau iterations start += s. When start
  passes the last step (start >= num_steps) it rolls back to the initial start (``roll_back=True``), else it stays
  at num_steps - w (the paper's l <- min(l + s, T - w)). MixGRPO's code clips to num_steps instead, which leaves an
  empty window; we never produce an empty window. ``stride=w`` gives non-overlapping windows, ``stride=0`` a frozen
  one.
- ``decay``: progressive with tau(start) = max(tau_min, int(tau_max * (1 - p) + tau_min * p)), p = start / num_steps.
- ``exp_decay``: progressive with tau(start) = ceil(tau0 * exp(-k * relu(start - threshold))), tau0 = shift_interval.
- ``frozen``: always [start, start + w) (OSP-Next: start 0, w 10; MixGRPO-Flash*: start 0, w 4).
- ``random``: a uniform start in [0, num_steps - w] each iteration, drawn from (seed, iteration) so that the state
  is just the iteration counter.

``num_steps`` is the number of steps the window may cover (MixGRPO passes sampler steps - 2 to never train the
last steps). ``train_fraction`` < 1 trains a random floor(fraction * w) steps of the window per sample (at least
one); DanceGRPO = window over all steps, train_fraction 0.6.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

IntervalFn = Callable[[int], int]


@dataclass(frozen=True)
class Window:
    start: int
    size: int

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.start + self.size))


class WindowScheduler(abc.ABC):
    """Base: holds the iteration counter, the train-step selection and the state protocol."""

    kind: str = ""

    def __init__(self, *, size: int, num_steps: int, train_fraction: float = 1.0, seed: int = 0) -> None:
        self.size, self.num_steps = size, num_steps
        self.train_fraction, self.seed = train_fraction, seed
        self.iteration = 0

    @abc.abstractmethod
    def window(self) -> Window:
        """The window of the current iteration."""

    def sde_steps(self) -> tuple[int, ...]:
        """Sampler step indices that are SDE steps in the current iteration (sorted)."""
        return self.window().steps

    def advance(self) -> None:
        """Move to the next iteration (call once per iteration, after the update)."""
        self.iteration += 1

    def train_mask(self, num_samples: int) -> torch.Tensor:
        """``[B, S]`` bool, S = current window size: which stored steps of each sample are trained.

        All True when train_fraction = 1; else each sample trains floor(fraction * S) (>= 1) steps chosen by a
        generator seeded with (seed, iteration), so the choice is reproducible after a restart.
        """
        num_window = self.window().size
        num_train = max(1, math.floor(self.train_fraction * num_window + 1e-9))
        if num_train >= num_window:
            return torch.ones(num_samples, num_window, dtype=torch.bool)
        gen = torch.Generator().manual_seed(_mix(self.seed, self.iteration, salt=1))
        order = torch.argsort(torch.rand(num_samples, num_window, generator=gen), dim=1)
        mask = torch.zeros(num_samples, num_window, dtype=torch.bool)
        mask.scatter_(1, order[:, :num_train], True)
        return mask

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"window state is for kind={state.get('kind')!r} but this scheduler is {self.kind!r}; "
                             "resume with the same window.kind")
        self.iteration = int(state["iteration"])


class FrozenWindow(WindowScheduler):
    kind = "frozen"

    def __init__(self, *, start: int = 0, **base: Any) -> None:
        super().__init__(**base)
        self.start = start

    def window(self) -> Window:
        return Window(self.start, self.size)


class RandomWindow(WindowScheduler):
    kind = "random"

    def window(self) -> Window:
        gen = torch.Generator().manual_seed(_mix(self.seed, self.iteration, salt=0))
        start = int(torch.randint(0, self.num_steps - self.size + 1, (1,), generator=gen))
        return Window(start, self.size)


class ProgressiveWindow(WindowScheduler):
    """Progressive window; ``interval_fn(start) -> tau`` makes it constant, decay or exp_decay."""

    def __init__(
        self, *, kind: str, interval_fn: IntervalFn, start: int = 0, stride: int = 1, roll_back: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.kind, self.interval_fn = kind, interval_fn
        self.initial_start, self.stride, self.roll_back = start, stride, roll_back
        self.start = start
        self.iters_at_start = 0  # iterations already spent at the current start

    def window(self) -> Window:
        return Window(self.start, min(self.size, self.num_steps - self.start))

    def advance(self) -> None:
        super().advance()
        self.iters_at_start += 1
        # tau is evaluated at the start the window had during these iterations (as MixGRPO does).
        if self.iters_at_start < self.interval_fn(self.start):
            return
        self.iters_at_start = 0
        moved = self.start + self.stride
        if self.roll_back:
            self.start = self.initial_start if moved >= self.num_steps else moved
        else:
            self.start = min(moved, self.num_steps - self.size)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "start": self.start, "iters_at_start": self.iters_at_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.start, self.iters_at_start = int(state["start"]), int(state["iters_at_start"])


def constant_interval(shift_interval: int) -> IntervalFn:
    return lambda start: shift_interval


def linear_decay_interval(max_interval: int, min_interval: int, num_steps: int) -> IntervalFn:
    def interval(start: int) -> int:
        progress = start / num_steps
        return max(min_interval, int(max_interval * (1 - progress) + min_interval * progress))

    return interval


def exp_decay_interval(shift_interval: int, rate: float, threshold: int) -> IntervalFn:
    return lambda start: math.ceil(shift_interval * math.exp(-rate * max(0, start - threshold)))


def build_window_scheduler(
    config: Any = None,
    /,
    *,
    kind: str = "progressive",
    num_steps: int,
    size: int = 4,
    start: int = 0,
    shift_interval: int = 25,
    stride: int = 1,
    roll_back: bool = True,
    max_shift_interval: int = 10,
    min_shift_interval: int = 1,
    decay_rate: float = 0.1,
    decay_threshold: int = 13,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> WindowScheduler:
    """One scheduler from a ``WindowConfig`` (``build_window_scheduler(cfg.window, num_steps=..., seed=...)``) or
    from its fields as keywords; unused knobs of a kind are ignored.

    Args:
        config: a ``WindowConfig`` (or any object with its fields); its values replace the keywords.
        kind: progressive | frozen | random | decay | exp_decay.
        num_steps: steps the window may cover (window steps are < num_steps).
        size: window size w. start: initial (frozen: fixed) window start.
        shift_interval: tau (progressive), tau0 (exp_decay). stride: s. roll_back: restart after the last step.
        max_shift_interval, min_shift_interval: decay's tau at the first and last start.
        decay_rate, decay_threshold: exp_decay's k and threshold.
        train_fraction: fraction of window steps trained per sample. seed: for random windows and step choice.
    """
    if config is not None:
        return build_window_scheduler(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
                                      num_steps=num_steps, seed=seed)
    _check(num_steps >= 1, f"num_steps must be >= 1 (steps the window may cover), got {num_steps}")
    _check(1 <= size <= num_steps, f"window.size must be in [1, num_steps={num_steps}], got {size}; "
           "lower window.size or raise sampler.num_steps")
    _check(0 < train_fraction <= 1, f"window.train_fraction must be in (0, 1], got {train_fraction}")
    base = {"size": size, "num_steps": num_steps, "train_fraction": train_fraction, "seed": seed}
    if kind == "random":
        return RandomWindow(**base)
    _check(0 <= start and start + size <= num_steps,
           f"window.start must be in [0, num_steps - size = {num_steps - size}], got {start}; lower window.start")
    if kind == "frozen":
        return FrozenWindow(start=start, **base)
    builders: dict[str, Callable[[], IntervalFn]] = {
        "progressive": lambda: constant_interval(shift_interval),
        "decay": lambda: linear_decay_interval(max_shift_interval, min_shift_interval, num_steps),
        "exp_decay": lambda: exp_decay_interval(shift_interval, decay_rate, decay_threshold),
    }
    _check(kind in builders, f"window.kind={kind!r} is unknown; choose one of "
           f"{sorted([*builders, 'frozen', 'random'])}")
    _check(stride >= 0, f"window.stride must be >= 0 (0 freezes the window), got {stride}")
    _check(shift_interval >= 1, f"window.shift_interval must be >= 1 iteration, got {shift_interval}")
    if kind == "decay":
        _check(1 <= min_shift_interval <= max_shift_interval,
               f"window.min_shift_interval ({min_shift_interval}) must be in [1, window.max_shift_interval="
               f"{max_shift_interval}]; swap or raise them")
    if kind == "exp_decay":
        _check(decay_rate >= 0, f"window.decay_rate must be >= 0, got {decay_rate}")
    return ProgressiveWindow(kind=kind, interval_fn=builders[kind](), start=start, stride=stride,
                             roll_back=roll_back, **base)


def _mix(seed: int, iteration: int, salt: int) -> int:
    """A distinct 63-bit generator seed per (seed, iteration, purpose), stable across Python versions."""
    digest = hashlib.blake2b(f"{seed}/{iteration}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
