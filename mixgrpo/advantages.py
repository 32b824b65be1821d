"""Group-relative advantages from several rewards.

Shape legend: B samples (groups of G samples share a prompt and its initial noise), G group members.

``compute_advantages`` normalises each reward within its prompt group, ``(r - mean_group) / (std + eps)``, with the
std of the group (MixGRPO, DanceGRPO, OSP-Next) or of the whole batch (Flow-GRPO's ``global_std``); then combines
the rewards:

- ``aggregation="advantage"``: weighted sum of per-reward advantages (MixGRPO's ``advantage_aggr``; weights
  normalised to sum to 1 by default as in its code; ``normalize_weights=False`` gives the paper's plain sum);
- ``aggregation="reward"``: weighted sum of raw rewards, normalised once (MixGRPO's ``reward_aggr``).

The result is clipped to [-clip, clip]. A group whose combined signal is constant (every member scored the same,
so every advantage is exactly 0) carries no gradient: it is marked ``keep=False`` and counted, as Flow-GRPO and
OSP-Next drop such samples. We detect it as max == min within the group rather than ``advantage == 0``, because a
group mean of identical fp32 values is not always bit-equal to them.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch


class AdvantageResult(NamedTuple):
    advantages: torch.Tensor
    """``[B]`` fp32 on the CPU, 0 for filtered samples."""
    keep: torch.Tensor
    """``[B]`` bool, False for samples of constant-reward groups."""
    stats: dict[str, float]
    """``reward/<name>/mean|std``, ``advantage/mean|std|abs_max``, ``advantage/clip_fraction``,
    ``zero_std_fraction`` (filtered groups / groups), ``num_filtered`` (samples), ``num_groups``."""


def compute_advantages(
    rewards: Mapping[str, torch.Tensor],
    group_ids_B: torch.Tensor,
    *,
    weights: Mapping[str, float] | None = None,
    std: str = "group",
    aggregation: str = "advantage",
    normalize_weights: bool = True,
    clip: float | None = 5.0,
    eps: float = 1e-4,
    unbiased: bool = True,
) -> AdvantageResult:
    """Per-reward group z-scores, weighted aggregation, clipping and zero-std filtering.

    Args:
        rewards: name -> ``[B]`` raw scores (finite).
        group_ids_B: ``[B]`` int, equal ids = same prompt group (any labels, any order).
        weights: name -> weight (default 1 each); must name exactly the rewards.
        std: ``"group"`` or ``"global"``: the std that divides (the mean is always the group's).
        aggregation: ``"advantage"`` or ``"reward"``, see the module docstring.
        normalize_weights: divide weights by their sum (needs a positive sum).
        clip: clip the combined advantage to [-clip, clip]; None disables.
        eps: added to the std (MixGRPO 1e-8, Flow-GRPO / OSP-Next 1e-4).
        unbiased: Bessel-corrected std (torch's default, MixGRPO) or population std (numpy, Flow-GRPO).
    """
    names = list(rewards)
    w = _weights(names, weights, normalize_weights)
    group_ids_B = torch.as_tensor(group_ids_B).cpu()  # rewards are tiny: all of this runs on the CPU
    scores = _validated(rewards, group_ids_B)
    _, group_B, counts_G = torch.unique(group_ids_B, return_inverse=True, return_counts=True)
    if std not in ("group", "global"):
        raise ValueError(f"std={std!r} is unknown; choose 'group' (per-prompt std) or 'global' (batch std)")
    if std == "group" and unbiased and bool((counts_G < 2).any()):
        raise ValueError("a prompt group has a single sample, its std is undefined; use rollout.group_size >= 2 "
                         "or std='global'")

    def zscore(values_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return group_zscore(values_B, group_B, counts_G, std=std, eps=eps, unbiased=unbiased)

    if aggregation == "advantage":
        per_reward = [zscore(scores[name]) for name in names]
        adv_B = sum(w[name] * z for name, (z, _) in zip(names, per_reward))
        constant_G = torch.stack([c for _, c in per_reward]).all(dim=0)
    elif aggregation == "reward":
        adv_B, constant_G = zscore(sum(w[name] * scores[name] for name in names))
    else:
        raise ValueError(f"aggregation={aggregation!r} is unknown; choose 'advantage' or 'reward'")

    keep_B = ~constant_G[group_B]
    adv_B = torch.where(keep_B, adv_B, torch.zeros_like(adv_B))
    clipped_B = torch.zeros_like(keep_B)
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0 (or None to disable), got {clip}")
        clipped_B = adv_B.abs() > clip
        adv_B = adv_B.clamp(-clip, clip)
    stats = _stats(scores, adv_B, keep_B, clipped_B, constant_G)
    return AdvantageResult(adv_B, keep_B, stats)


def group_zscore(
    values_B: torch.Tensor,
    group_B: torch.Tensor,
    counts_G: torch.Tensor,
    *,
    std: str = "group",
    eps: float = 1e-4,
    unbiased: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values - group mean) / (std + eps)`` -> ``([B] z, [G] bool constant-group flags)``.

    ``group_B`` holds group indices in [0, G) and ``counts_G`` the group sizes. Constant groups get z = 0 exactly.
    """
    num_groups = counts_G.shape[0]
    values_B = values_B.double()  # fp64 so that group means of large batches do not drift
    mean_G = torch.zeros(num_groups, dtype=values_B.dtype).index_add_(0, group_B, values_B) / counts_G
    dev_B = values_B - mean_G[group_B]
    correction = 1 if unbiased else 0
    if std == "group":
        sq_G = torch.zeros(num_groups, dtype=values_B.dtype).index_add_(0, group_B, dev_B**2)
        std_B = (sq_G / (counts_G - correction)).sqrt()[group_B]
    else:
        std_B = values_B.std(correction=correction).expand_as(values_B)
    lo_G = torch.full((num_groups,), float("inf"), dtype=values_B.dtype).scatter_reduce(0, group_B, values_B, "amin")
    hi_G = torch.full((num_groups,), -float("inf"), dtype=values_B.dtype).scatter_reduce(0, group_B, values_B, "amax")
    constant_G = lo_G == hi_G
    z_B = torch.where(constant_G[group_B], torch.zeros_like(dev_B), dev_B / (std_B + eps))
    return z_B.float(), constant_G


def _weights(names: list[str], weights: Mapping[str, float] | None, normalize: bool) -> dict[str, float]:
    if not names:
        raise ValueError("rewards is empty; configure at least one reward")
    w = {name: 1.0 for name in names} if weights is None else dict(weights)
    if set(w) != set(names):
        raise ValueError(f"weights must name exactly the rewards {sorted(names)}, got {sorted(w)}; "
                         "add or remove weight entries")
    if normalize:
        total = sum(w.values())
        if total <= 0:
            raise ValueError(f"reward weights sum to {total}; make their sum positive or set normalize_weights=False")
        w = {name: value / total for name, value in w.items()}
    return w


def _validated(rewards: Mapping[str, torch.Tensor], group_ids_B: torch.Tensor) -> dict[str, torch.Tensor]:
    if group_ids_B.ndim != 1:
        raise ValueError(f"group_ids_B must be [B], got shape {tuple(group_ids_B.shape)}")
    out = {}
    for name, r in rewards.items():
        r = torch.as_tensor(r).detach().float().cpu()
        if r.shape != group_ids_B.shape:
            raise ValueError(f"reward {name!r} has shape {tuple(r.shape)}, expected [B]={tuple(group_ids_B.shape)}")
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"reward {name!r} has non-finite scores {r.tolist()}; fix the reward instead of "
                             "training on NaN/inf")
        out[name] = r
    return out


def _stats(
    scores: dict[str, torch.Tensor],
    adv_B: torch.Tensor,
    keep_B: torch.Tensor,
    clipped_B: torch.Tensor,
    constant_G: torch.Tensor,
) -> dict[str, float]:
    stats: dict[str, float] = {}
    for name, r in scores.items():
        stats[f"reward/{name}/mean"] = float(r.mean())
        stats[f"reward/{name}/std"] = float(r.std(correction=0))
    stats.update({
        "advantage/mean": float(adv_B.mean()),
        "advantage/std": float(adv_B.std(correction=0)),
        "advantage/abs_max": float(adv_B.abs().max()),
        "advantage/clip_fraction": float(clipped_B.float().mean()),
        "zero_std_fraction": float(constant_G.float().mean()),
        "num_filtered": float((~keep_B).sum()),
        "num_groups": float(constant_G.numel()),
    })
    return stats
