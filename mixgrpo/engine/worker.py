"""One rank that samples and learns, and the in-process set of workers of the local backend.

A :class:`PolicyWorker` builds the policy (``mixgrpo.engine.policy_factory.build_policy``), shards it over its world
(sequence parallelism inside a worker group of ``rollout.sp_size`` ranks; FSDP over every rank with
``learner.sharding=fsdp``), samples its share of each iteration's prompt groups, keeps the trajectories where they
were made, and trains on them when the driver sends the advantages. Every rank takes the same optimizer step
(gradients are summed over all ranks), so no weights ever travel.

:class:`LocalWorkers` is one worker in the driver's process (``rollout.backend=local``);
``mixgrpo.driver.ray_workers.RayWorkers`` runs ``num_workers x sp_size`` of them as Ray actors. The trainer talks to both
through the same methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mixgrpo.config import ExperimentConfig
from mixgrpo.engine.learner import Learner, UpdateBatch, UpdatePlan, UpdateStats, merge_update_stats
from mixgrpo.engine.policy_factory import build_policy
from mixgrpo.engine.rollout import LocalRolloutEngine, RolloutRequest, RolloutResult, generate, text_states


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class WorldLayout:
    """Where a rank sits: ``num_groups`` worker groups of ``sp_size`` consecutive ranks (one world)."""

    num_groups: int = 1
    sp_size: int = 1
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.num_groups * self.sp_size

    @property
    def group(self) -> int:
        return self.rank // self.sp_size

    @property
    def leads_group(self) -> bool:
        """Rank 0 of its worker group: the one that returns the group's results (its peers hold the same)."""
        return self.rank % self.sp_size == 0


class PolicyWorker:
    """One rank: policy, learner and the trajectories of its share of the current iteration."""

    def __init__(self, cfg: ExperimentConfig, *, device: torch.device, layout: WorldLayout = WorldLayout()) -> None:
        self.cfg, self.device, self.layout = cfg, device, layout
        self.sharded = cfg.learner.sharding == "fsdp" and layout.world_size > 1  # the config check requires both
        distributed = layout.world_size > 1
        self.policy = build_policy(cfg, device=device, shard=self._shard if distributed else None)
        reference = None
        if distributed and cfg.learner.kl_coeff > 0 and cfg.learner.kl_reference == "frozen_copy":
            # A sharded model cannot be deep-copied: build the frozen base the same way, sharded alike.
            reference = build_policy(cfg, device=device, shard=self._shard, trainable=False).transformer
        grad_group = None
        if distributed and not self.sharded:
            import torch.distributed as dist

            grad_group = dist.group.WORLD
        self.learner = Learner(self.policy.transformer, cfg.learner, cfg.sampler, autocast=self._autocast,
                               reference=reference, grad_group=grad_group)
        self.engine = LocalRolloutEngine(self.policy, cfg.sampler, device=device,
                                         batch_groups=max(1, cfg.rollout.batch_size // cfg.rollout.group_size),
                                         keep_uncond=cfg.learner.reuse_rollout_uncond)
        self.batch: UpdateBatch | None = None

    # ---- building ----

    def _shard(self, transformer: nn.Module) -> None:
        """Sequence parallelism inside the worker group, HiF8 scales shared over it, FSDP over every rank."""
        from policies.parallel import apply_sequence_parallel, check_degrees

        cfg = self.cfg
        config = getattr(transformer, "config", None)
        sizes = check_degrees(self.layout.sp_size, num_heads=getattr(config, "num_heads", None),
                              sparse_ratio=getattr(config, "sparse_ratio", None))
        if sizes is not None:
            groups = apply_sequence_parallel(transformer, ssp_size=sizes.ssp_size, ulysses_size=sizes.ulysses_size)
            if cfg.policy.quantization == "hif8":
                from policies.quant import share_amax

                share_amax(transformer, groups.sp)
        if self.sharded:
            from policies.parallel.fsdp import apply_fsdp

            compute = transformer_dtype(transformer)
            transformer.to(torch.float32)  # FSDP keeps float32 master weights; forwards run in the policy's dtype
            mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.learner.mixed_precision)
            apply_fsdp(transformer, param_dtype=mixed or compute)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.learner.mixed_precision)
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
        guided = self.cfg.sampler.guidance_scale not in (0.0, 1.0)
        cond, neg = text_states(self.policy, request.sample_prompts, self.device)
        self.batch = UpdateBatch(trajectory=result.trajectory, advantages_B=torch.zeros(0), text_states_BLD=cond,
                                 negative_text_states_BLD=neg if guided else None)
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
        """(safetensors groups, torch.save groups) of an unsharded learner: the trained tensors and Adam's state."""
        ema = self.learner.ema_state()
        tensors = {"model": {k: v.cpu() for k, v in self.learner.trainable_state().items()},
                   **({"ema": {k: v.cpu() for k, v in ema.items()}} if ema is not None else {})}
        # On the CPU like the rest: the driver that unpickles it may have no GPU (and holds no model on one).
        optimizer = self.learner.optimizer.state_dict()
        optimizer["state"] = {key: {name: value.cpu() if torch.is_tensor(value) else value for name, value in state.items()}
                              for key, state in optimizer["state"].items()}
        return tensors, {"optimizer": optimizer}

    def save_sharded(self, folder: str) -> None:
        """Write this rank's shards of weights, Adam state and EMA into ``folder`` (torch.distributed.checkpoint;
        every rank calls it with the same folder)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(), checkpoint_id=str(folder))

    def load_checkpoint(self, path: str) -> None:
        """Restore weights, Adam state and EMA from a checkpoint folder written by this run's configuration."""
        from mixgrpo.engine.checkpoint import SHARDED_DIR, read_checkpoint

        path = Path(path)
        if (path / SHARDED_DIR).is_dir():
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            state = self._dcp_state()
            dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
            set_state_dict(self.learner.transformer, self.learner.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
            return
        if self.sharded:
            raise ValueError(f"checkpoint {path} was written without learner.sharding=fsdp; resume it with the "
                             "sharding it was trained with")
        ckpt = read_checkpoint(path)
        self.learner.load_trainable_state(ckpt.tensors["model"], ckpt.tensors.get("ema"))
        self.learner.optimizer.load_state_dict(ckpt.objects["optimizer"])

    def _dcp_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.learner.transformer, self.learner.optimizer)
        state = {"model": model, "optimizer": optimizer}
        if self.learner.ema is not None:
            state["ema"] = self.learner.ema.shadow
        return state


def transformer_dtype(transformer: nn.Module) -> torch.dtype:
    return next(transformer.parameters()).dtype


class LocalWorkers:
    """The local backend: one :class:`PolicyWorker` in the driver's process."""

    world_size = 1
    sharded = False

    def __init__(self, cfg: ExperimentConfig, *, on_event: Callable[..., None] | None = None) -> None:
        self.cfg = cfg
        self.worker = PolicyWorker(cfg, device=resolve_device(cfg.train.device))
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

    def checkpoint_payload(self):
        return self.worker.checkpoint_payload()

    def save_sharded(self, folder: Path) -> None:
        raise RuntimeError("the local backend is never sharded")

    def load_checkpoint(self, path: Path) -> None:
        self.worker.load_checkpoint(str(path))

    def shutdown(self) -> None:
        pass
