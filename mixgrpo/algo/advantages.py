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

Missing scores follow TRL's rule for a reward that returns None: NaN means "this reward did not score this sample"
(the reward set never fills in a default), and the sample keeps the other rewards' contribution.

- ``aggregation="advantage"``: a reward's group statistics use its finite members only, and a sample it did not
  score gets 0 from it (a nansum over rewards). A reward with fewer than two distinct finite scores in a group
  (e.g. it scored one member only, where the std is undefined) says nothing about that group and gives all its
  members 0, exactly like a reward that is constant over the group.
- ``aggregation="reward"``: the combined score is the weighted sum over the rewards that scored the sample
  (``rewards.ensemble.weighted_nansum``, not re-weighted); a sample no reward scored is left out of its group's
  statistics and gets advantage 0 and ``keep=False``.

``valid_B`` removes samples entirely: advantage 0, excluded from every statistic.

``advantages_from_scores`` is the trainer's entry point: it decides which groups are dropped, and why, before
computing the advantages of the others. A group is dropped only when no reward scored any of its members, or when
a reward call failed for a member under ``on_error=drop`` (the scoring service reports those groups: a failure is
not "does not apply", so the group's statistics would be built on a batch that is missing a member). Its
``AdvantageReport.events()`` are the run-log events of this step, and ``FailureStreak`` stops a run that trains
nothing for several iterations in a row.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

import torch

from rewards.ensemble import weighted_nansum


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
        combined_B = weighted_nansum(scores, w)  # NaN only where no reward scored the sample
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
    return AdvantageResult(adv_B, kept_B, _stats(adv_B, kept_B, clipped_B, informative_G))


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


def finite_mean_std(values_B: torch.Tensor) -> tuple[float, float]:
    """``(mean, std)`` of the scores a reward gave (NaN = not scored, left out): the one rule of every reward
    statistic in the metrics. The std is the sample std (ddof 1), 0.0 with fewer than two scores; the mean is NaN
    with none."""
    finite = values_B[~values_B.isnan()]
    return (float(finite.mean()) if finite.numel() else float("nan"),
            float(finite.std()) if finite.numel() > 1 else 0.0)


def _stats(
    adv_B: torch.Tensor,
    kept_B: torch.Tensor,
    clipped_B: torch.Tensor,
    informative_G: torch.Tensor,
) -> dict[str, float]:
    """The advantages' own statistics (the rewards' are the trainer's metrics: :func:`finite_mean_std`)."""
    return {
        "advantage/mean": float(adv_B.mean()),
        "advantage/std": float(adv_B.std(correction=0)),
        "advantage/abs_max": float(adv_B.abs().max()),
        "advantage/clip_fraction": float(clipped_B.float().mean()),
        "zero_std_fraction": float((~informative_G).float().mean()),
        "num_filtered": float((~kept_B).sum()),
        "num_groups": float(informative_G.numel()),
    }


# ---- the trainer's entry point: which groups are dropped and why, then the advantages of the others ----

NO_SCORES = "no reward scored any sample"


class DroppedGroup(NamedTuple):
    group: Hashable
    """The group's label, as in ``group_ids``."""
    reason: str
    num_samples: int


@dataclass(kw_only=True)
class AdvantageReport:
    """What ``advantages_from_scores`` decided for one batch."""

    advantages: torch.Tensor
    """``[B]`` fp32; exactly 0 for samples of dropped or filtered groups and for samples no reward scored."""
    keep: torch.Tensor
    """``[B]`` bool: the samples to train on."""
    stats: dict[str, float]
    """``compute_advantages``'s stats over the groups that were not dropped, plus ``dropped_groups`` (a count)."""
    dropped: list[DroppedGroup] = field(default_factory=list)
    num_groups: int = 0

    @property
    def trainable(self) -> bool:
        """Whether any sample can be trained on."""
        return bool(self.keep.any())

    def why_nothing_trained(self) -> str:
        """One line: why no group could be trained ("" when some could)."""
        if self.trainable:
            return ""
        parts = []
        if self.dropped:
            first = self.dropped[0]
            parts.append(f"{len(self.dropped)} of {self.num_groups} groups dropped (group {first.group!r}: "
                         f"{first.reason})")
        zero_std = self.num_groups - len(self.dropped)
        if zero_std:
            parts.append(f"{zero_std} of {self.num_groups} groups had no spread (equal scores for every scored member)")
        return "; ".join(parts)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """``("group_dropped", fields)`` per dropped group and ``("no_trainable_group", fields)`` when no sample
        can be trained; each ``fields`` has a one-line ``message`` for the console."""
        out: list[tuple[str, dict[str, Any]]] = [
            ("group_dropped", {"group": d.group, "reason": d.reason, "samples": d.num_samples,
                               "message": f"group {d.group!r} ({d.num_samples} samples) dropped: {d.reason}"})
            for d in self.dropped
        ]
        if not self.trainable:
            reason = self.why_nothing_trained()
            out.append(("no_trainable_group", {
                "groups": self.num_groups, "dropped_groups": len(self.dropped),
                "zero_std_groups": self.num_groups - len(self.dropped), "reason": reason,
                "message": f"no group could be trained in this iteration: {reason}",
            }))
        return out


def advantages_from_scores(
    raw: Mapping[str, torch.Tensor],
    group_ids: Sequence[Hashable] | torch.Tensor,
    *,
    weights: Mapping[str, float],
    dropped: Mapping[Hashable, str] | None = None,
    std: str = "group",
    aggregation: str = "advantage",
    clip: float | None = 5.0,
    eps: float = 1e-4,
    unbiased: bool = True,
    normalize_weights: bool = True,
) -> AdvantageReport:
    """Advantages of a scored batch, with the groups that cannot be trained dropped and explained.

    Args:
        raw: reward name -> ``[B]`` raw scores, NaN where the reward did not score the sample (``ScoreTable.raw``).
        group_ids: ``[B]`` group labels (any hashables, e.g. ``ScoreTable``'s group ids, or an int tensor).
        weights: reward name -> weight (``ScoreTable.weights``).
        dropped: group label -> reason, the groups the scoring service dropped (``ScoreTable.drop_reasons``).
        std, aggregation, clip, eps, unbiased, normalize_weights: as in :func:`compute_advantages`.

    Returns:
        :class:`AdvantageReport`. The groups that are not dropped go through :func:`compute_advantages` as one
        batch, so its stats describe them alone; a group no reward scored is dropped with :data:`NO_SCORES`.
    """
    labels = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    order = {g: i for i, g in enumerate(dict.fromkeys(labels))}
    group_B = torch.tensor([order[g] for g in labels], dtype=torch.long)
    reasons = dict(dropped or {})
    unknown = [g for g in reasons if g not in order]
    if unknown:
        raise ValueError(f"dropped names groups {unknown} that are not in group_ids; pass the ScoreTable's "
                         "drop_reasons together with the group ids given to the reward set")
    raw = {name: torch.as_tensor(r).detach().float().cpu() for name, r in raw.items()}
    if not raw:
        raise ValueError("raw is empty; configure at least one reward")
    bad = {name: tuple(r.shape) for name, r in raw.items() if tuple(r.shape) != (len(labels),)}
    if bad:
        raise ValueError(f"raw scores must be [B]=({len(labels)},) like group_ids, got shapes {bad}")
    scored_B = torch.stack([torch.isfinite(r) for r in raw.values()]).any(dim=0)
    scored_G = torch.zeros(len(order)).index_add(0, group_B, scored_B.float()) > 0
    for g, i in order.items():
        if g not in reasons and not scored_G[i]:
            reasons[g] = NO_SCORES
    usable_B = torch.tensor([g not in reasons for g in labels], dtype=torch.bool)
    advantages_B = torch.zeros(len(labels))
    keep_B = torch.zeros(len(labels), dtype=torch.bool)
    stats = dict.fromkeys(("advantage/mean", "advantage/std", "advantage/abs_max", "advantage/clip_fraction",
                           "zero_std_fraction"), float("nan"))
    stats.update(num_filtered=float(len(labels)), num_groups=0.0)
    if usable_B.any():
        result = compute_advantages({k: v[usable_B] for k, v in raw.items()}, group_B[usable_B],
                                    weights=weights, std=std, aggregation=aggregation, clip=clip, eps=eps,
                                    unbiased=unbiased, normalize_weights=normalize_weights)
        advantages_B[usable_B], keep_B[usable_B] = result.advantages, result.keep
        stats = dict(result.stats)
    stats["dropped_groups"] = float(len(reasons))
    counts = {g: labels.count(g) for g in reasons}
    return AdvantageReport(
        advantages=advantages_B, keep=keep_B, stats=stats, num_groups=len(order),
        dropped=[DroppedGroup(g, reasons[g], counts[g]) for g in order if g in reasons],
    )


class NothingTrainedError(RuntimeError):
    """Raised by ``FailureStreak`` when too many iterations in a row trained nothing."""


class FailureStreak:
    """Counts the iterations in a row in which no group could be trained; ``record`` raises at ``limit``.

    Any cause counts (failed or unscored groups, or equal scores in every group): a run that trains nothing should
    stop and say why rather than finish with exit code 0.
    """

    def __init__(self, limit: int) -> None:
        if not (isinstance(limit, int) and limit >= 1):
            raise ValueError(f"limit (train.max_failed_iterations) must be an int >= 1, got {limit!r}")
        self.limit, self.count = limit, 0
        self._last: tuple[int, int] | None = None  # (iteration, the streak before it)

    def record(self, report: AdvantageReport, iteration: int | None = None) -> int:
        """Count one iteration; returns the current streak, or raises ``NothingTrainedError`` when it hits the limit.

        An ``iteration`` recorded again (redone after a worker fault) replaces its first record instead of counting
        twice."""
        if iteration is not None and self._last is not None and self._last[0] == iteration:
            self.count = self._last[1]
        self._last = None if iteration is None else (iteration, self.count)
        self.count = 0 if report.trainable else self.count + 1
        if self.count >= self.limit:
            raise NothingTrainedError(
                f"no group could be trained in {self.count} iterations in a row (last: {report.why_nothing_trained()})."
                " See events.jsonl for each failure; fix the rewards, or raise train.max_failed_iterations"
            )
        return self.count
