"""Rollouts on Ray workers.

One controller (the driver) runs the loop; ``RayRolloutEngine`` spreads each iteration's prompt groups over
``rollout.num_workers`` worker groups. A worker group is ``rollout.sp_size`` actors reserved together by a
STRICT_PACK placement group (one node); with ``sp_size > 1`` they form one torch.distributed group (NCCL on GPUs,
gloo on CPUs) and shard each video with Sparse Sequence Parallelism. Every rank of a group samples the same
request; rank 0 returns the result.

Every worker builds its own policy from the config dict: no model is pickled by the driver. After each update
the driver publishes the trainable tensors (only the LoRA tensors when LoRA is on) once to the object store, in
chunks, and every worker copies them in; a recreated group loads the same published tensors.

Faults: every random number of a rollout derives from the request's seeds, so when an actor dies mid-iteration
its whole group is recreated from the last synced weights and the group's share is redone with the original
seeds. The iteration completes with no sample lost or duplicated, and ``on_event("worker_restarted", ...)``
records it (the trainer writes it to the run's events.jsonl).

Security: a local instance started here has no dashboard, and Ray >= 2.52 enables token authentication for it
(``RAY_AUTH_MODE=token`` unless the user set it); nothing here turns that off. Only tensors this library put into
the object store, and results of its own workers, are deserialized. See docs/ray.md.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mixgrpo.config import ExperimentConfig
from mixgrpo.rollout import LocalRolloutEngine, RolloutRequest, RolloutResult
from mixgrpo.sampler import concat_trajectories

PLACEMENT_TIMEOUT_S = 600.0
"""How long a worker group may wait for its resources (a recreated group waits for the dead one's to free)."""
SYNC_CHUNK_BYTES = 512 * 2**20
"""Weights are published in object-store chunks of about this size, so the driver never stages a full copy."""


def sp_degrees(sp_size: int, sparse_ratio: int) -> tuple[int, int]:
    """(ssp_size, ulysses_size) for ``sp_size`` ranks: SSP takes as many ranks as divide the k*k subsequences
    (each rank then holds whole subsequences), Ulysses the rest."""
    if sp_size < 1 or sparse_ratio < 1:
        raise ValueError(f"rollout.sp_size ({sp_size}) and the model's sparse_ratio ({sparse_ratio}) must be >= 1")
    ssp = math.gcd(sp_size, sparse_ratio**2)
    return ssp, sp_size // ssp


def contiguous_shares(num_groups: int, num_workers: int) -> list[list[int]]:
    """Contiguous slices of ``num_groups`` prompt groups, one per worker group, sizes differing by at most one."""
    per, extra = divmod(num_groups, num_workers)
    out, start = [], 0
    for w in range(num_workers):
        size = per + (1 if w < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def chunk_tensors(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split a name -> tensor dict into dicts of at most ``max_bytes`` each (a larger tensor goes alone)."""
    chunks: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if chunks[-1] and size + nbytes > max_bytes:
            chunks.append({})
            size = 0
        chunks[-1][name] = tensor
        size += nbytes
    return [c for c in chunks if c]


# ---- the cluster ----

def gpus_without(visible: str | None, device_count: int, driver_index: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a local Ray instance: the driver's visible GPUs minus the learner's own.

    ``visible`` is the driver's ``CUDA_VISIBLE_DEVICES`` (None: all ``device_count`` GPUs); ``driver_index`` is
    the learner's device index among them. Ray only hands out what it sees, so workers never share its GPU.
    """
    ids = [i for i in visible.split(",") if i] if visible is not None else [str(i) for i in range(device_count)]
    if not 0 <= driver_index < len(ids):
        raise ValueError(f"train.device index {driver_index} is not among the {len(ids)} visible GPUs {ids}; "
                         "pick a visible cuda device")
    return ",".join(ids[:driver_index] + ids[driver_index + 1:])


def ensure_ray(num_cpus: int | None = None, *, driver_gpu: int | None = None) -> str:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a private local instance.

    Returns ``"connected"`` (already initialised), ``"joined"`` or ``"started"``. The local instance has no
    dashboard; ``address="local"`` keeps it from silently joining another cluster started on this machine.
    ``driver_gpu``: the learner's GPU index, hidden from a local instance so no worker is placed on it.
    """
    import ray

    if ray.is_initialized():
        return "connected"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return "joined"
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if driver_gpu is not None:
        # Ray reads the GPUs it may use from this variable when it starts; the driver's CUDA context is unaffected.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus_without(saved, torch.cuda.device_count(), driver_gpu)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    finally:
        if driver_gpu is not None:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return "started"


def missing_resources(*, num_workers: int, sp_size: int, use_gpu: bool, available: dict[str, float],
                      total: dict[str, float], per_node: list[dict[str, float]]) -> list[str]:
    """What a run lacks: one CPU (and one GPU) per rank free now, and ``sp_size`` of them on one node per group."""
    ranks = num_workers * sp_size
    kinds = ["CPU"] + (["GPU"] if use_gpu else [])
    missing = []
    for kind in kinds:
        if available.get(kind, 0) < ranks:
            missing.append(f"{ranks} {kind}s for {num_workers} worker groups x sp_size {sp_size} "
                           f"({available.get(kind, 0):g} free of {total.get(kind, 0):g} in the cluster)")
    for kind in kinds:
        biggest = max((node.get(kind, 0) for node in per_node), default=0)
        if sp_size > 1 and biggest < sp_size:
            missing.append(f"a node with {sp_size} {kind}s for one sequence-parallel group "
                           f"(the largest has {biggest:g})")
    return missing


def preflight(*, num_workers: int, sp_size: int, use_gpu: bool, settle_s: float = 30.0) -> None:
    """Compare what the run asks for with what the cluster has; raise saying exactly what is missing.

    Ray frees a killed actor's resources asynchronously, so a shortage is re-checked for up to ``settle_s``
    seconds before it is reported (an engine built right after another one shut down would otherwise fail)."""
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
    if missing:
        raise RuntimeError("rollout resources are not available: need " + "; ".join(missing) +
                           ". Lower rollout.num_workers or rollout.sp_size, or add nodes to the cluster.")


def _fault_types() -> tuple[type[BaseException], ...]:
    from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError, WorkerCrashedError

    return RayActorError, OutOfMemoryError, NodeDiedError, WorkerCrashedError


# ---- one rank of one worker group ----

class RolloutWorker:
    """One rank of one worker group. Builds its own policy from the config; only tensors cross the wire."""

    def __init__(self, cfg_dict: dict[str, Any], rank: int, world_size: int) -> None:
        from mixgrpo.config import config_from_dict
        from mixgrpo.learner import apply_lora
        from mixgrpo.policy_factory import build_policy

        self.cfg = cfg = config_from_dict(cfg_dict)
        self.rank, self.world_size = rank, world_size
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        # Ray restricts CUDA_VISIBLE_DEVICES to this actor's GPU, so "cuda" is the right one.
        self.device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.train.seed)  # same seed as the driver: randomly initialised parts match it
        self.policy = build_policy(cfg.policy, quantization=cfg.learner.quantization, device=str(self.device))
        self.policy.to(self.device)
        if cfg.learner.lora.enabled:
            apply_lora(self.policy.transformer, rank=cfg.learner.lora.rank, alpha=cfg.learner.lora.alpha,
                       targets=cfg.learner.lora.targets)
        self.policy.requires_grad_(False)
        self.engine = LocalRolloutEngine(self.policy, cfg.sampler, device=self.device,
                                         batch_groups=max(1, cfg.rollout.batch_size // cfg.rollout.group_size))

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0 hosts the group's rendezvous."""
        import ray
        import socket

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join_group(self, master: tuple[str, int]) -> None:
        """Form the group's process group and shard the transformer over it (SSP x Ulysses)."""
        import datetime
        import torch.distributed as dist
        from policies.parallel import apply_sequence_parallel

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank,
                                world_size=self.world_size, timeout=datetime.timedelta(minutes=10))
        transformer = self.policy.transformer
        sparse_ratio = getattr(getattr(transformer, "config", None), "sparse_ratio", None)
        if sparse_ratio is None:
            raise ValueError(f"rollout.sp_size={self.world_size} needs an OSP-Next transformer; "
                             f"{type(transformer).__name__} has no sequence-parallel plan: set rollout.sp_size=1")
        ssp, ulysses = sp_degrees(self.world_size, sparse_ratio)
        apply_sequence_parallel(transformer, ssp_size=ssp, ulysses_size=ulysses)

    def rollout(self, request: RolloutRequest) -> RolloutResult | None:
        result = self.engine.rollout(request)
        if self.rank != 0:
            return None  # every rank computed the same full result; one copy crosses the wire
        result.trajectory = result.trajectory.to("cpu")
        return result

    def load_weights(self, *chunks: dict[str, torch.Tensor]) -> int:
        """Copy published tensors into the transformer; returns how many were loaded."""
        params = dict(self.policy.transformer.named_parameters())
        count = 0
        with torch.no_grad():
            for chunk in chunks:
                unknown = sorted(set(chunk) - set(params))
                if unknown:
                    raise ValueError(f"synced weights name tensors this worker's policy lacks, e.g. {unknown[:3]}; "
                                     "driver and workers must use the same policy and learner.lora settings")
                for name, value in chunk.items():
                    params[name].copy_(value.to(params[name].device, params[name].dtype))
                    count += 1
        return count

    def ready(self) -> bool:
        return True


@dataclass
class _Group:
    actors: list[Any]
    placement_group: Any


class RayRolloutEngine:
    """Spreads prompt groups over Ray worker groups; same interface as ``LocalRolloutEngine``.

    ``policy`` is the driver's policy: its trainable tensors are published before the first rollout (so a
    resumed run's restored weights reach the workers). ``policy=None`` keeps the weights the workers built.
    """

    def __init__(self, cfg: ExperimentConfig, policy=None, *, device: torch.device,
                 on_event: Callable[..., None] | None = None, max_retries: int = 2) -> None:
        import ray

        self.cfg = cfg
        self.num_workers, self.sp_size = cfg.rollout.num_workers, cfg.rollout.sp_size
        self.use_gpu = device.type == "cuda"
        self.max_retries = max_retries
        self.on_event = on_event or (lambda kind, **fields: None)
        self._policy = policy
        self._weight_refs: list[Any] = []
        how = ensure_ray(driver_gpu=(device.index or 0) if self.use_gpu and policy is not None else None)
        preflight(num_workers=self.num_workers, sp_size=self.sp_size, use_gpu=self.use_gpu)
        self._actor_cls = ray.remote(num_cpus=1, num_gpus=1 if self.use_gpu else 0, max_restarts=0)(RolloutWorker)
        self._cfg_dict = cfg.to_dict()
        self.groups: list[_Group] = []
        for _ in range(self.num_workers):  # reserve every group first, so the actors build their policies in parallel
            self.groups.append(self._reserve_group())
        for group in self.groups:
            self._setup_group(group)
        self.on_event("rollout_workers_started", ray=how, num_workers=self.num_workers, sp_size=self.sp_size,
                      gpu=self.use_gpu)

    # ---- worker groups ----

    def _reserve_group(self) -> _Group:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": 1, **({"GPU": 1} if self.use_gpu else {})}
        pg = placement_group([bundle] * self.sp_size, strategy="STRICT_PACK")  # an SSP group never spans nodes
        if not pg.wait(PLACEMENT_TIMEOUT_S):
            raise RuntimeError(f"a rollout worker group ({self.sp_size} x {bundle}) got no resources within "
                               f"{PLACEMENT_TIMEOUT_S:g} s; check `ray status` and lower rollout.num_workers "
                               "or rollout.sp_size")
        actors = [self._actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank)).remote(self._cfg_dict, rank, self.sp_size)
            for rank in range(self.sp_size)]
        return _Group(actors=actors, placement_group=pg)

    def _setup_group(self, group: _Group) -> None:
        import ray

        if self.sp_size > 1:
            master = ray.get(group.actors[0].master_address.remote())
            ray.get([a.join_group.remote(master) for a in group.actors])
        ray.get([a.ready.remote() for a in group.actors])
        if self._weight_refs:
            ray.get([a.load_weights.remote(*self._weight_refs) for a in group.actors])

    def _kill_group(self, group: _Group) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in group.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(group.placement_group)

    def _restart_group(self, index: int, error: BaseException, iteration: int | None, groups: list[int]) -> None:
        """Replace worker group ``index`` (all its ranks: a collective group cannot lose one member)."""
        self._kill_group(self.groups[index])
        self.groups[index] = self._reserve_group()
        self._setup_group(self.groups[index])
        self.on_event("worker_restarted", worker_group=index, iteration=iteration, redone_groups=groups,
                      error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")

    def shares(self, num_groups: int) -> list[list[int]]:
        return contiguous_shares(num_groups, self.num_workers)

    # ---- rollouts ----

    def _submit(self, w: int, part: RolloutRequest) -> list[Any]:
        return [actor.rollout.remote(part) for actor in self.groups[w].actors]

    def rollout(self, request: RolloutRequest) -> RolloutResult:
        import ray

        if not self._weight_refs and self._policy is not None:
            self.sync_weights({k: p for k, p in self._policy.transformer.named_parameters() if p.requires_grad})
        start = time.perf_counter()
        shares = {w: share for w, share in enumerate(self.shares(len(request.prompts))) if share}
        parts = {w: request.slice(share) for w, share in shares.items()}
        inflight = {w: self._submit(w, part) for w, part in parts.items()}
        attempts = dict.fromkeys(parts, 0)
        finished: dict[Any, Any] = {}  # ref -> value of every rank that returned
        results: dict[int, RolloutResult] = {}
        while inflight:
            owner = {ref: w for w, refs in inflight.items() for ref in refs if ref not in finished}
            [ref], _ = ray.wait(list(owner), num_returns=1)
            w = owner[ref]
            try:
                finished[ref] = ray.get(ref)  # a dead rank surfaces here, before its peers' collectives time out
            except _fault_types() as error:
                attempts[w] += 1
                if attempts[w] > self.max_retries:
                    raise RuntimeError(f"rollout worker group {w} failed {attempts[w]} times in iteration "
                                       f"{request.iteration}; last error: {error}") from error
                self._restart_group(w, error, request.iteration, [request.group_ids[g] for g in shares[w]])
                inflight[w] = self._submit(w, parts[w])
                continue
            if all(r in finished for r in inflight[w]):
                results[w] = finished[inflight.pop(w)[0]]
        ordered = [results[w] for w in sorted(results)]
        trajectories = [r.trajectory for r in ordered]
        return RolloutResult(
            request=request,
            trajectory=concat_trajectories(trajectories) if len(trajectories) > 1 else trajectories[0],
            videos_BTCHW=torch.cat([r.videos_BTCHW for r in ordered]),
            nfe=ordered[0].nfe,
            seconds=time.perf_counter() - start,
        )

    # ---- weights ----

    def sync_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Publish the learner's trainable weights (only LoRA tensors when LoRA is on) and load them everywhere.

        Each chunk is put into the object store once and shared by every worker; the driver stages at most one
        chunk on the CPU at a time. The published chunks stay referenced, so a recreated group loads them.
        """
        import ray

        refs = []
        for chunk in chunk_tensors(tensors, SYNC_CHUNK_BYTES):
            refs.append(ray.put({k: v.detach().to("cpu", copy=False) for k, v in chunk.items()}))
        self._weight_refs = refs
        pending = {w: [a.load_weights.remote(*refs) for a in group.actors] for w, group in enumerate(self.groups)}
        for w, load_refs in pending.items():
            try:
                ray.get(load_refs)
            except _fault_types() as error:
                self._restart_group(w, error, None, [])  # the new group loads the chunks just published

    def shutdown(self) -> None:
        """Kill the worker actors and free their placement groups (the Ray instance itself is left running)."""
        for group in self.groups:
            self._kill_group(group)
        self.groups = []
        self._weight_refs = []
