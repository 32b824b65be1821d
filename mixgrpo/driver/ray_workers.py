"""Colocated sampling and learning on Ray: N worker groups of S GPUs, one torch.distributed world.

One controller (the driver) runs the loop on the CPU and holds no model. ``RayWorkers`` starts
``rollout.num_workers`` worker groups of ``rollout.sp_size`` ranks each; every group is reserved by a STRICT_PACK
placement group (an SSP group never spans nodes) and all ``N x S`` ranks join ONE torch.distributed world (NCCL
on GPUs, gloo on CPUs) set up inside the actors. Each rank runs a :class:`mixgrpo.engine.worker.PolicyWorker`:

1. rollout: group g samples its contiguous share of the prompt groups, every rank of the group the same request,
   the video sharded by SSP x Ulysses; rank 0 of the group returns the videos (trajectories stay on the ranks);
2. the driver scores the videos and computes advantages;
3. update: every rank trains on its group's samples (the model still sharded by SSP/Ulysses, and by FSDP with
   ``learner.sharding=fsdp``); gradients are summed over all N x S ranks and every rank takes the same optimizer
   step: nothing is synced afterwards.

Faults: a rank that dies (or makes no progress for ``rollout.timeout_s``, e.g. a stopped process) breaks the
collective world. The driver then tears every group down, starts them again, restores each rank's state as it
was when the interrupted iteration began (a snapshot taken then, kept in the object store and owned by the
driver, so it outlives the actors), and redoes the iteration with its original seeds: the iteration completes
once, as if nothing happened, and ``on_event("worker_restarted", ...)`` records it. With
``rollout.recovery=stop`` (the default for FSDP, whose optimizer state is too large to copy every iteration) the
run ends instead, with an event and an error that says to resume from the last checkpoint.

Security: a local instance started here has no dashboard, and Ray >= 2.52 enables token authentication for it;
nothing here turns that off. Only this library's own requests, tensors and results are
(un)pickled. See docs/ray.md.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mixgrpo.config import ExperimentConfig, config_from_dict
from mixgrpo.engine.learner import UpdatePlan, merge_update_stats
from mixgrpo.engine.rollout import RolloutRequest, RolloutResult
from mixgrpo.engine.worker import PolicyWorker, world_dims
from policies.parallel.dims import ParallelDims

PLACEMENT_TIMEOUT_S = 600.0
"""How long a worker group may wait for its resources (a restarted world waits for the dead one's to free)."""


class WorkerFault(RuntimeError):
    """A rank died or stopped making progress: the collective world is broken and must be restarted."""


# ---- the cluster ----

def ensure_ray(num_cpus: int | None = None) -> str:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a private local instance.

    Returns ``"connected"`` (already initialised), ``"joined"`` or ``"started"``. The local instance has no
    dashboard; ``address="local"`` keeps it from silently joining another cluster started on this machine. Its GCS,
    raylet and agents still listen on the node's address (Ray offers no loopback-only mode): token authentication,
    on by default, is what refuses other clients (docs/ray.md, Security).
    """
    import ray

    global _HOW
    if ray.is_initialized():
        return _HOW or "connected"  # how this process first got its Ray (the preflight may have done it)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        _HOW = "joined"
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        _HOW = "started"
    return _HOW


_HOW: str | None = None


def missing_resources(*, num_workers: int, sp_size: int, use_gpu: bool, available: dict[str, float],
                      total: dict[str, float], per_node: list[dict[str, float]]) -> list[str]:
    """What a run lacks: one CPU (and one GPU) per rank free now, and ``sp_size`` of them on one node per group
    (counted node by node: 8 GPUs split 4 + 2 + 2 hold one group of 4, not two)."""
    ranks = num_workers * sp_size
    kinds = ["CPU"] + (["GPU"] if use_gpu else [])
    missing = []
    for kind in kinds:
        if available.get(kind, 0) < ranks:
            missing.append(f"{ranks} {kind}s for {num_workers} worker groups x sp_size {sp_size} "
                           f"({available.get(kind, 0):g} free of {total.get(kind, 0):g} in the cluster)")
    for kind in kinds:
        biggest = max((node.get(kind, 0) for node in per_node), default=0)
        fit = sum(int(node.get(kind, 0) // sp_size) for node in per_node)  # groups the nodes can hold, each on one
        if sp_size > 1 and biggest < sp_size:
            missing.append(f"a node with {sp_size} {kind}s for one sequence-parallel group "
                           f"(the largest has {biggest:g})")
        elif sp_size > 1 and fit < num_workers and available.get(kind, 0) >= ranks:  # not already short in total
            missing.append(f"{num_workers} x {sp_size} {kind}s on single nodes, one sequence-parallel group each "
                           f"(the nodes can hold {fit})")
    return missing


def preflight(*, num_workers: int, sp_size: int, use_gpu: bool, settle_s: float = 30.0) -> None:
    """Compare what the run asks for with what the cluster has; raise saying exactly what is missing.

    Ray frees a killed actor's resources asynchronously, so a shortage is re-checked for up to ``settle_s``
    seconds before it is reported (a world restarted right after the old one was killed would otherwise fail)."""
    import ray

    def shortage(use_total: bool) -> list[str]:
        total = ray.cluster_resources()
        per_node = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        return missing_resources(num_workers=num_workers, sp_size=sp_size, use_gpu=use_gpu, per_node=per_node,
                                 available=total if use_total else ray.available_resources(), total=total)

    missing = shortage(use_total=True)  # the cluster is too small: no point waiting
    deadline = time.monotonic() + settle_s
    while not missing:
        missing = shortage(use_total=False)
        if not missing:
            return
        if time.monotonic() < deadline:
            missing = []
            time.sleep(0.5)
    raise RuntimeError("Ray resources are not available: need " + "; ".join(missing) +
                       f" ({num_workers * sp_size} ranks in all, {sp_size} per node). Lower rollout.num_workers or "
                       "rollout.sp_size, or add nodes to the cluster.")


def cluster_fits(cfg: ExperimentConfig) -> None:
    """Join or start Ray and raise (RuntimeError, saying what is missing) unless it can host the run's ranks."""
    ensure_ray()
    dims = ray_dims(cfg)
    preflight(num_workers=dims.num_groups, sp_size=dims.sp_size, use_gpu=dims.use_gpu)


def ray_dims(cfg: ExperimentConfig) -> ParallelDims:
    """The run's world on this Ray cluster (``ensure_ray`` first): GPUs unless ``train.device=cpu`` (or ``auto``
    on a cluster without any)."""
    use_gpu = cfg.train.device != "cpu" and (cfg.train.device != "auto" or _cluster_has_gpus())
    return world_dims(cfg, use_gpu=use_gpu)


def _fault_types() -> tuple[type[BaseException], ...]:
    from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError, WorkerCrashedError

    return RayActorError, OutOfMemoryError, NodeDiedError, WorkerCrashedError


COLLECTIVE_FAILURES = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer", "Broken pipe")
"""What a rank's error says when a collective broke because a peer died or hung (not a bug of its own)."""


def is_collective_failure(error: BaseException) -> bool:
    """A rank's error caused by the world breaking under it: torch's distributed errors, or gloo/NCCL failures."""
    import torch.distributed as dist

    cause = getattr(error, "cause", None) or error
    return isinstance(cause, dist.DistError) or any(marker in str(error) for marker in COLLECTIVE_FAILURES)


# ---- one rank, as a Ray actor ----

KEEP_VISIBLE_DEVICES = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
"""Ray would hide every GPU but its own from each actor; NCCL then cannot reach the peers' GPUs directly (no
NVLink/P2P between the ranks of a node, only copies through host memory). With this set, actors see the node's
GPUs and pick the one Ray assigned them (:func:`assigned_gpu_index`), as torchrun's ranks do."""


def assigned_gpu_index() -> int:
    """The CUDA index, among the GPUs this process sees, of the GPU Ray assigned to this actor."""
    import ray

    gpu = str(ray.get_gpu_ids()[0])
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    return visible.index(gpu) if visible else int(gpu)

class WorkerActor:
    """A :class:`PolicyWorker` inside a Ray actor; the driver calls its methods through :meth:`call`."""

    LEADER_ONLY = frozenset({"rollout", "update", "generate"})
    """Methods whose result every rank of a group computes alike: only the group's leader sends it back."""

    def __init__(self, cfg_dict: dict[str, Any], dims: ParallelDims) -> None:
        self.cfg = config_from_dict(cfg_dict)
        self.dims = dims
        if self.cfg.train.threads > 0:
            torch.set_num_threads(self.cfg.train.threads)
        # dims.use_gpu: the driver reserved one GPU for this actor
        self.device = torch.device("cuda", assigned_gpu_index()) if dims.use_gpu else torch.device("cpu")
        if dims.use_gpu:
            torch.cuda.set_device(self.device)
        self.worker: PolicyWorker | None = None

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port: global rank 0 hosts the world's rendezvous."""
        import socket

        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def start(self, master: tuple[str, int]) -> bool:
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        extra = {"device_id": self.device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.dims.rank,
                                world_size=self.dims.world_size, timeout=datetime.timedelta(minutes=30), **extra)
        self.worker = PolicyWorker(self.cfg, device=self.device, dims=self.dims)
        return True

    def call(self, method: str, *args: Any) -> Any:
        """``worker.<method>(*args)``; None from a group's followers for :data:`LEADER_ONLY` methods, and True for
        methods that return nothing (a result to wait for)."""
        result = getattr(self.worker, method)(*args)
        if method in self.LEADER_ONLY and not self.dims.leads_group:
            return None  # every rank of the group computed the same; one copy crosses the wire
        if method == "rollout":
            result.trajectory = None  # stays on the ranks for the update
        return True if result is None else result


@dataclass
class _Group:
    actors: list[Any]
    placement_group: Any


class RayWorkers:
    """``rollout.num_workers`` x ``rollout.sp_size`` ranks that sample and learn; the trainer's side of them."""

    def __init__(self, cfg: ExperimentConfig, *, on_event: Callable[..., None] | None = None,
                 max_restarts: int = 2) -> None:
        import ray

        self.cfg = cfg
        self.how = ensure_ray()
        self.dims = ray_dims(cfg)
        self.num_groups, self.sp_size = self.dims.num_groups, self.dims.sp_size
        self.world_size, self.sharded, self.use_gpu = self.dims.world_size, self.dims.sharded, self.dims.use_gpu
        self.max_restarts = max_restarts
        self.timeout_s = cfg.rollout.timeout_s
        self.recovery = cfg.rollout.recovery
        if self.recovery == "auto":
            self.recovery = "stop" if self.sharded else "snapshot"
        self.on_event = on_event or (lambda kind, **fields: None)
        preflight(num_workers=self.num_groups, sp_size=self.sp_size, use_gpu=self.use_gpu)
        options = {"runtime_env": {"env_vars": KEEP_VISIBLE_DEVICES}} if self.use_gpu else {}
        self._actor_cls = ray.remote(num_cpus=1, num_gpus=1 if self.use_gpu else 0, max_restarts=0,
                                     **options)(WorkerActor)
        self._cfg_dict = cfg.to_dict()
        self.groups: list[_Group] = []
        self.shares: list[tuple[int, int]] = []
        self._start()
        self.on_event("workers_started", ray=self.how, num_workers=self.num_groups, sp_size=self.sp_size,
                      world_size=self.world_size, gpu=self.use_gpu, sharding=cfg.learner.sharding)

    # ---- the world ----

    @property
    def actors(self) -> list[Any]:
        return [actor for group in self.groups for actor in group.actors]

    @property
    def leaders(self) -> list[Any]:
        return [group.actors[0] for group in self.groups]

    def _start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": 1, **({"GPU": 1} if self.use_gpu else {})}
        self.groups = []
        try:
            # Reserve every group first, so that all ranks build their policies in parallel. Each reservation and
            # actor is recorded as it is made: a start that fails halfway frees them (_kill) instead of leaking them.
            for _ in range(self.num_groups):
                pg = placement_group([bundle] * self.sp_size, strategy="STRICT_PACK")
                self.groups.append(_Group(actors=[], placement_group=pg))
                if not pg.wait(PLACEMENT_TIMEOUT_S):
                    raise RuntimeError(f"a worker group ({self.sp_size} x {bundle}) got no resources within "
                                       f"{PLACEMENT_TIMEOUT_S:g} s; check `ray status` and lower rollout.num_workers "
                                       "or rollout.sp_size")
            for g, group in enumerate(self.groups):
                group.actors.extend(self._actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group.placement_group,
                    placement_group_bundle_index=rank - g * self.sp_size)).remote(
                        self._cfg_dict, self.dims.at_rank(rank)) for rank in self.dims.group_ranks(g))
            master = ray.get(self.actors[0].master_address.remote())
            self._call([a.start.remote(master) for a in self.actors], "start")
        except BaseException:
            self._kill()
            raise

    def _kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            for actor in group.actors:
                ray.kill(actor, no_restart=True)
            remove_placement_group(group.placement_group)
        self.groups = []

    def _call(self, refs: list[Any], what: str) -> list[Any]:
        """Results of ``refs`` (one per actor call) in order. A dead rank, or no call finishing for
        ``rollout.timeout_s``, raises :class:`WorkerFault`; the wait wakes every second so Ctrl-C gets through."""
        import ray
        from ray.exceptions import RayTaskError

        pending, done = list(refs), {}
        last_progress = time.monotonic()
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            for ref in ready:
                try:
                    done[ref] = ray.get(ref)
                except _fault_types() as error:
                    raise WorkerFault(f"a rank died during {what}: {_first_line(error)}") from error
                except RayTaskError as error:
                    if not is_collective_failure(error):
                        raise  # a Python error of the worker's own (a bug, bad input): redoing would fail again
                    raise WorkerFault(f"a collective broke during {what} (a peer rank died or hung): "
                                      f"{_first_line(error.cause or error)}") from error
            if ready:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.timeout_s:
                raise WorkerFault(f"no rank finished {what} for {self.timeout_s:g} s (rollout.timeout_s): a rank is "
                                  "hung or stopped")
        return [done[ref] for ref in refs]

    # ---- one iteration ----

    def rollout(self, request: RolloutRequest) -> RolloutResult:
        start = time.perf_counter()
        prompt_shares = self.dims.prompt_shares(len(request.prompts))
        self.shares = self.dims.sample_shares(len(request.prompts), request.group_size)
        refs = []
        for group, share in zip(self.groups, prompt_shares):
            part = request.slice(share)
            refs.extend(actor.call.remote("rollout", part) for actor in group.actors)
        results = [r for r in self._call(refs, "rollout") if r is not None]
        return RolloutResult(request=request, trajectory=None,
                             videos_BTCHW=torch.cat([r.videos_BTCHW for r in results]),
                             nfe=results[0].nfe, seconds=time.perf_counter() - start)

    def update(self, advantages_B: torch.Tensor, plan: UpdatePlan) -> dict[str, float]:
        refs = []
        for group, (first, count) in zip(self.groups, self.shares):
            part = advantages_B[first:first + count].clone()
            refs.extend(actor.call.remote("update", part, plan, (first, count)) for actor in group.actors)
        return merge_update_stats([s for s in self._call(refs, "update") if s is not None])

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """ODE videos of the current policy, the prompts spread over the worker groups."""
        shares = self.dims.prompt_shares(len(prompts))
        refs = []
        for group, share in zip(self.groups, shares):
            # every rank takes part (sharded weights are gathered collectively); an idle group draws one filler
            picked = share or [0]
            refs.extend(actor.call.remote("generate", [prompts[i] for i in picked], [seeds[i] for i in picked])
                        for actor in group.actors)
        videos = [v for v in self._call(refs, "generate") if v is not None]
        return torch.cat([v for v, share in zip(videos, shares) if share])

    def attempt(self, step: Callable[[], Any], iteration: int) -> Any:
        """Run one iteration; after a rank fault, restart the world from the iteration's starting state and redo it."""
        snapshot = self._snapshot() if self.recovery == "snapshot" else None
        for attempt in range(self.max_restarts + 1):
            try:
                return step()
            except WorkerFault as fault:
                if snapshot is None:
                    self.on_event("worker_failed", iteration=iteration, error=str(fault))
                    raise RuntimeError(f"iteration {iteration}: {fault}. rollout.recovery=stop: resume the run with "
                                       "--resume (from its last checkpoint), or set rollout.recovery=snapshot") from fault
                if attempt == self.max_restarts:
                    raise RuntimeError(f"iteration {iteration} failed {attempt + 1} times; last: {fault}") from fault
                self.on_event("worker_restarted", iteration=iteration, attempt=attempt + 1, error=str(fault))
                try:
                    self._kill()
                    preflight(num_workers=self.num_groups, sp_size=self.sp_size, use_gpu=self.use_gpu)
                    self._start()
                    self._restore(snapshot)
                except Exception as error:  # e.g. the snapshot was lost with the node that held it
                    self.on_event("worker_failed", iteration=iteration, error=f"restart failed: {error}")
                    raise RuntimeError(f"iteration {iteration}: the worker groups could not be restarted after "
                                       f"'{fault}' ({_first_line(error)}); resume the run with --resume (from its "
                                       "last checkpoint)") from error

    def _snapshot(self) -> list[Any]:
        """Each rank's state at the start of an iteration, as driver-owned object refs (they outlive the actors).
        Unsharded ranks hold identical states: rank 0's is kept for all. Not waited for: an actor runs its calls in
        order, so the copy is taken before the iteration's rollout there, and resolved only if it is needed."""
        actors = self.actors if self.sharded else self.actors[:1]
        return [actor.call.remote("local_state") for actor in actors]

    def _restore(self, snapshot: list[Any]) -> None:
        refs = [actor.call.remote("load_local_state", snapshot[rank if self.sharded else 0])
                for rank, actor in enumerate(self.actors)]
        self._call(refs, "restore")

    # ---- checkpoints ----

    def checkpoint_payload(self):
        import ray

        return ray.get(self.actors[0].call.remote("checkpoint_payload"))

    def save_sharded(self, folder) -> None:
        self._call([actor.call.remote("save_sharded", str(folder)) for actor in self.actors], "checkpoint")

    def load_checkpoint(self, path) -> None:
        self._call([actor.call.remote("load_checkpoint", str(path)) for actor in self.actors], "resume")

    def shutdown(self) -> None:
        """Kill the actors and free their placement groups (the Ray instance itself is left running)."""
        self._kill()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
