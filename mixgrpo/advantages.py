"""Group-relative advantages from several rewards.

Shape legend: B samples (groups of G samples share a prompt and its initial noise), G group members.

``compute_advantages`` normalises each reward within its prompt group, ``(r - mean_group) / (std + eps)``, with the
std of the group (MixGRPO, DanceGRPO, OSP-Next) or of the whole batch (Flow-GRPO's ``global_std``); then combines
the rewards:

- ``aggregation="advantage"``: weighted sum of per-reward advantages (MixGRPO's ``advantage_aggr``; weights
  normalised to sum to 1 by default as in its code; ``normalize_weights=False`` gives the paper's plain sum);
- ``aggregation="reward"``: weighted sum of raw rewards, normalised once (MixGRPO's ``reward_aggr``).

The result is clipped to [-clip, clip].

Filtering: a group whose scores are all equal carries no gradient; its advantages are set to exactly 0, its samples
get ``keep=False`` and it is counted (``zero_std_fraction``, ``num_filtered``), as Flow-GRPO and OSP-Next drop
such samples. We detect such groups as max == min rather than ``advantage == 0``, because a group mean of identical fp32
values is not always bit-equal to them.

NaN scores mean "this reward does not apply to this sample" (the reward set never fills in a default): the sample
is left out of that reward's statistics and gets no advantage from it. ``valid_B`` removes samples entirely (e.g.
groups the reward set dropped after a failure): advantage 0, excluded from every statistic.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch


class AdvantageResult(NamedTuple):
    advantages: torch.Tensor
    """``[B]`` fp32 on the CPU; exactly 0 for filtered and invalid samples."""
    keep: torch.Tensor
    """``[B]`` bool: False for samples of zero-std groups and samples with no valid score (skip them in the update)."""
    stats: dict[str, float]
    """``reward/<name>/mean|std`` (over valid, non-NaN scores), ``advantage/mean|std|abs_max|clip_fraction``,
    ``zero_std_fraction`` (filtered groups / groups), ``num_filtered`` (samples with keep False), ``num_groups``."""


def compute_advantages(
    rewards: Mapping[str, torch.Tensor],
    group_ids: torch.Tensor,
    *,
    weights: Mapping[str, float] | None = None,
    std: str = "group",
    aggregation: str = "advantage",
    normalize_weights: bool = True,
    clip: float | None = 5.0,
    eps: float = 1e-4,
    unbiased: bool = True,
    valid_B: torch.Tensor | None = None,
) -> AdvantageResult:
    """Per-reward group z-scores, weighted aggregation, clipping and zero-std filtering.

    Args:
        rewards: name -> ``[B]`` raw scores (finite, or NaN for "does not apply"; inf is refused).
        group_ids: ``[B]`` int, equal ids = same prompt group (any labels, any order).
        weights: name -> weight (default 1 each); must name exactly the rewards.
        std: ``"group"`` or ``"global"``: the std that divides (the mean is always the group's).
        aggregation: ``"advantage"`` or ``"reward"``, see the module docstring.
        normalize_weights: divide weights by their sum (needs a positive sum).
        clip: clip the combined advantage to [-clip, clip]; None disables.
        eps: added to the std (MixGRPO 1e-8, Flow-GRPO / OSP-Next 1e-4).
        unbiased: Bessel-corrected std (torch's default, MixGRPO) or population std (numpy, Flow-GRPO).
        valid_B: ``[B]`` bool, False = leave the sample out entirely (default: all valid).

    Returns:
        :class:`AdvantageResult` ``(advantages, keep, stats)``.
    """
    names = list(rewards)
    w = _weights(names, weights, normalize_weights)
    group_ids = torch.as_tensor(group_ids).cpu()  # rewards are tiny: all of this runs on the CPU
    scores = _validated(rewards, group_ids, valid_B)
    _, group_B, counts_G = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if std not in ("group", "global"):
        raise ValueError(f"std={std!r} is unknown; choose 'group' (per-prompt std) or 'global' (batch std)")
    if std == "group" and unbiased and bool((counts_G < 2).any()):
        raise ValueError("a prompt group has a single sample, its std is undefined; use rollout.group_size >= 2 "
                         "or std='global'")

    def zscore(values_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return group_zscore(values_B, group_B, counts_G.shape[0], std=std, eps=eps, unbiased=unbiased)

    if aggregation == "advantage":
        per_reward = [zscore(scores[name]) for name in names]
        adv_B = sum(w[name] * z for name, (z, _) in zip(names, per_reward))
        informative_G = torch.stack([inf for _, inf in per_reward]).any(dim=0)
        scored_B = torch.stack([torch.isfinite(scores[name]) for name in names]).any(dim=0)
    elif aggregation == "reward":
        combined_B = sum(w[name] * scores[name] for name in names)  # NaN if any reward is NaN
        adv_B, informative_G = zscore(combined_B)
        scored_B = torch.isfinite(combined_B)
    else:
        raise ValueError(f"aggregation={aggregation!r} is unknown; choose 'advantage' or 'reward'")

    kept_B = informative_G[group_B] & scored_B
    adv_B = torch.where(kept_B, adv_B, torch.zeros_like(adv_B))
    clipped_B = torch.zeros_like(kept_B)
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0 (or None to disable), got {clip}")
        clipped_B = adv_B.abs() > clip
        adv_B = adv_B.clamp(-clip, clip)
    return AdvantageResult(adv_B, kept_B, _stats(scores, adv_B, kept_B, clipped_B, informative_G))


def group_zscore(
    values_B: torch.Tensor,
    group_B: torch.Tensor,
    num_groups: int,
    *,
    std: str = "group",
    eps: float = 1e-4,
    unbiased: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values - group mean) / (std + eps)`` over the finite values -> ``([B] z, [G] bool informative)``.

    ``group_B`` holds group indices in [0, num_groups). A group is informative when its finite values are not all
    equal (so at least two); NaN samples and uninformative groups get z = 0 exactly.
    """
    finite_B = torch.isfinite(values_B)
    v_B = torch.where(finite_B, values_B.double(), 0.0)  # fp64: group sums of large batches do not drift
    zeros_G = torch.zeros(num_groups, dtype=torch.float64)
    n_G = zeros_G.index_add(0, group_B, finite_B.double())
    mean_G = zeros_G.index_add(0, group_B, v_B) / n_G.clamp(min=1)
    dev_B = torch.where(finite_B, v_B - mean_G[group_B], 0.0)
    correction = 1 if unbiased else 0
    if std == "group":
        sq_G = zeros_G.index_add(0, group_B, dev_B**2)
        std_B = (sq_G / (n_G - correction).clamp(min=1)).sqrt()[group_B]
    else:
        finite_values = v_B[finite_B]
        global_std = finite_values.std(correction=correction) if finite_values.numel() > 1 else v_B.new_zeros(())
        std_B = global_std.expand_as(v_B)
    lo_G = torch.full((num_groups,), float("inf"), dtype=torch.float64)
    lo_G = lo_G.scatter_reduce(0, group_B, torch.where(finite_B, v_B, float("inf")), "amin")
    hi_G = torch.full((num_groups,), -float("inf"), dtype=torch.float64)
    hi_G = hi_G.scatter_reduce(0, group_B, torch.where(finite_B, v_B, -float("inf")), "amax")
    informative_G = lo_G < hi_G
    z_B = torch.where(finite_B & informative_G[group_B], dev_B / (std_B + eps), 0.0)
    return z_B.float(), informative_G


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


def _validated(
    rewards: Mapping[str, torch.Tensor], group_ids: torch.Tensor, valid_B: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    if group_ids.ndim != 1:
        raise ValueError(f"group_ids must be [B], got shape {tuple(group_ids.shape)}")
    if valid_B is not None and tuple(valid_B.shape) != tuple(group_ids.shape):
        raise ValueError(f"valid_B must be [B]={tuple(group_ids.shape)}, got {tuple(valid_B.shape)}")
    out = {}
    for name, r in rewards.items():
        r = torch.as_tensor(r).detach().float().cpu()
        if r.shape != group_ids.shape:
            raise ValueError(f"reward {name!r} has shape {tuple(r.shape)}, expected [B]={tuple(group_ids.shape)}")
        if bool(torch.isinf(r).any()):
            raise ValueError(f"reward {name!r} returned inf scores {r.tolist()}; fix the reward (NaN means "
                             "'does not apply', inf has no meaning)")
        if valid_B is not None:
            r = torch.where(valid_B.cpu().bool(), r, float("nan"))
        out[name] = r
    return out


def _stats(
    scores: dict[str, torch.Tensor],
    adv_B: torch.Tensor,
    kept_B: torch.Tensor,
    clipped_B: torch.Tensor,
    informative_G: torch.Tensor,
) -> dict[str, float]:
    stats: dict[str, float] = {}
    for name, r in scores.items():
        finite = r[torch.isfinite(r)]
        stats[f"reward/{name}/mean"] = float(finite.mean()) if finite.numel() else float("nan")
        stats[f"reward/{name}/std"] = float(finite.std(correction=0)) if finite.numel() else float("nan")
    stats.update({
        "advantage/mean": float(adv_B.mean()),
        "advantage/std": float(adv_B.std(correction=0)),
        "advantage/abs_max": float(adv_B.abs().max()),
        "advantage/clip_fraction": float(clipped_B.float().mean()),
        "zero_std_fraction": float((~informative_G).float().mean()),
        "num_filtered": float((~kept_B).sum()),
        "num_groups": float(informative_G.numel()),
    })
    return stats
