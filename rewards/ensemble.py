"""The scoring service: several weighted rewards, in-process or on Ray reward actors, blocking or not.

Shape legend: B = videos in the batch, R = rewards in the set.

``RewardSet.submit`` cuts the batch into chunks of each reward's ``batch_size`` hint and starts every chunk
(in a background thread in-process, or as calls on one Ray actor per reward); ``ScoreHandle.result()``
gathers them into a ``ScoreTable``. ``score`` is ``submit(...).result()``. Both backends run the same
``score_chunk`` function, which turns an exception into data so the failure policy is applied in one place:

- ``on_error="raise"``: raise ``RewardError`` naming the reward, the sample ids and the original error;
- ``on_error="drop"``: the failed samples' scores stay NaN, and their WHOLE GROUPS are dropped (a group with
  a missing member has no valid group statistics); the table lists them so the trainer can log a metric.

NaN scores are legal ("does not apply", e.g. a TRL reward returning None): they are counted per reward and
reported, never replaced by a default.

Rewards that report component scores (``Reward.score_with_details``) have them gathered the same way into
``ScoreTable.details``; they are reported only and never enter the aggregate or the failure policy's counts.
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rewards.base import Reward, validate_details, validate_scores, validate_videos
from rewards.registry import available, build


class RewardError(RuntimeError):
    """A reward raised while scoring; the message names the reward and the sample ids."""


@dataclass(kw_only=True)
class RewardSpec:
    """One reward of a set: registry ``name``, ``weight`` in the aggregate, constructor ``args``.

    ``num_gpus`` / ``num_cpus`` are the Ray resources of this reward's actor (fractions share a GPU).
    """

    name: str
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    num_gpus: float = 0.0
    num_cpus: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise ValueError(f"rewards[{self.name!r}].weight must be finite, got {self.weight}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(f"rewards[{self.name!r}].num_gpus and num_cpus must be >= 0")


def as_spec(reward: RewardSpec | Mapping[str, Any] | Any) -> RewardSpec:
    """A RewardSpec from a dict or from any dataclass with the same fields (e.g. the trainer's config)."""
    if isinstance(reward, RewardSpec):
        return reward
    if dataclasses.is_dataclass(reward) and not isinstance(reward, type):
        reward = dataclasses.asdict(reward)
    if not isinstance(reward, Mapping):
        raise ValueError(f"each reward must be a dict {{name, weight, args}}, got {type(reward).__name__}")
    return RewardSpec(**reward)


@dataclass(kw_only=True)
class RewardSetConfig:
    """Config of the scoring service.

    Attributes:
        rewards: the rewards, as ``RewardSpec`` or dicts ``{name, weight, args, num_gpus, num_cpus}``.
        on_error: ``"raise"`` or ``"drop"`` (drop the whole groups of failed samples; needs ``group_ids``).
        backend: ``"local"`` (this process) or ``"ray"`` (one actor per reward; ``ray.init`` first).
        device: where local rewards run; Ray actors use ``cuda`` when ``num_gpus > 0``, else ``cpu``.
    """

    rewards: list[RewardSpec]
    on_error: Literal["raise", "drop"] = "raise"
    backend: Literal["local", "ray"] = "local"
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.rewards = [as_spec(r) for r in self.rewards]
        self.device = str(self.device)
        if not self.rewards:
            raise ValueError("rewards is empty; list at least one {name, weight, args}")
        names = [r.name for r in self.rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rewards lists {duplicates} more than once; each reward name must appear once")
        unknown = [n for n in names if n not in available()]
        if unknown:
            raise ValueError(
                f"rewards {unknown} are not registered; available: {', '.join(available())}. Install the "
                "plugin that provides them (entry-point group 'mixgrpo.rewards') or fix the name"
            )
        total = sum(r.weight for r in self.rewards)
        if not total > 0:
            raise ValueError(f"reward weights must have a positive sum, got {total}; raise at least one weight")
        if self.on_error not in ("raise", "drop"):
            raise ValueError(f"on_error must be 'raise' or 'drop', got {self.on_error!r}")
        if self.backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {self.backend!r}")


@dataclass(kw_only=True)
class ScoreTable:
    """Raw scores of one batch, per reward, with what went wrong.

    Attributes:
        sample_ids: ids of the B samples, in batch order.
        raw: reward name -> raw float32 scores [B]; NaN where the reward failed or returned NaN.
        weights: reward name -> weight.
        nan_counts: reward name -> NaN scores returned by the reward itself (failures not included).
        failed_ids: reward name -> ids of samples whose scoring call raised (only with on_error="drop").
        errors: reward name -> the error text of its first failed call.
        dropped_ids: ids of every sample dropped with its group (only with on_error="drop").
        dropped_groups: the group ids dropped (only with on_error="drop").
        keep_B: bool [B], False for dropped samples.
        details: reward name -> component name -> float32 [B] component scores (``Reward.score_with_details``);
            NaN where the reward's call failed or did not return that component; ``{}`` for a reward without
            components.
    """

    sample_ids: list[Hashable]
    raw: dict[str, torch.Tensor]
    weights: dict[str, float]
    nan_counts: dict[str, int]
    failed_ids: dict[str, list[Hashable]]
    errors: dict[str, str]
    dropped_ids: list[Hashable]
    dropped_groups: list[Hashable]
    keep_B: torch.Tensor
    details: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.raw)

    def stacked(self) -> torch.Tensor:
        """Raw scores as [B, R] in ``names`` order."""
        return torch.stack([self.raw[n] for n in self.names], dim=1)

    @property
    def aggregate(self) -> torch.Tensor:
        """Weighted mean of the raw scores [B] (weights normalised to sum 1, as MixGRPO's code does).

        NaN wherever any reward is NaN: the caller decides how "not applicable" enters its statistics.
        """
        weights_R = torch.tensor([self.weights[n] for n in self.names])
        return (self.stacked() * (weights_R / weights_R.sum())).sum(dim=1)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per sample: ``sample_id``, one column per reward, one ``<reward>/<component>`` column per
        component score, ``dropped`` (for samples.parquet)."""
        components = {f"{n}/{c}": values for n, parts in self.details.items() for c, values in parts.items()}
        return [
            {"sample_id": sid, **{n: float(self.raw[n][i]) for n in self.names},
             **{column: float(values[i]) for column, values in components.items()}, "dropped": not bool(self.keep_B[i])}
            for i, sid in enumerate(self.sample_ids)
        ]


@dataclass
class ChunkResult:
    """Outcome of one reward call on samples [lo, hi): scores [hi - lo] and component scores, or the error text."""

    lo: int
    hi: int
    scores: torch.Tensor | None
    error: str | None
    details: dict[str, torch.Tensor] | None = None


def score_chunk(
    reward: Reward, videos_BTCHW: torch.Tensor, prompts: Sequence[str], metadata: Mapping[str, Any], lo: int, hi: int
) -> ChunkResult:
    """Score samples [lo, hi) with ``reward``; an exception becomes ``ChunkResult.error`` (with traceback)."""
    chunk_meta = {k: v[lo:hi] for k, v in metadata.items()}
    try:
        scores, details = reward.score_with_details(videos_BTCHW[lo:hi], list(prompts[lo:hi]), **chunk_meta)
        # Checked here as well: an override of score_with_details bypasses the checks of Reward.__call__, and a
        # malformed output must fail under the failure policy like any other error of this call.
        scores = validate_scores(scores, hi - lo, reward.name).cpu()
        details = {c: v.cpu() for c, v in validate_details(details, hi - lo, reward.name).items()}
    except Exception as exc:
        return ChunkResult(lo, hi, None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
    return ChunkResult(lo, hi, scores, None, details)


def gather_details(results: Sequence[ChunkResult], batch_size: int) -> dict[str, torch.Tensor]:
    """Component -> float32 [B] from one reward's chunks; NaN for samples of failed chunks and of chunks that
    did not return that component (a reward may report a component only where it applies)."""
    out: dict[str, torch.Tensor] = {}
    for res in results:
        for component, values in (res.details or {}).items():
            out.setdefault(component, torch.full((batch_size,), math.nan))[res.lo : res.hi] = values
    return out


def chunk_bounds(batch_size: int, chunk: int | None) -> list[tuple[int, int]]:
    """[(lo, hi)] covering range(batch_size) in chunks of at most ``chunk`` (None = one chunk)."""
    step = batch_size if chunk is None else chunk
    return [(lo, min(lo + step, batch_size)) for lo in range(0, batch_size, max(step, 1))]


def _ray_actor_class() -> Any:
    import ray

    @ray.remote
    class RewardActor:
        """Hosts one reward; built and set up inside the actor so weights load on the actor's device."""

        def __init__(self, name: str, args: dict[str, Any], device: str) -> None:
            self.reward = build(name, **args)
            self.reward.setup(device)

        def batch_size(self) -> int | None:
            return self.reward.batch_size

        def score(self, videos: torch.Tensor, prompts: list[str], metadata: dict, lo: int, hi: int) -> ChunkResult:
            return score_chunk(self.reward, videos, prompts, metadata, lo, hi)

    return RewardActor


class _RayFuture:
    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def result(self, timeout: float | None = None) -> ChunkResult:
        import ray

        return ray.get(self.ref, timeout=timeout)

    def done(self) -> bool:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        return len(ready) == 1


class ScoreHandle:
    """A scoring request in flight; ``result()`` blocks and returns the ScoreTable (or raises RewardError)."""

    def __init__(self, reward_set: RewardSet, futures: dict[str, list[Any]], request: dict[str, Any]) -> None:
        self._set, self._futures, self._request = reward_set, futures, request
        self._table: ScoreTable | None = None

    def done(self) -> bool:
        return all(f.done() for fs in self._futures.values() for f in fs)

    def result(self, timeout: float | None = None) -> ScoreTable:
        if self._table is None:
            chunks = {name: [f.result(timeout) for f in fs] for name, fs in self._futures.items()}
            self._table = self._set.assemble(chunks, **self._request)
        return self._table


class RewardSet:
    """Builds the configured rewards (here, or as Ray actors) and scores batches with them.

    ``RewardSet(rewards, on_error=..., backend=..., device=...)`` takes the same fields as ``RewardSetConfig``;
    ``RewardSet.from_config(config)`` takes the config object.
    """

    def __init__(
        self,
        rewards: Sequence[RewardSpec | Mapping[str, Any] | Any],
        *,
        on_error: Literal["raise", "drop"] = "raise",
        backend: Literal["local", "ray"] = "local",
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = RewardSetConfig(rewards=list(rewards), on_error=on_error, backend=backend, device=str(device))
        self.weights = {r.name: float(r.weight) for r in self.config.rewards}
        self._rewards: dict[str, Reward] = {}
        self._actors: dict[str, Any] = {}
        self._batch_sizes: dict[str, int | None] = {}
        if self.config.backend == "local":
            for spec in self.config.rewards:
                reward = build(spec.name, **spec.args)
                reward.setup(self.config.device)
                self._rewards[spec.name] = reward
                self._batch_sizes[spec.name] = reward.batch_size
            # One worker: rewards run one after another, concurrently with the caller (the next rollout).
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")
        else:
            actor_cls = _ray_actor_class()
            for spec in self.config.rewards:
                device = "cuda" if spec.num_gpus > 0 else "cpu"
                actor = actor_cls.options(num_gpus=spec.num_gpus, num_cpus=spec.num_cpus).remote(
                    spec.name, spec.args, device
                )
                self._actors[spec.name] = actor
            import ray

            self._batch_sizes = dict(zip(self._actors, ray.get([a.batch_size.remote() for a in self._actors.values()])))

    @classmethod
    def from_config(cls, config: RewardSetConfig) -> RewardSet:
        return cls(config.rewards, on_error=config.on_error, backend=config.backend, device=config.device)

    def submit(
        self,
        videos_BTCHW: torch.Tensor,
        prompts: Sequence[str],
        *,
        sample_ids: Sequence[Hashable],
        group_ids: Sequence[Hashable] | None = None,
        metadata: Mapping[str, Sequence[Any]] | None = None,
    ) -> ScoreHandle:
        """Start scoring without blocking. ``metadata`` values are per-sample sequences of length B.

        The local backend reads ``videos_BTCHW`` from its thread until ``result()`` returns: do not modify it
        in place meanwhile (the Ray backend copies it into the object store before returning).
        """
        validate_videos(videos_BTCHW, prompts)
        b = videos_BTCHW.shape[0]
        metadata = dict(metadata or {})
        self._validate_request(b, sample_ids, group_ids, metadata)
        prompts = list(prompts)
        futures: dict[str, list[Any]] = {}
        if self.config.backend == "local":
            for name, reward in self._rewards.items():
                futures[name] = [
                    self._executor.submit(score_chunk, reward, videos_BTCHW, prompts, metadata, lo, hi)
                    for lo, hi in chunk_bounds(b, self._batch_sizes[name])
                ]
        else:
            import ray

            videos_ref = ray.put(videos_BTCHW.detach().cpu())  # one copy in the object store for all actors
            for name, actor in self._actors.items():
                futures[name] = [
                    _RayFuture(actor.score.remote(videos_ref, prompts, metadata, lo, hi))
                    for lo, hi in chunk_bounds(b, self._batch_sizes[name])
                ]
        request = {"sample_ids": list(sample_ids), "group_ids": None if group_ids is None else list(group_ids)}
        return ScoreHandle(self, futures, request)

    def score(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **kwargs: Any) -> ScoreTable:
        """Blocking ``submit(...).result()``."""
        return self.submit(videos_BTCHW, prompts, **kwargs).result()

    def _validate_request(
        self, b: int, sample_ids: Sequence[Hashable], group_ids: Sequence[Hashable] | None, metadata: dict
    ) -> None:
        if len(sample_ids) != b:
            raise ValueError(f"len(sample_ids) = {len(sample_ids)} but B = {b}; pass one id per video")
        if len(set(sample_ids)) != b:
            raise ValueError("sample_ids must be unique; use e.g. (iteration, index) tuples")
        if group_ids is not None and len(group_ids) != b:
            raise ValueError(f"len(group_ids) = {len(group_ids)} but B = {b}; pass one group id per video")
        if self.config.on_error == "drop" and group_ids is None:
            raise ValueError("on_error='drop' drops whole groups; pass group_ids (the GRPO group of each sample)")
        for key, values in metadata.items():
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != b:
                raise ValueError(f"metadata[{key!r}] must be a per-sample sequence of length B = {b}")

    def assemble(
        self,
        chunks: dict[str, list[ChunkResult]],
        *,
        sample_ids: list[Hashable],
        group_ids: list[Hashable] | None,
    ) -> ScoreTable:
        """Apply the failure policy to finished chunks and build the ScoreTable."""
        b = len(sample_ids)
        scores, nan_counts, failed, errors = {}, {}, {}, {}
        details = {name: gather_details(results, b) for name, results in chunks.items()}
        for name, results in chunks.items():
            scores_B = torch.full((b,), math.nan)
            failed_idx: list[int] = []
            for res in results:
                if res.error is None:
                    scores_B[res.lo : res.hi] = res.scores
                    continue
                ids = sample_ids[res.lo : res.hi]
                if self.config.on_error == "raise":
                    raise RewardError(f"reward {name!r} failed on samples {ids}: {res.error}")
                errors.setdefault(name, res.error)
                failed_idx.extend(range(res.lo, res.hi))
            failed_mask = torch.zeros(b, dtype=torch.bool)
            failed_mask[failed_idx] = True
            nan_counts[name] = int((scores_B.isnan() & ~failed_mask).sum())
            failed[name] = [sample_ids[i] for i in failed_idx]
            scores[name] = scores_B
        keep_B, failed_groups = torch.ones(b, dtype=torch.bool), []
        if group_ids is not None:
            group_of = dict(zip(sample_ids, group_ids))
            failed_groups = list(dict.fromkeys(group_of[sid] for ids in failed.values() for sid in ids))
            keep_B = torch.tensor([g not in failed_groups for g in group_ids], dtype=torch.bool)
        dropped = [sid for sid, keep in zip(sample_ids, keep_B.tolist()) if not keep]
        return ScoreTable(
            sample_ids=sample_ids,
            raw=scores,
            weights=dict(self.weights),
            nan_counts=nan_counts,
            failed_ids=failed,
            errors=errors,
            dropped_ids=dropped,
            dropped_groups=failed_groups,
            keep_B=keep_B,
            details=details,
        )

    def close(self) -> None:
        """Stop the background thread or kill the reward actors."""
        if self.config.backend == "local":
            self._executor.shutdown(wait=True)
            return
        import ray

        for actor in self._actors.values():
            ray.kill(actor)
        self._actors.clear()

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
