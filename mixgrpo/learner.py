"""The update step: recompute the log-probs of stored SDE steps under the current weights and apply clipped,
group-relative updates (optionally with a KL penalty to a reference, LoRA through peft, and an EMA).

One call to ``Learner.update`` consumes one rollout batch: the samples are shuffled and split into
``optimizer_steps`` minibatches; each minibatch accumulates gradients over its micro-batches and over every trained
step of the window before one optimizer step. The very first micro-batch is evaluated with the weights that produced
the rollouts, so its probability ratio must be 1: it is logged as ``ratio/first_step`` (the on-policy check).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from mixgrpo.config import LearnerConfig, SamplerConfig
from mixgrpo.loss import clipped_surrogate_loss, kl_to_reference
from mixgrpo.sampler import Trajectory, recompute_log_prob


@dataclass
class UpdateBatch:
    """What the learner needs from one iteration's rollouts (all on the learner's device)."""

    trajectory: Trajectory
    advantages_B: torch.Tensor
    text_states_BLD: torch.Tensor
    negative_text_states_BLD: torch.Tensor | None
    train_mask_BS: torch.Tensor
    """True where stored step s of sample b is trained (DanceGRPO trains a random fraction of steps)."""


def apply_lora(transformer: nn.Module, *, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """Inject LoRA adapters (peft) into ``transformer`` in place; only the adapters stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian", lora_dropout=0.0)
    transformer.requires_grad_(False)
    inject_adapter_in_model(config, transformer)
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in transformer.parameters()):
        raise ValueError(f"learner.lora.targets {targets} matched no module of the transformer; "
                         "name modules as they appear in transformer.named_modules(), e.g. self_attn.q")
    # Gaussian init of B as well as A would change the model; peft's "gaussian" keeps B at zero: the start is the base.
    return transformer


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run the base model without its LoRA adapters (the KL reference in the OSP-Next recipe)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


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
    def __init__(
        self,
        transformer: nn.Module,
        cfg: LearnerConfig,
        sampler_cfg: SamplerConfig,
        *,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.transformer = transformer
        self.cfg = cfg
        self.sampler_cfg = sampler_cfg
        self.autocast = autocast
        self.reference: nn.Module | None = None
        if cfg.kl_coeff > 0 and cfg.kl_reference == "frozen_copy":
            self.reference = copy.deepcopy(transformer).requires_grad_(False).eval()
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
                return model(x_BCTHW, sigma_B * 1000.0, text_BLD).float()

        return velocity

    def _reference_mean(self, batch: UpdateBatch, step: int, idx: torch.Tensor) -> torch.Tensor:
        context = adapters_disabled(self.transformer) if self.reference is None else contextlib.nullcontext()
        with torch.no_grad(), context:
            return self._step_terms(batch, step, idx, reference=True)[1]

    def _step_terms(self, batch: UpdateBatch, step: int, idx: torch.Tensor, reference: bool = False):
        traj = batch.trajectory
        neg = batch.negative_text_states_BLD
        return recompute_log_prob(
            self._velocity_fn(reference),
            traj,
            step=step,
            sample_idx=idx,
            text_states_BLD=batch.text_states_BLD[idx],
            negative_text_states_BLD=None if neg is None else neg[idx],
            guidance_scale=self.sampler_cfg.guidance_scale,
            eta=self.sampler_cfg.eta,
            sde_kind=self.sampler_cfg.sde_kind,
            separate_uncond=not reference,  # backward through the cond rows only
        )

    # ---- one rollout batch -> optimizer steps ----

    def update(self, batch: UpdateBatch, *, generator: torch.Generator) -> dict[str, float]:
        """Returns the metrics of this update (loss, clip fraction, ratio stats, KL, grad norm)."""
        self.transformer.train()
        num_samples = batch.advantages_B.shape[0]
        order = torch.randperm(num_samples, generator=generator)
        minibatches = [m for m in order.chunk(self.cfg.optimizer_steps) if m.numel() > 0]
        mask_BS = batch.train_mask_BS.cpu()  # indices are built on the CPU, whatever the batch's device
        totals = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "ratio/mean": 0.0, "terms": 0}
        ratio_min, ratio_max, first_ratio, grad_norms = math.inf, -math.inf, None, []
        for minibatch in minibatches:
            self.optimizer.zero_grad(set_to_none=True)
            trained = int(mask_BS[minibatch].sum())
            for micro in minibatch.split(self.cfg.micro_batch_size):
                for step in range(mask_BS.shape[1]):
                    rows = micro[mask_BS[micro, step]]
                    if rows.numel() == 0:
                        continue
                    out = self._micro_step(batch, step, rows, scale=rows.numel() / trained)
                    if first_ratio is None:
                        first_ratio = out["ratio/mean"]
                    totals["terms"] += 1
                    for key in ("loss", "clip_fraction", "kl", "ratio/mean"):
                        totals[key] += out[key]
                    ratio_min, ratio_max = min(ratio_min, out["ratio/min"]), max(ratio_max, out["ratio/max"])
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)))
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.params)
        terms = max(totals.pop("terms"), 1)
        stats = {key: value / terms for key, value in totals.items()}
        stats.update({"ratio/min": ratio_min, "ratio/max": ratio_max, "ratio/first_step": first_ratio or 1.0,
                      "grad_norm": sum(grad_norms) / len(grad_norms), "lr": self.optimizer.param_groups[0]["lr"]})
        return stats

    def _micro_step(self, batch: UpdateBatch, step: int, rows: torch.Tensor, scale: float) -> dict[str, float]:
        log_prob_B, mean, std = self._step_terms(batch, step, rows)
        old_log_prob_B = batch.trajectory.log_prob[rows, step]
        loss, info = clipped_surrogate_loss(log_prob_B, old_log_prob_B, batch.advantages_B[rows], self.cfg.clip_range)
        kl = torch.zeros((), device=loss.device)
        if self.cfg.kl_coeff > 0:
            kl = kl_to_reference(mean, self._reference_mean(batch, step, rows), std).mean()
            loss = loss + self.cfg.kl_coeff * kl
        (loss * scale).backward()
        return {"loss": float(loss.detach()), "kl": float(kl.detach()), **{k: float(v) for k, v in info.items()}}

    # ---- state ----

    def trainable_state(self) -> dict[str, torch.Tensor]:
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
