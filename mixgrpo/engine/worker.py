"""One rank that samples and learns, the in-process set of workers of the local backend, and what both sets share.

A :class:`PolicyWorker` builds the policy (``mixgrpo.engine.policy_factory.build_policy``) prepared for its world
(a :class:`policies.parallel.dims.ParallelDims`: sequence parallelism inside a worker group, FSDP over every rank
with ``learner.sharding=fsdp``), samples its share of each iteration's prompt groups, keeps the trajectories where
they were made, and trains on them when the driver sends the advantages. Every rank takes the same optimizer step
(gradients are summed over all ranks), so no weights ever travel.

:class:`LocalWorkers` is one worker in the driver's process (``rollout.backend=local``);
``mixgrpo.driver.ray_workers.RayWorkers`` runs ``num_workers x sp_size`` of them as Ray actors. The trainer talks to
both through :class:`WorkerSet`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from mixgrpo.config import ExperimentConfig
from mixgrpo.engine.checkpoint import learner_payload, load_learner_state, save_learner_shards
from mixgrpo.engine.learner import Learner, UpdateBatch, UpdatePlan, UpdateStats, merge_update_stats
from mixgrpo.engine.policy_factory import build_policy, transformer_geometry
from mixgrpo.engine.rollout import LocalRolloutEngine, RolloutRequest, RolloutResult, generate
from policies.parallel.dims import ParallelDims
from policies.prepare import mixed_precision_dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def world_dims(cfg: ExperimentConfig, *, use_gpu: bool = False) -> ParallelDims:
    """The run's world, from its config: ``rollout.num_workers`` worker groups of ``rollout.sp_size`` ranks (one
    group on the local backend), split into SSP x Ulysses for its transformer, FSDP or not. Rank 0; each rank
    takes ``.at_rank(r)``. Raises ``ValueError`` naming ``rollout.sp_size`` when it does not fit the model."""
    fsdp = cfg.learner.sharding == "fsdp"
    if cfg.rollout.backend != "ray":
        return ParallelDims(fsdp=fsdp, use_gpu=use_gpu)
    heads, sparse_ratio = transformer_geometry(cfg.policy) if cfg.rollout.sp_size > 1 else (None, None)
    return ParallelDims.for_model(num_groups=cfg.rollout.num_workers, sp_size=cfg.rollout.sp_size, num_heads=heads,
                                  sparse_ratio=sparse_ratio, fsdp=fsdp, use_gpu=use_gpu)


@runtime_checkable
class WorkerSet(Protocol):
    """What the trainer drives: the local worker (:class:`LocalWorkers`) or the Ray worker groups (``RayWorkers``)."""

    world_size: int
    """Ranks that compute each update."""
    sharded: bool
    """FSDP: checkpoints are written by every rank (``save_sharded``), not from ``checkpoint_payload``."""
    shares: list[tuple[int, int]]
    """``(first sample, number of samples)`` of each worker group in the last rollout."""

    def rollout(self, request: RolloutRequest) -> RolloutResult: ...

    def update(self, advantages_B: torch.Tensor, plan: UpdatePlan) -> dict[str, float]: ...

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor: ...

    def attempt(self, step: Callable[[], Any], iteration: int) -> Any: ...
    def checkpoint_payload(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]: ...

    def save_sharded(self, folder: Path) -> None: ...

    def load_checkpoint(self, path: Path) -> None: ...

    def shutdown(self) -> None: ...


class PolicyWorker:
    """One rank: policy, learner and the trajectories of its share of the current iteration."""

    def __init__(self, cfg: ExperimentConfig, *, device: torch.device, dims: ParallelDims = ParallelDims()) -> None:
        self.cfg, self.device, self.dims = cfg, device, dims
        self.sharded = dims.sharded
        mesh = dims.world_mesh() if dims.distributed else None
        self.policy = build_policy(cfg, device=device, dims=dims, mesh=mesh)
        reference = None
        if dims.distributed and cfg.learner.kl_coeff > 0 and cfg.learner.kl_reference == "frozen_copy":
            # A sharded model cannot be deep-copied: build the frozen base the same way, sharded alike.
            reference = build_policy(cfg, device=device, dims=dims, mesh=mesh, trainable=False).transformer
        # Unsharded over several ranks: the learner sums gradients over the world itself (FSDP does when sharded).
        grad_group = mesh.get_group() if mesh is not None and not self.sharded else None
        self.learner = Learner(self.policy.transformer, cfg.learner, cfg.sampler, autocast=self._autocast,
                               reference=reference, grad_group=grad_group)
        self.engine = LocalRolloutEngine(self.policy, cfg.sampler, device=device,
                                         batch_groups=max(1, cfg.rollout.batch_size // cfg.rollout.group_size),
                                         keep_uncond=cfg.learner.reuse_rollout_uncond)
        self.batch: UpdateBatch | None = None

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = mixed_precision_dtype(self.cfg.learner.mixed_precision)
        if dtype is None or self.sharded:  # FSDP already computes in the mixed-precision dtype
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _full_parameters(self) -> contextlib.AbstractContextManager:
        """Sampling runs many no-grad forwards whose count differs between worker groups: with FSDP, gather the
        weights once first so those forwards need no collectives."""
        if not self.sharded:
            return contextlib.nullcontext()
        from policies.parallel.fsdp import gathered

        return gathered(self.policy.transformer)

    # ---- one iteration ----

    def rollout(self, request: RolloutRequest) -> RolloutResult:
        """Sample ``request`` (this worker group's share) and keep what the update needs on this rank."""
        with self._full_parameters():
            result = self.engine.rollout(request)
        self.batch = UpdateBatch(trajectory=result.trajectory, advantages_B=torch.zeros(0))
        if result.trajectory.uncond_velocity is not None:  # only this rank's update needs it, not the driver
            result = dataclasses.replace(result, trajectory=dataclasses.replace(result.trajectory,
                                                                                uncond_velocity=None))
        return result

    def update(self, advantages_B: torch.Tensor, plan: UpdatePlan, share: tuple[int, int]) -> UpdateStats:
        """Train on the kept samples; ``advantages_B`` are this share's, ``plan`` is the whole iteration's."""
        if self.batch is None:
            raise RuntimeError("update() before rollout(): this worker holds no samples of the current iteration")
        if advantages_B.shape[0] != self.batch.trajectory.num_samples:
            raise ValueError(f"got {advantages_B.shape[0]} advantages for {self.batch.trajectory.num_samples} samples")
        self.batch.advantages_B = advantages_B.to(self.device)
        try:
            return self.learner.update(self.batch, plan, share=share)
        finally:
            self.batch = None

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Deterministic ODE videos ``[B, T, C, H, W]`` of the current policy (EMA weights when it keeps one)."""
        # EMA first: it is copied into the (sharded) parameters, which the gather then assembles for the forward.
        with self._ema_weights(), self._full_parameters():
            return generate(self.policy, self.cfg, prompts, seed=0, device=self.device, seeds=seeds)

    @contextlib.contextmanager
    def _ema_weights(self):
        ema = self.learner.ema
        if ema is None:
            yield
            return
        saved = {name: p.detach().clone() for name, p in self.learner.params.items()}
        with torch.no_grad():
            for name, p in self.learner.params.items():
                p.copy_(ema.shadow[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.learner.params.items():
                    p.copy_(saved[name])

    # ---- state ----

    def local_state(self) -> dict[str, torch.Tensor]:
        return self.learner.local_state()

    def load_local_state(self, state: dict[str, torch.Tensor]) -> None:
        self.learner.load_local_state(state)

    def checkpoint_payload(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """(safetensors groups, torch.save groups) of an unsharded learner (``checkpoint.learner_payload``)."""
        return learner_payload(self.learner)

    def save_sharded(self, folder: str) -> None:
        """Write this rank's shards into ``folder`` (every rank calls it with the same folder)."""
        save_learner_shards(self.learner, folder)

    def load_checkpoint(self, path: str) -> None:
        """Restore weights, Adam state and EMA from a checkpoint folder written by this run's configuration."""
        load_learner_state(self.learner, path, sharded=self.sharded)


class LocalWorkers:
    """The local backend: one :class:`PolicyWorker` in the driver's process."""

    def __init__(self, cfg: ExperimentConfig, *, on_event: Callable[..., None] | None = None) -> None:
        self.cfg = cfg
        device = resolve_device(cfg.train.device)
        self.dims = world_dims(cfg, use_gpu=device.type == "cuda")
        self.world_size, self.sharded = self.dims.world_size, self.dims.sharded
        self.worker = PolicyWorker(cfg, device=device, dims=self.dims)
        self.shares: list[tuple[int, int]] = []

    def rollout(self, request: RolloutRequest) -> RolloutResult:
        self.shares = [(0, len(request.sample_seeds))]
        return self.worker.rollout(request)

    def update(self, advantages_B: torch.Tensor, plan: UpdatePlan) -> dict[str, float]:
        return merge_update_stats([self.worker.update(advantages_B, plan, self.shares[0])])

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return self.worker.generate(prompts, seeds)

    def attempt(self, step: Callable[[], Any], iteration: int) -> Any:
        """Run one iteration (a fault in this process is not recoverable here: it propagates)."""
        return step()

    def checkpoint_payload(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        return self.worker.checkpoint_payload()

    def save_sharded(self, folder: Path) -> None:
        raise RuntimeError("the local backend is never sharded")

    def load_checkpoint(self, path: Path) -> None:
        self.worker.load_checkpoint(str(path))

    def shutdown(self) -> None:
        pass
