"""Rollouts on Ray workers.

One controller (the driver) runs the loop; ``RayRolloutEngine`` spreads each iteration's prompt groups over
``rollout.num_workers`` worker groups. A worker group is ``rollout.sp_size`` actors packed on one node by a
placement group; together they form one torch.distributed group (NCCL on GPUs, gloo on CPUs) and shard each video
with Sparse Sequence Parallelism. Every rank of a group samples the same request and rank 0 returns the result.

Every random number of a rollout derives from the request's seeds, so a worker group that dies mid-iteration is
recreated from the last synced weights and its share is redone with the original seeds: the iteration completes
with no sample lost or duplicated, and the event goes to the run's event log.

Security defaults: the local instance started here has no dashboard, binds to the loopback interface, and only
objects produced by this library's own workers cross the object store.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mixgrpo.config import ExperimentConfig
from mixgrpo.rollout import LocalRolloutEngine, RolloutRequest, RolloutResult
from mixgrpo.sampler import Trajectory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else start a local instance."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False,
             configure_logging=False)


def preflight(*, num_workers: int, sp_size: int, use_gpu: bool) -> None:
    """Compare what the run asks for with what the cluster has; say exactly what is missing."""
    import ray

    have = ray.cluster_resources()
    need_gpu = num_workers * sp_size if use_gpu else 0
    need_cpu = num_workers * sp_size
    missing = []
    if have.get("CPU", 0) < need_cpu:
        missing.append(f"{need_cpu} CPUs for {num_workers} worker groups x sp_size {sp_size} (cluster has {have.get('CPU', 0):g})")
    if have.get("GPU", 0) < need_gpu:
        missing.append(f"{need_gpu} GPUs (cluster has {have.get('GPU', 0):g})")
    if missing:
        raise RuntimeError("rollout resources are not available: need " + "; ".join(missing) +
                           ". Lower rollout.num_workers or rollout.sp_size, or add nodes to the cluster.")


class RolloutWorker:
    """One rank of one worker group. Builds its own policy from the config (no model crosses the wire)."""

    def __init__(self, cfg_dict: dict[str, Any], rank: int, world_size: int, master: tuple[str, int] | None) -> None:
        from mixgrpo.config import config_from_dict
        from mixgrpo.learner import apply_lora
        from mixgrpo.policy_factory import build_policy

        cfg = config_from_dict(cfg_dict)
        torch.manual_seed(cfg.train.seed)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
        self.policy = build_policy(cfg.policy, quantization=cfg.learner.quantization).to(self.device)
        if cfg.learner.lora.enabled:
            apply_lora(self.policy.transformer, rank=cfg.learner.lora.rank, alpha=cfg.learner.lora.alpha,
                       targets=cfg.learner.lora.targets)
        self.rank = rank
        if world_size > 1:
            self._join_group(cfg, rank, world_size, master)
        self.engine = LocalRolloutEngine(self.policy, cfg.sampler, device=self.device,
                                         batch_groups=max(1, cfg.rollout.batch_size // cfg.rollout.group_size))

    def _join_group(self, cfg: ExperimentConfig, rank: int, world_size: int, master: tuple[str, int]) -> None:
        import torch.distributed as dist
        from policies.parallel import apply_sequence_parallel

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=rank, world_size=world_size)
        ssp = min(world_size, cfg.policy.sparse_ratio**2)
        apply_sequence_parallel(self.policy.transformer, ssp_size=ssp, ulysses_size=world_size // ssp)

    def rollout(self, request: RolloutRequest) -> RolloutResult | None:
        result = self.engine.rollout(request)
        if self.rank != 0:
            return None
        result.trajectory = result.trajectory.to("cpu")
        return result

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.policy.transformer.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def ready(self) -> bool:
        return True


@dataclass
class _Group:
    actors: list[Any]
    placement_group: Any


class RayRolloutEngine:
    """Spreads prompt groups over Ray worker groups; same interface as ``LocalRolloutEngine``."""

    def __init__(self, cfg: ExperimentConfig, policy, *, device: torch.device,
                 on_event: Callable[..., None] | None = None) -> None:
        import ray

        self.cfg = cfg
        self.num_workers, self.sp_size = cfg.rollout.num_workers, cfg.rollout.sp_size
        self.use_gpu = device.type == "cuda"
        self.on_event = on_event or (lambda kind, **fields: None)
        ensure_ray()
        preflight(num_workers=self.num_workers, sp_size=self.sp_size, use_gpu=self.use_gpu)
        self._actor_cls = ray.remote(num_cpus=1, num_gpus=1 if self.use_gpu else 0)(RolloutWorker)
        self._synced: dict[str, torch.Tensor] = {k: v.detach().cpu().clone()
                                                  for k, v in policy.transformer.named_parameters() if v.requires_grad}
        self.groups = [self._start_group() for _ in range(self.num_workers)]
        ray.get([a.ready.remote() for g in self.groups for a in g.actors])

    def _start_group(self) -> _Group:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": 1, **({"GPU": 1} if self.use_gpu else {})}
        pg = placement_group([bundle] * self.sp_size, strategy="STRICT_PACK")  # an SSP group never spans nodes
        ray.get(pg.ready())
        master = ("127.0.0.1", _free_port()) if self.sp_size > 1 else None
        cfg_dict = self.cfg.to_dict()
        actors = [
            self._actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank)).remote(cfg_dict, rank, self.sp_size, master)
            for rank in range(self.sp_size)
        ]
        ray.get([a.load_weights.remote(self._synced) for a in actors])
        return _Group(actors=actors, placement_group=pg)

    def _restart_group(self, index: int, error: Exception, iteration: int) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        old = self.groups[index]
        for actor in old.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(old.placement_group)
        self.groups[index] = self._start_group()
        self.on_event("worker_restarted", worker_group=index, iteration=iteration, error=f"{type(error).__name__}: {error}")

    def shares(self, num_groups: int) -> list[list[int]]:
        """Contiguous slices of the prompt groups, one per worker group (some may be empty)."""
        per, extra = divmod(num_groups, self.num_workers)
        out, start = [], 0
        for w in range(self.num_workers):
            size = per + (1 if w < extra else 0)
            out.append(list(range(start, start + size)))
            start += size
        return out

    def rollout(self, request: RolloutRequest, *, max_retries: int = 2) -> RolloutResult:
        import ray
        from ray.exceptions import RayActorError, ActorDiedError, ActorUnavailableError

        start = time.perf_counter()
        shares = self.shares(len(request.prompts))
        pending = {w: request.slice(share) for w, share in enumerate(shares) if share}
        results: dict[int, RolloutResult] = {}
        for attempt in range(max_retries + 1):
            futures = {w: [a.rollout.remote(part) for a in self.groups[w].actors] for w, part in pending.items()}
            failed = {}
            for w, refs in futures.items():
                try:
                    results[w] = ray.get(refs)[0]
                except (RayActorError, ActorDiedError, ActorUnavailableError) as error:
                    failed[w] = error
            if not failed:
                break
            if attempt == max_retries:
                raise RuntimeError(f"rollout worker groups {sorted(failed)} failed {max_retries + 1} times; "
                                   f"last error: {next(iter(failed.values()))}")
            for w, error in failed.items():
                self._restart_group(w, error, request.iteration)
            pending = {w: pending[w] for w in failed}
        ordered = [results[w] for w in sorted(results)]
        return RolloutResult(
            request=request,
            trajectory=Trajectory.concat([r.trajectory for r in ordered]),
            videos_BTCHW=torch.cat([r.videos_BTCHW for r in ordered]),
            nfe=ordered[0].nfe,
            seconds=time.perf_counter() - start,
        )

    def sync_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Send the learner's trainable weights (only LoRA weights when LoRA is on) to every worker."""
        import ray

        self._synced = {k: v.detach().cpu().clone() for k, v in tensors.items()}
        ref = ray.put(self._synced)
        ray.get([a.load_weights.remote(ref) for g in self.groups for a in g.actors])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            for actor in group.actors:
                ray.kill(actor, no_restart=True)
            remove_placement_group(group.placement_group)
        self.groups = []
