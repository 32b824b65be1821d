"""The update step: recompute the log-probs of stored SDE steps under the current weights and apply clipped,
group-relative updates (optionally with a KL penalty to a reference, LoRA through peft, and an EMA).

One call to ``Learner.update`` consumes one rollout batch as an :class:`UpdatePlan` says: the samples are shuffled
and split into ``optimizer_steps`` minibatches; each minibatch accumulates gradients over its micro-batches and over
every trained step of the window before one optimizer step. With several workers, each trains on the samples it
rolled out and the gradients are summed over every rank before the step, so every rank takes the step one process
would. Every term of the first minibatch is evaluated with the weights that produced the rollouts, so its
probability ratio must be 1: their mean is logged as ``ratio/first_step`` (the on-policy check).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from mixgrpo.config import LearnerConfig, SamplerConfig
from mixgrpo.algo.loss import clipped_surrogate_loss, kl_to_reference
from mixgrpo.algo.sampler import Trajectory, recompute_log_prob
from policies.base import flow_velocity
from policies.lora import adapters_disabled

if TYPE_CHECKING:
    import torch.distributed as dist


@dataclass
class UpdateBatch:
    """What the learner needs from this worker's rollouts (all on the learner's device, this worker's samples)."""

    trajectory: Trajectory
    """The rollouts, with the text states they were conditioned on (one row per prompt group)."""
    advantages_B: torch.Tensor


@dataclass
class UpdatePlan:
    """How one rollout batch of the whole iteration is consumed: the same plan reaches every rank.

    ``minibatches`` hold global sample ids (one optimizer step each, in order); ``train_mask_BS`` is the global
    mask; ``shares`` are every worker group's ``(first sample, count)``. A worker trains the rows it owns and scales
    each term by its share of the minibatch's trained terms, so the sum of all ranks' gradients is the gradient one
    process would compute on the whole batch.
    """

    minibatches: list[torch.Tensor]
    train_mask_BS: torch.Tensor
    """True where stored step s of sample b is trained (a kept sample, in the window; DanceGRPO trains a random
    fraction of steps)."""
    shares: list[tuple[int, int]]
    micro_batch_size: int
    lockstep: bool = False
    """Every rank must run the same number of forward/backward passes (FSDP: each one is a collective); ranks with
    fewer terms run zero-weighted ones."""

    def terms(self, minibatch: int, share: tuple[int, int]) -> list[tuple[int, torch.Tensor]]:
        """``(step, local rows)`` of each forward/backward the worker owning ``share`` runs in ``minibatch``."""
        first, count = share
        ids = self.minibatches[minibatch]
        mine = ids[(ids >= first) & (ids < first + count)] - first
        mask = self.train_mask_BS[first:first + count]
        out = []
        for micro in mine.split(self.micro_batch_size):
            for step in range(mask.shape[1]):
                rows = micro[mask[micro, step]]
                if rows.numel():
                    out.append((step, rows))
        return out

    def trained(self, minibatch: int) -> int:
        return int(self.train_mask_BS[self.minibatches[minibatch]].sum())

    def num_passes(self, minibatch: int) -> int:
        """Forward/backward passes every rank runs in ``minibatch`` under lockstep: the most any worker needs."""
        return max(len(self.terms(minibatch, share)) for share in self.shares)


def plan_update(train_mask_BS: torch.Tensor, *, optimizer_steps: int, micro_batch_size: int,
                shares: list[tuple[int, int]] | None = None, generator: torch.Generator,
                lockstep: bool = False) -> UpdatePlan:
    """Shuffle the samples and split them into ``optimizer_steps`` minibatches (the local learner's split)."""
    num_samples = train_mask_BS.shape[0]
    order = torch.randperm(num_samples, generator=generator)
    minibatches = [m for m in order.chunk(optimizer_steps) if m.numel() > 0]
    return UpdatePlan(minibatches=minibatches, train_mask_BS=train_mask_BS.cpu().bool(),
                      shares=shares or [(0, num_samples)], micro_batch_size=micro_batch_size, lockstep=lockstep)


@dataclass
class UpdateStats:
    """Sums over this worker's loss terms; :func:`merge_update_stats` turns the workers' sums into metrics."""

    sums: dict[str, float]
    """loss, clip_fraction, kl, ratio/mean, first/ratio summed over terms; terms, first/terms counted."""
    ratio_min: float
    ratio_max: float
    grad_norms: list[float]
    lr: float


STAT_KEYS = ("loss", "clip_fraction", "kl", "ratio/mean")


def merge_update_stats(parts: list[UpdateStats]) -> dict[str, float]:
    """Metrics of one update from the stats of every worker group (one per group: its ranks agree)."""
    sums = {key: sum(p.sums.get(key, 0.0) for p in parts) for key in {k for p in parts for k in p.sums}}
    terms = max(sums.get("terms", 0.0), 1.0)
    stats = {key: sums.get(key, 0.0) / terms for key in STAT_KEYS}
    first = sums.get("first/terms", 0.0)
    grad_norms = parts[0].grad_norms
    stats.update({"ratio/min": min(p.ratio_min for p in parts), "ratio/max": max(p.ratio_max for p in parts),
                  # the on-policy check: every term before the first optimizer step must have ratio 1
                  "ratio/first_step": sums.get("first/ratio", 0.0) / first if first else 1.0,
                  "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0, "lr": parts[0].lr})
    return stats


class EMA:
    """Exponential moving average of the trainable parameters (kept in fp32 on the parameters' device)."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        for name, p in named_params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)


class Learner:
    """Recomputes log-probs and applies the clipped update on this worker's samples.

    ``grad_group``: the process group whose gradients are summed after each minibatch (every rank of every worker
    group, when the model is not FSDP-sharded; FSDP reduce-scatters in each backward itself). ``reference``: the
    frozen model of a ``frozen_copy`` KL term, built by the caller (sharded like the transformer); by default a
    deep copy of the transformer.
    """

    def __init__(
        self,
        transformer: nn.Module,
        cfg: LearnerConfig,
        sampler_cfg: SamplerConfig,
        *,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        reference: nn.Module | None = None,
        grad_group: "dist.ProcessGroup | None" = None,
    ) -> None:
        self.transformer = transformer
        self.cfg = cfg
        self.sampler_cfg = sampler_cfg
        self.autocast = autocast
        self.grad_group = grad_group
        self.reference: nn.Module | None = None
        if cfg.kl_coeff > 0 and cfg.kl_reference == "frozen_copy":
            self.reference = reference if reference is not None else copy.deepcopy(transformer)
            self.reference.requires_grad_(False).eval()
        self.params = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the transformer has no trainable parameters; enable learner.lora or unfreeze it")
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        self.ema = EMA(self.params, cfg.ema_decay) if cfg.ema_decay > 0 else None

    # ---- the velocity under the current weights and under the reference ----

    def _velocity_fn(self, reference: bool = False) -> Callable:
        model = self.transformer
        if reference and self.reference is not None:
            model = self.reference

        def velocity(x_BCTHW: torch.Tensor, sigma_B: torch.Tensor, text_BLD: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return flow_velocity(model, x_BCTHW, sigma_B, text_BLD)

        return velocity

    def _reference_mean(self, batch: UpdateBatch, step: int, idx: torch.Tensor) -> torch.Tensor:
        context = adapters_disabled(self.transformer) if self.reference is None else contextlib.nullcontext()
        with torch.no_grad(), context:
            return self._step_terms(batch, step, idx, reference=True)[1]

    def _step_terms(self, batch: UpdateBatch, step: int, idx: torch.Tensor, reference: bool = False,
                    reuse_uncond: bool = False):
        traj = batch.trajectory
        text, neg = traj.sample_text_states(idx)
        return recompute_log_prob(
            self._velocity_fn(reference),
            traj,
            step=step,
            sample_idx=idx,
            text_states_BLD=text,
            negative_text_states_BLD=neg,
            guidance_scale=self.sampler_cfg.guidance_scale,
            eta=self.sampler_cfg.eta,
            sde_kind=self.sampler_cfg.sde_kind,
            separate_uncond=not reference,  # backward through the cond rows only
            reuse_uncond=reuse_uncond and not reference,
        )

    # ---- one rollout batch -> optimizer steps ----

    def update(self, batch: UpdateBatch, plan: UpdatePlan, *, share: tuple[int, int] | None = None) -> UpdateStats:
        """Consume ``batch`` (the samples of ``share``, default: all of them) as ``plan`` says."""
        self.transformer.train()
        share = share or plan.shares[0]
        sums = dict.fromkeys((*STAT_KEYS, "terms", "first/ratio", "first/terms"), 0.0)
        ratio_min, ratio_max, grad_norms = math.inf, -math.inf, []
        for index in range(len(plan.minibatches)):
            self.optimizer.zero_grad(set_to_none=True)
            trained = plan.trained(index)
            terms = plan.terms(index, share)
            passes = plan.num_passes(index) if plan.lockstep else len(terms)
            for n in range(passes):
                if n >= len(terms):  # lockstep filler: a real row weighted 0 keeps every rank's collectives in step
                    self._micro_step(batch, 0, torch.zeros(1, dtype=torch.long), scale=0.0)
                    continue
                step, rows = terms[n]
                # Before the first optimizer step the weights are the sampling ones: the rollout's uncond is reusable.
                out = self._micro_step(batch, step, rows, scale=rows.numel() / trained, reuse_uncond=index == 0 and self.cfg.reuse_rollout_uncond)
                sums["terms"] += 1
                for key in STAT_KEYS:
                    sums[key] += out[key]
                if index == 0:
                    sums["first/ratio"] += out["ratio/mean"]
                    sums["first/terms"] += 1
                ratio_min, ratio_max = min(ratio_min, out["ratio/min"]), max(ratio_max, out["ratio/max"])
            self._sum_gradients()
            grad_norms.append(self._clip_gradients())
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.params)
        return UpdateStats(sums=sums, ratio_min=ratio_min, ratio_max=ratio_max, grad_norms=grad_norms,
                           lr=self.optimizer.param_groups[0]["lr"])

    def _micro_step(self, batch: UpdateBatch, step: int, rows: torch.Tensor, scale: float,
                    reuse_uncond: bool = False) -> dict[str, float]:
        log_prob_B, mean, std = self._step_terms(batch, step, rows, reuse_uncond=reuse_uncond)
        old_log_prob_B = batch.trajectory.log_prob[rows, step]
        loss, info = clipped_surrogate_loss(log_prob_B, old_log_prob_B, batch.advantages_B[rows], self.cfg.clip_range)
        kl = torch.zeros((), device=loss.device)
        if self.cfg.kl_coeff > 0:
            kl = kl_to_reference(mean, self._reference_mean(batch, step, rows), std).mean()
            loss = loss + self.cfg.kl_coeff * kl
        (loss * scale).backward()
        return {"loss": float(loss.detach()), "kl": float(kl.detach()), **{k: float(v) for k, v in info.items()}}

    def _sum_gradients(self) -> None:
        """Sum the gradients of every rank (not FSDP-sharded: FSDP summed them in each backward already)."""
        if self.grad_group is None:
            return
        from policies.parallel.apply import all_reduce_sum_

        for p in self.params.values():
            if p.grad is None:  # a rank with no rows in this minibatch still takes part in the sum
                p.grad = torch.zeros_like(p)
        all_reduce_sum_([p.grad for p in self.params.values()], self.grad_group)

    def _clip_gradients(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP: the same total norm on every rank
        return float(full() if full is not None else norm)

    # ---- state ----

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (whole for an unsharded learner; DTensor shards under FSDP)."""
        return {name: p.detach() for name, p in self.params.items()}

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        return None if self.ema is None else self.ema.shadow

    def load_trainable_state(self, tensors: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None) -> None:
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]}; "
                             "was it written with another learner.lora setting?")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(tensors[name].to(p.device, p.dtype))
        if self.ema is not None and ema is not None:
            self.ema.shadow = {k: v.to(self.params[k].device).float().clone() for k, v in ema.items()}

    @torch.no_grad()
    def local_state(self) -> dict:
        """This rank's part of everything an update changes (weights, Adam moments and steps, EMA), packed into one
        CPU buffer per dtype (one device-to-host copy each, not one per tensor): a snapshot to restore after a fault,
        in the same world layout."""
        from policies.parallel.fsdp import local_tensor

        tensors = {}
        for name, p in self.params.items():
            tensors[f"param/{name}"] = local_tensor(p.detach())
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"{key}/{name}"] = local_tensor(value.detach())
            if self.ema is not None:
                tensors[f"ema/{name}"] = local_tensor(self.ema.shadow[name])
        return pack_tensors(tensors)

    @torch.no_grad()
    def load_local_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`local_state` snapshot taken by the rank at the same place in the same world layout."""
        from policies.parallel.fsdp import local_tensor

        state = unpack_tensors(state)
        if any(key.startswith(("exp_avg/", "step/")) for key in state):
            self._ensure_optimizer_state()
        for name, p in self.params.items():
            local_tensor(p).copy_(state[f"param/{name}"])
            for key, value in self.optimizer.state.get(p, {}).items():
                if f"{key}/{name}" in state:
                    local_tensor(value).copy_(state[f"{key}/{name}"])
            if self.ema is not None:
                local_tensor(self.ema.shadow[name]).copy_(state[f"ema/{name}"])

    def _ensure_optimizer_state(self) -> None:
        """Create Adam's state slots (step, moments), shaped and placed as the optimizer makes them, by one step with
        zero gradients at lr 0 (a no-op on the weights); their values are overwritten next."""
        if all(p in self.optimizer.state for p in self.params.values()):
            return
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        for p in self.params.values():
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr


def pack_tensors(tensors: dict[str, torch.Tensor]) -> dict:
    """``{"buffers": {dtype name: flat CPU tensor}, "index": [(name, dtype name, shape, offset)]}``: the tensors
    concatenated per dtype on their device, then copied to the host once per dtype."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    buffers, index = {}, []
    for dtype, items in groups.items():
        key, offset = str(dtype).removeprefix("torch."), 0
        for name, tensor in items:
            index.append((name, key, tuple(tensor.shape), offset))
            offset += tensor.numel()
        devices = {t.device for _, t in items}
        flat = [t.reshape(-1).to(next(iter(devices))) for _, t in items]  # e.g. Adam's CPU step counts
        buffers[key] = torch.cat(flat).cpu()
    return {"buffers": buffers, "index": index}


def unpack_tensors(packed: dict) -> dict[str, torch.Tensor]:
    """The tensors of :func:`pack_tensors` (views into its buffers)."""
    out = {}
    for name, key, shape, offset in packed["index"]:
        numel = math.prod(shape)
        out[name] = packed["buffers"][key][offset:offset + numel].view(shape)
    return out
