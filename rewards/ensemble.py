"""The scoring service: several weighted rewards, each in-process or on a Ray reward actor, blocking or not.

Shape legend: B = videos in the batch, R = rewards in the set.

``RewardSet.submit`` cuts the batch into chunks of each reward's ``batch_size`` hint and queues every chunk on a
lane: one background thread that runs the in-process rewards one after another, and one per Ray reward (calls
on its actor). ``ScoreHandle.result()`` gathers them into a ``ScoreTable``; ``score`` is ``submit(...).result()``.
Both backends run the same ``score_chunk`` function, which turns an exception into data so the failure policy is
applied in one place:

- ``on_error="raise"``: raise ``RewardError`` naming the reward, the sample ids and the original error;
- ``on_error="drop"``: the failed samples' scores stay NaN, and their WHOLE GROUPS are dropped: a failed call is
  not "does not apply", and the group's other members were scored in a batch that is now incomplete. The table
  lists the groups with the reason (``drop_reasons``) and every failed call (``failures``).

Every call runs under ``timeout_s`` (0 = no limit). A call over it is a failure of that reward for those samples
(``timed_out``). Python cannot stop a thread, so an in-process call runs in a daemon thread of its own that is
abandoned when it overruns (the lane carries on with the next call, and interpreter exit or Ctrl-C never waits
for it); an overrunning actor is killed and replaced before the lane's next call.

NaN scores are legal ("does not apply", e.g. a TRL reward returning None): they are counted per reward and
reported, never replaced by a default. A sample keeps the contribution of the rewards that scored it
(``weighted_nansum``, TRL's rule).

Rewards that report component scores (``Reward.score_with_details``) have them gathered the same way into
``ScoreTable.details``; they are reported only and never enter the aggregate or the failure policy's counts.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import queue
import threading
import time
import traceback
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rewards.base import (
    RESERVED_METADATA,
    Reward,
    accepted_metadata,
    validate_details,
    validate_scores,
    validate_videos,
)
from rewards.registry import available, build, check_args

POLL_S = 0.5
"""Longest uninterrupted wait of ``ScoreHandle.result``, so that Ctrl-C reaches the caller at once."""


class RewardError(RuntimeError):
    """A reward call failed (raised or timed out) under ``on_error="raise"``; names the reward and the samples."""

    def __init__(
        self, message: str, *, reward: str = "", sample_ids: Sequence[Hashable] = (), error: str = "",
        timed_out: bool = False,
    ) -> None:  # defaults: exceptions are rebuilt from their message alone when unpickled
        super().__init__(message)
        self.reward, self.sample_ids, self.error, self.timed_out = reward, list(sample_ids), error, timed_out

    def event(self) -> tuple[str, dict[str, Any]]:
        """The ``("reward_failed", fields)`` event of this failure, as ``ScoreTable.events`` writes it."""
        return RewardFailure(reward=self.reward, sample_ids=self.sample_ids, error=self.error,
                             timed_out=self.timed_out).event()


@dataclass(kw_only=True)
class RewardSpec:
    """One reward of a set: registry ``name``, ``weight`` in the aggregate, constructor ``args``.

    ``backend`` says where it runs: ``"local"`` (a background thread of this process, on the set's ``device``) or
    ``"ray"`` (its own Ray actor with ``num_gpus`` / ``num_cpus``; fractions share a GPU). A set may mix them.
    """

    name: str
    """The reward's registry name (rewards.available())."""
    weight: float = 1.0
    """Weight in the aggregate reward."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward's constructor (checkpoints, ...)."""
    backend: Literal["local", "ray"] = "local"
    """Where the reward runs: local (a background thread of the driver) or ray (its own Ray actor)."""
    num_gpus: float = 0.0
    """backend=ray: GPUs of the reward's actor (a fraction shares a GPU)."""
    num_cpus: float = 1.0
    """backend=ray: CPUs of the reward's actor."""

    def __post_init__(self) -> None:
        where = f"rewards[{self.name!r}]"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a reward's name must be a registered reward name, got {self.name!r}")
        if not isinstance(self.args, Mapping):
            raise ValueError(f"{where}.args must be a mapping of constructor arguments, got {self.args!r}")
        for key in ("weight", "num_gpus", "num_cpus"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}.{key} must be a number, got {value!r}")
        if not math.isfinite(self.weight):
            raise ValueError(f"{where}.weight must be finite, got {self.weight}; give a number such as 1.0")
        if self.backend not in ("local", "ray"):
            raise ValueError(f"{where}.backend must be 'local' or 'ray', got {self.backend!r}")
        if not (self.num_gpus >= 0 and self.num_cpus >= 0):
            raise ValueError(f"{where}.num_gpus and num_cpus must be >= 0, got {self.num_gpus} and {self.num_cpus}")


def as_spec(reward: RewardSpec | Mapping[str, Any] | Any) -> RewardSpec:
    """A RewardSpec from a dict or from any dataclass with the same fields."""
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
        rewards: the rewards, as ``RewardSpec`` or dicts ``{name, weight, args, backend, num_gpus, num_cpus}``.
        on_error: ``"raise"`` or ``"drop"`` (drop the whole groups of failed samples; needs ``group_ids``).
        timeout_s: seconds each reward call may take, 0 = no limit; a slower call is a failure of that reward.
        device: where local rewards run; Ray actors use ``cuda`` when ``num_gpus > 0``, else ``cpu``.
    """

    rewards: list[RewardSpec]
    on_error: Literal["raise", "drop"] = "raise"
    timeout_s: float = 0.0
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
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s >= 0):
            raise ValueError(f"timeout_s must be a number of seconds >= 0 (0: no limit), got {self.timeout_s!r}")


def weighted_nansum(raw: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_r weights[r] * raw[r]`` over the rewards that scored each sample -> [B]; NaN where none did.

    TRL's rule for a reward returning None: the sample keeps the other rewards' contribution as it is (the sum
    is not re-weighted over the rewards that scored it).
    """
    values_RB = torch.stack([torch.as_tensor(raw[n]).float() for n in raw])
    weights_R1 = torch.tensor([float(weights[n]) for n in raw])[:, None]
    scored_RB = torch.isfinite(values_RB)
    total_B = torch.where(scored_RB, weights_R1 * values_RB, 0.0).sum(dim=0)
    return torch.where(scored_RB.any(dim=0), total_B, math.nan)


@dataclass(kw_only=True)
class RewardFailure:
    """One failed reward call: its samples, the first line of its error, and whether it ran out of time."""

    reward: str
    sample_ids: list[Hashable]
    error: str
    timed_out: bool = False

    def event(self) -> tuple[str, dict[str, Any]]:
        what = "timed out" if self.timed_out else "failed"
        return "reward_failed", {
            "reward": self.reward, "samples": list(self.sample_ids), "error": self.error, "timed_out": self.timed_out,
            "message": f"reward {self.reward!r} {what} on samples {list(self.sample_ids)}: {self.error}",
        }


@dataclass(kw_only=True)
class ScoreTable:
    """Raw scores of one batch, per reward, with what went wrong.

    Attributes:
        sample_ids: ids of the B samples, in batch order.
        raw: reward name -> raw float32 scores [B]; NaN where the reward failed or returned NaN (None).
        weights: reward name -> weight.
        nan_counts: reward name -> NaN scores returned by the reward itself (failures not included).
        failed_ids: reward name -> ids of samples whose scoring call failed (only with on_error="drop").
        errors: reward name -> the error text of its first failed call.
        dropped_ids: ids of every sample dropped with its group (only with on_error="drop").
        dropped_groups: the group ids dropped (only with on_error="drop").
        keep_B: bool [B], False for dropped samples.
        details: reward name -> component name -> float32 [B] component scores (``Reward.score_with_details``);
            NaN where the reward's call failed or did not return that component; ``{}`` for a reward without
            components.
        failures: every failed call, in reward then batch order (only with on_error="drop").
        nan_ids: reward name -> ids of the samples it returned NaN (None) for.
        drop_reasons: dropped group id -> why, e.g. "reward 'hps' failed for sample 7 under on_error=drop".
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
    failures: list[RewardFailure] = field(default_factory=list)
    nan_ids: dict[str, list[Hashable]] = field(default_factory=dict)
    drop_reasons: dict[Hashable, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.raw)

    def stacked(self) -> torch.Tensor:
        """Raw scores as [B, R] in ``names`` order."""
        return torch.stack([self.raw[n] for n in self.names], dim=1)

    @property
    def aggregate(self) -> torch.Tensor:
        """Weighted sum of the raw scores [B], weights normalised to sum 1 (as MixGRPO's code does).

        A reward that did not score a sample (NaN) leaves the others' contribution (``weighted_nansum``); NaN only
        where no reward scored the sample.
        """
        total = sum(self.weights.values())
        return weighted_nansum(self.raw, {n: w / total for n, w in self.weights.items()})

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """``("reward_failed", fields)`` per failed call and ``("reward_nan", fields)`` per reward that returned
        NaN, each with a one-line ``message``; the groups they cost are events of the advantage step."""
        out = [failure.event() for failure in self.failures]
        for name, ids in self.nan_ids.items():
            if ids:
                out.append(("reward_nan", {
                    "reward": name, "count": len(ids), "samples": list(ids),
                    "message": f"reward {name!r} returned None/NaN for {len(ids)} sample{'s' if len(ids) > 1 else ''} "
                               f"{list(ids)}; they keep the other rewards' scores",
                }))
        return out

    def reward_columns(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``<prefix><reward>`` -> its raw scores ``[B]``, in ``names`` order."""
        return {f"{prefix}{name}": self.raw[name] for name in self.names}

    def component_columns(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``<prefix><reward>/<component>`` -> the component's scores ``[B]``, reward by reward."""
        return {f"{prefix}{name}/{component}": values
                for name, parts in self.details.items() for component, values in parts.items()}

    def sample_columns(self, index: int, prefix: str = "") -> dict[str, float]:
        """Sample ``index``'s scores as the columns of a table row: one per reward, then one per component (the
        naming every table of scores shares: samples.parquet, eval.parquet, :meth:`rows`)."""
        columns = {**self.reward_columns(prefix), **self.component_columns(prefix)}
        return {column: float(values[index]) for column, values in columns.items()}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per sample: ``sample_id``, one column per reward, one ``<reward>/<component>`` column per
        component score, ``dropped``."""
        return [{"sample_id": sid, **self.sample_columns(i), "dropped": not bool(self.keep_B[i])}
                for i, sid in enumerate(self.sample_ids)]


@dataclass
class ChunkResult:
    """Outcome of one reward call on samples [lo, hi): scores [hi - lo] and component scores, or the error text."""

    lo: int
    hi: int
    scores: torch.Tensor | None
    error: str | None
    details: dict[str, torch.Tensor] | None = None
    timed_out: bool = False


def score_chunk(
    reward: Reward, videos_BTCHW: torch.Tensor, prompts: Sequence[str], metadata: Mapping[str, Any], lo: int, hi: int
) -> ChunkResult:
    """Score samples [lo, hi) with ``reward``; an exception becomes ``ChunkResult.error`` (with traceback)."""
    chunk_meta = accepted_metadata(reward.score_with_details, {k: v[lo:hi] for k, v in metadata.items()}, positional=2)
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


def _start_actor(spec: RewardSpec) -> Any:
    device = "cuda" if spec.num_gpus > 0 else "cpu"
    options = {"num_gpus": spec.num_gpus, "num_cpus": spec.num_cpus}
    return _ray_actor_class().options(**options).remote(spec.name, spec.args, device)


@dataclass
class _Call:
    """One reward call queued on a lane; ``videos`` is the tensor, or its object-store ref for an actor."""

    reward: str
    videos: Any
    prompts: list[str]
    metadata: dict[str, Any]
    lo: int
    hi: int
    future: Future = field(default_factory=Future)


def _timed_out(call: _Call, timeout_s: float) -> ChunkResult:
    return ChunkResult(call.lo, call.hi, None, f"TimeoutError: no scores after {timeout_s:g} s", timed_out=True)


class _Lane(abc.ABC):
    """A daemon thread that runs queued calls one after another, each under ``timeout_s`` (0 = no limit).

    The queue, cancellation and close are shared; where a call runs (a thread here, an actor) is ``_run``."""

    def __init__(self, name: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closed = False
        threading.Thread(target=self._loop, name=f"rewards-{name}", daemon=True).start()

    def submit(self, call: _Call) -> Future:
        if self._closed:
            raise RuntimeError("this RewardSet is closed; build a new one to score more videos")
        self._calls.put(call)
        return call.future

    def close(self) -> None:
        """Stop taking calls and cancel the queued ones; a call already running is abandoned, not waited for."""
        self._closed = True
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call.future.cancel()
        self._calls.put(None)  # after the drain, so that the lane's thread gets it and ends

    def _loop(self) -> None:
        while (call := self._calls.get()) is not None:
            if self._closed:
                call.future.cancel()
            elif call.future.set_running_or_notify_cancel():
                try:
                    result = self._run(call)
                except Exception as exc:  # a bug here must fail this call, not leave its caller waiting forever
                    result = ChunkResult(call.lo, call.hi, None, f"{type(exc).__name__}: {exc}")
                call.future.set_result(result)

    @abc.abstractmethod
    def _run(self, call: _Call) -> ChunkResult:
        """Run ``call`` under the lane's time limit; a failure or overrun is returned as a ChunkResult, not raised."""


class _ThreadLane(_Lane):
    """In-process rewards, one call after another. Each call gets its own daemon thread: Python cannot stop a
    thread, so a call over the limit is abandoned there (still running) while the lane moves on."""

    def __init__(self, rewards: dict[str, Reward], timeout_s: float) -> None:
        self.rewards = rewards
        super().__init__("local", timeout_s)

    def _run(self, call: _Call) -> ChunkResult:
        reward = self.rewards[call.reward]
        if not self.timeout_s:  # no limit: nothing to abandon, run it on the lane's own thread
            return score_chunk(reward, call.videos, call.prompts, call.metadata, call.lo, call.hi)
        box: list[ChunkResult] = []

        def target() -> None:
            box.append(score_chunk(reward, call.videos, call.prompts, call.metadata, call.lo, call.hi))

        worker = threading.Thread(target=target, name=f"reward-{call.reward}", daemon=True)
        worker.start()
        worker.join(self.timeout_s or None)
        if worker.is_alive():
            return _timed_out(call, self.timeout_s)
        return box[0] if box else ChunkResult(call.lo, call.hi, None, "RuntimeError: the call ended without scores")


class _ActorLane(_Lane):
    """One Ray reward: its calls go to its actor one at a time, so each call's clock starts when it does. An
    actor task cannot be force-cancelled, so an actor over the limit is killed and rebuilt for the next call."""

    def __init__(self, spec: RewardSpec, actor: Any, timeout_s: float) -> None:
        self.spec, self.actor = spec, actor
        super().__init__(spec.name, timeout_s)

    def _run(self, call: _Call) -> ChunkResult:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            if self.actor is None:
                self.actor = _start_actor(self.spec)
                ray.get(self.actor.batch_size.remote())  # the rebuilt reward loads its weights outside the clock
            ref = self.actor.score.remote(call.videos, call.prompts, call.metadata, call.lo, call.hi)
            return ray.get(ref, timeout=self.timeout_s or None)
        except GetTimeoutError:
            self.kill()
            return _timed_out(call, self.timeout_s)
        except Exception as exc:  # the actor died, or could not be rebuilt: a failure of this call
            self.kill()
            return ChunkResult(call.lo, call.hi, None, f"{type(exc).__name__}: {exc}")

    def kill(self) -> None:
        actor, self.actor = self.actor, None  # the lane and close() may both get here
        if actor is not None:
            import ray

            ray.kill(actor)

    def close(self) -> None:
        super().close()
        self.kill()


class ScoreHandle:
    """A scoring request in flight; ``result()`` blocks and returns the ScoreTable (or raises RewardError)."""

    def __init__(self, reward_set: RewardSet, futures: dict[str, list[Future]], request: dict[str, Any]) -> None:
        self._set, self._futures, self._request = reward_set, futures, request
        self._table: ScoreTable | None = None

    def done(self) -> bool:
        return all(f.done() for fs in self._futures.values() for f in fs)

    def result(self, timeout: float | None = None) -> ScoreTable:
        """The table, waiting at most ``timeout`` seconds in all (None: until every call has finished or timed out)."""
        if self._table is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            chunks = {name: [_wait(f, deadline) for f in fs] for name, fs in self._futures.items()}
            self._table = self._set.assemble(chunks, **self._request)
        return self._table


def _wait(future: Future, deadline: float | None) -> ChunkResult:
    # Short waits in a loop: KeyboardInterrupt is then raised here within POLL_S however long a reward runs.
    while True:
        step = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
        if step <= 0:
            raise TimeoutError("scoring did not finish within the timeout given to ScoreHandle.result")
        try:
            return future.result(timeout=step)
        except FutureTimeout:
            continue


class RewardSet:
    """Builds the configured rewards (here, or as Ray actors) and scores batches with them.

    ``RewardSet(rewards, on_error=..., timeout_s=..., device=...)`` takes the same fields as ``RewardSetConfig``;
    ``RewardSet.from_config(config)`` takes the config object. Rewards with ``backend="ray"`` need Ray to be
    initialised (``ray.init``) before the set is built.
    """

    def __init__(
        self,
        rewards: Sequence[RewardSpec | Mapping[str, Any] | Any],
        *,
        on_error: Literal["raise", "drop"] = "raise",
        timeout_s: float = 0.0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = RewardSetConfig(rewards=list(rewards), on_error=on_error, timeout_s=timeout_s, device=str(device))
        self.weights = {r.name: float(r.weight) for r in self.config.rewards}
        self._specs = {r.name: r for r in self.config.rewards}
        self._lanes: dict[str, _Lane] = {}
        self._batch_sizes: dict[str, int | None] = {}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for spec in self.config.rewards:  # a wrong argument fails here, naming it, before any reward loads weights
            check_args(spec.name, spec.args)
        remote = [s for s in self.config.rewards if s.backend == "ray"]
        actors = {}
        if remote:
            import ray

            if not ray.is_initialized():
                raise RuntimeError(
                    f"rewards {[s.name for s in remote]} have backend 'ray' but Ray is not initialised; call "
                    "ray.init() (ray.init(address='auto') on a cluster) before building the RewardSet, or set their "
                    "backend to 'local'"
                )
            actors = {s.name: _start_actor(s) for s in remote}  # they load their weights while local rewards do
            for spec in remote:
                self._lanes[spec.name] = _ActorLane(spec, actors[spec.name], self.config.timeout_s)
        local = {}
        for spec in self.config.rewards:
            if spec.backend == "local":
                local[spec.name] = build(spec.name, **spec.args)
                local[spec.name].setup(self.config.device)
                self._batch_sizes[spec.name] = local[spec.name].batch_size
        if local:
            # One lane for all of them: they run one after another, concurrently with the caller (the next rollout).
            lane = _ThreadLane(local, self.config.timeout_s)
            self._lanes.update({name: lane for name in local})
        if actors:
            import ray

            sizes = ray.get([actor.batch_size.remote() for actor in actors.values()])
            self._batch_sizes.update(zip(actors, sizes))

    @classmethod
    def from_config(cls, config: RewardSetConfig) -> RewardSet:
        return cls(config.rewards, on_error=config.on_error, timeout_s=config.timeout_s, device=config.device)

    def submit(
        self,
        videos_BTCHW: torch.Tensor,
        prompts: Sequence[str],
        *,
        sample_ids: Sequence[Hashable],
        group_ids: Sequence[Hashable] | None = None,
        metadata: Mapping[str, Sequence[Any]] | None = None,
    ) -> ScoreHandle:
        """Start scoring without blocking. ``metadata`` values are per-sample sequences of length B; each field
        reaches the reward functions that accept it as a keyword argument (``rewards.base.accepted_metadata``).

        In-process rewards read ``videos_BTCHW`` from their thread until ``result()`` returns: do not modify it
        in place meanwhile (Ray rewards get a copy put into the object store before this returns).
        """
        validate_videos(videos_BTCHW, prompts)
        b = videos_BTCHW.shape[0]
        metadata = dict(metadata or {})
        self._validate_request(b, sample_ids, group_ids, metadata)
        prompts = list(prompts)
        videos_ref = None
        if any(spec.backend == "ray" for spec in self.config.rewards):
            import ray

            videos_ref = ray.put(videos_BTCHW.detach().cpu())  # one copy in the object store for all actors
        futures: dict[str, list[Future]] = {}
        for name, spec in self._specs.items():
            videos = videos_ref if spec.backend == "ray" else videos_BTCHW
            futures[name] = [
                self._lanes[name].submit(_Call(name, videos, prompts, metadata, lo, hi))
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
            if key in RESERVED_METADATA:
                raise ValueError(f"metadata field {key!r} clashes with an argument of the reward functions "
                                 f"({', '.join(RESERVED_METADATA)}); rename that field")
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
        scores, nan_counts, nan_ids, failed, errors, failures = {}, {}, {}, {}, {}, []
        details = {name: gather_details(results, b) for name, results in chunks.items()}
        for name, results in chunks.items():
            scores_B = torch.full((b,), math.nan)
            failed_mask = torch.zeros(b, dtype=torch.bool)
            for res in results:
                if res.error is None:
                    scores_B[res.lo : res.hi] = res.scores
                    continue
                ids, first_line = sample_ids[res.lo : res.hi], res.error.splitlines()[0]
                if self.config.on_error == "raise":
                    raise RewardError(self._error_message(name, ids, res), reward=name, sample_ids=ids,
                                      error=first_line, timed_out=res.timed_out)
                errors.setdefault(name, res.error)
                failures.append(RewardFailure(reward=name, sample_ids=ids, error=first_line, timed_out=res.timed_out))
                failed_mask[res.lo : res.hi] = True
            nan_B = scores_B.isnan() & ~failed_mask
            nan_counts[name] = int(nan_B.sum())
            nan_ids[name] = [sample_ids[i] for i in nan_B.nonzero().flatten().tolist()]
            failed[name] = [sample_ids[i] for i in failed_mask.nonzero().flatten().tolist()]
            scores[name] = scores_B
        drop_reasons = {} if group_ids is None else _drop_reasons(failures, dict(zip(sample_ids, group_ids)))
        if group_ids is None:
            keep_B = torch.ones(b, dtype=torch.bool)
        else:
            keep_B = torch.tensor([g not in drop_reasons for g in group_ids], dtype=torch.bool)
        return ScoreTable(
            sample_ids=sample_ids,
            raw=scores,
            weights=dict(self.weights),
            nan_counts=nan_counts,
            failed_ids=failed,
            errors=errors,
            dropped_ids=[sid for sid, keep in zip(sample_ids, keep_B.tolist()) if not keep],
            dropped_groups=list(drop_reasons),
            keep_B=keep_B,
            details=details,
            failures=failures,
            nan_ids=nan_ids,
            drop_reasons=drop_reasons,
        )

    def _error_message(self, name: str, ids: list[Hashable], res: ChunkResult) -> str:
        if res.timed_out:
            return (f"reward {name!r} timed out after {self.config.timeout_s:g} s on samples {ids}; raise the limit "
                    "(RewardSet timeout_s, train.reward_timeout_s in a mixgrpo config; 0 = no limit) or lower the "
                    "reward's batch_size")
        return f"reward {name!r} failed on samples {ids}: {res.error}"

    def close(self) -> None:
        """Stop the lanes and kill the reward actors. Never waits for a call that is still running."""
        for lane in set(self._lanes.values()):
            lane.close()
        self._lanes.clear()

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_reasons(failures: list[RewardFailure], group_of: dict[Hashable, Hashable]) -> dict[Hashable, str]:
    """Group id -> why it is dropped, for every group with a sample of a failed call (first failure first)."""
    failed_in: dict[Hashable, dict[tuple[str, str], list[Hashable]]] = {}
    for failure in failures:
        how = (failure.reward, "timed out" if failure.timed_out else "failed")
        for sid in failure.sample_ids:
            failed_in.setdefault(group_of[sid], {}).setdefault(how, []).append(sid)
    return {
        group: "; ".join(f"reward {name!r} {verb} for sample{'s' if len(ids) > 1 else ''} "
                         f"{', '.join(map(repr, ids))} under on_error=drop" for (name, verb), ids in by_reward.items())
        for group, by_reward in failed_in.items()
    }
