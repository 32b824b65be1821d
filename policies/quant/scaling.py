"""Per-tensor scaling for HiF8 fake quantization: current (just-in-time) and delayed (amax history).

A tensor t is quantized as ``hif8_round(t * s) / s`` with ``s = target_max / max(amax, 1e-8)``, the
OSP-Next recipe: amax maps to 15 for activations, weights and Q/K/V (the top of HiF8's 3-mantissa-bit
band, 1.875 * 2^3) and to 224 for gradients (the top of the 2-bit band, 1.75 * 2^7). The scale is one
fp32 division of fp32 tensors; the Triton kernel repeats exactly these fp32 ops so both paths agree
bit for bit.

Both scalers expose ``amax_for(x, reduce=None)``: the amax the scale is computed from. ``reduce`` maps this
call's amax to the amax of the whole tensor when ``x`` is one rank's shard of it (an all-reduce MAX over the
sequence-parallel group): the scale, and so every quantized value, then equals the single-device run's. Current scaling returns x's
own amax. Delayed scaling returns the largest amax of the previous ``history_len`` calls (x's own amax
on the first call), then records x's amax. Delayed scaling is stateful: rollouts and the learner's
recomputation see different scales, so rollout/learner log-prob parity (ratio == 1) needs current
scaling; delayed is for plain fine-tuning. A recomputed forward (activation checkpointing) records twice.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

__all__ = [
    "FORWARD_TARGET_MAX",
    "BACKWARD_TARGET_MAX",
    "AMAX_FLOOR",
    "tensor_amax",
    "amax_to_scale",
    "Scaler",
    "CurrentScaler",
    "DelayedScaler",
]

FORWARD_TARGET_MAX = 15.0
BACKWARD_TARGET_MAX = 224.0
AMAX_FLOOR = 1e-8  # keeps all-zero tensors finite: their scale is large but their values stay 0


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-d float32 tensor (exact in any float dtype; NaN if x holds a NaN)."""
    return torch.linalg.vector_norm(x.detach(), ord=float("inf")).to(torch.float32)


def amax_to_scale(amax: torch.Tensor, target_max: float) -> torch.Tensor:
    """fp32 scale mapping ``amax`` to ``target_max``: target_max / max(amax, 1e-8).

    Written as a tensor-by-tensor division on purpose: ``python_float / tensor`` is computed by torch as
    ``reciprocal(tensor) * python_float``, which rounds twice and would not match the Triton kernel.
    """
    amax = amax.to(torch.float32).clamp_min(AMAX_FLOOR)
    return torch.full_like(amax, target_max).div(amax)


AmaxReduce = Callable[[torch.Tensor], torch.Tensor]


class Scaler(Protocol):
    target_max: float

    def amax_for(self, x: torch.Tensor, reduce: AmaxReduce | None = None) -> torch.Tensor: ...


def _check_target_max(target_max: float) -> None:
    if not (isinstance(target_max, (int, float)) and 0 < target_max <= 32768):
        raise ValueError(f"target_max must be a number in (0, 32768], got {target_max!r}; use 15 (forward) or 224 (grads)")


class CurrentScaler:
    """Stateless per-tensor scaling from the tensor's own amax (OSP-Next, MindSpeed 'tensorwise')."""

    def __init__(self, *, target_max: float) -> None:
        _check_target_max(target_max)
        self.target_max = float(target_max)

    def amax_for(self, x: torch.Tensor, reduce: AmaxReduce | None = None) -> torch.Tensor:
        amax = tensor_amax(x)
        return amax if reduce is None else reduce(amax)

    def __repr__(self) -> str:
        return f"CurrentScaler(target_max={self.target_max})"


class DelayedScaler:
    """Per-tensor scaling from the max of an amax history over the previous ``history_len`` calls.

    The history is a ring buffer (float32 ``[history_len]``, zeros = empty slots) kept on the device of
    the tensors it sees, so recording needs no host sync. Save it with ``state_dict()``.
    """

    def __init__(self, *, target_max: float, history_len: int = 16) -> None:
        _check_target_max(target_max)
        if not (isinstance(history_len, int) and history_len >= 1):
            raise ValueError(f"history_len must be an int >= 1, got {history_len!r}; 16 is a sensible default")
        self.target_max = float(target_max)
        self.history_len = history_len
        self.amax_history = torch.zeros(history_len, dtype=torch.float32)
        self.num_observed = 0

    def amax_for(self, x: torch.Tensor, reduce: AmaxReduce | None = None) -> torch.Tensor:
        current = tensor_amax(x)
        if reduce is not None:
            current = reduce(current)
        if self.amax_history.device != current.device:
            self.amax_history = self.amax_history.to(current.device)
        used = current if self.num_observed == 0 else self.amax_history.max()
        self.amax_history[self.num_observed % self.history_len] = current
        self.num_observed += 1
        return used

    def reset(self) -> None:
        """Forget the history, e.g. after a non-finite step (the next call falls back to current scaling)."""
        self.amax_history = torch.zeros_like(self.amax_history)
        self.num_observed = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "target_max": self.target_max,
            "history_len": self.history_len,
            "amax_history": self.amax_history.detach().cpu().clone(),
            "num_observed": self.num_observed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["history_len"] != self.history_len or state["target_max"] != self.target_max:
            raise ValueError(
                f"scaler state has history_len={state['history_len']}, target_max={state['target_max']} but this "
                f"scaler has history_len={self.history_len}, target_max={self.target_max}; apply HiF8 with the "
                "settings the state was saved with"
            )
        history = state["amax_history"]
        if history.shape != (self.history_len,):
            raise ValueError(f"amax_history must have shape ({self.history_len},), got {tuple(history.shape)}")
        self.amax_history = history.to(device=self.amax_history.device, dtype=torch.float32).clone()
        self.num_observed = int(state["num_observed"])

    def __repr__(self) -> str:
        return f"DelayedScaler(target_max={self.target_max}, history_len={self.history_len})"
