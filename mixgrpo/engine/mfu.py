"""Model FLOPs utilisation: achieved model FLOPs over the cards' bf16 dense peak.

The peaks are the vendors' datasheet numbers for dense bf16 tensor-core math (the datasheets print the 2:4-
sparsity number, twice these). A card not in the table has no MFU unless ``MIXGRPO_PEAK_FLOPS`` (FLOP/s per
card, e.g. ``989.4e12``) says its peak; on CPU there is none and the MFU columns are left out.
"""

from __future__ import annotations

import os

PEAK_ENV = "MIXGRPO_PEAK_FLOPS"

# (substring of torch.cuda.get_device_name(), lower case; dense bf16 FLOP/s). First match wins, so the more
# specific names come first ("h100 pcie" before "h100").
BF16_DENSE_PEAK: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989.4e12),      # SXM5 ("NVIDIA H100 80GB HBM3")
    ("h200", 989.4e12),      # same Hopper die and clocks as the H100 SXM, more and faster memory
    ("h800", 989.4e12),
    ("a100", 312e12),        # SXM4 and PCIe alike
    ("b200", 2.25e15),
    ("gb200", 2.5e15),
)


def peak_flops(device_name: str | None, env: dict[str, str] | None = None) -> float | None:
    """Per-card bf16 dense peak for ``device_name`` (None on CPU), the environment override taking precedence."""
    env = os.environ if env is None else env
    override = env.get(PEAK_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ValueError(f"{PEAK_ENV}={override!r} is not a number; give FLOP/s per card, e.g. 989.4e12") from None
        if value <= 0:
            raise ValueError(f"{PEAK_ENV}={override!r} must be > 0 (FLOP/s per card)")
        return value
    if not device_name:
        return None
    name = device_name.lower()
    for key, value in BF16_DENSE_PEAK:
        if key in name:
            return value
    return None


def current_device_name() -> str | None:
    """``torch.cuda.get_device_name()`` of the current card, None without CUDA."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def mfu(flops: float, seconds: float, *, ranks: int, peak: float | None) -> float | None:
    """``flops / (seconds * ranks * peak)``; None when there is no peak or no time was measured."""
    if peak is None or seconds <= 0 or ranks < 1:
        return None
    return flops / (seconds * ranks * peak)


def mfu_metrics(*, flops: dict[str, float], seconds: dict[str, float], ranks: int,
                peak: float | None) -> dict[str, float]:
    """``perf/mfu/<phase>`` for every phase with a peak and a time, plus ``perf/mfu/iteration`` over all phases'
    FLOPs and the ``iteration`` time (when given); empty on CPU."""
    out = {}
    for phase, value in flops.items():
        ratio = mfu(value, seconds.get(phase, 0.0), ranks=ranks, peak=peak)
        if ratio is not None:
            out[f"perf/mfu/{phase}"] = ratio
    if "iteration" in seconds:
        ratio = mfu(sum(flops.values()), seconds["iteration"], ranks=ranks, peak=peak)
        if ratio is not None:
            out["perf/mfu/iteration"] = ratio
    return out


__all__ = ["BF16_DENSE_PEAK", "PEAK_ENV", "current_device_name", "mfu", "mfu_metrics", "peak_flops"]
