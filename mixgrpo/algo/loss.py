"""The GRPO objective on one sampler step: PPO-clip surrogate on per-sample log-probs, and a KL to a reference.

Shape legend: B samples. Log-probs are the mean-reduced per-step values of :mod:`mixgrpo.algo.sde` (``[B]``), which is
why ratios stay within ~1e-4 of 1 and clip ranges of 1e-4 .. 1e-3 are used.
"""

from __future__ import annotations

import torch

DEFAULT_MAX_LOG_RATIO = 10.0


def clipped_surrogate_loss(
    log_prob_B: torch.Tensor,
    old_log_prob_B: torch.Tensor,
    advantages_B: torch.Tensor,
    clip_range: float,
    *,
    clip_range_high: float | None = None,
    max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip: ``mean_B max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with ``r = exp(logp - logp_old)``.

    Args:
        log_prob_B: ``[B]`` log-probs under the current weights (with grad).
        old_log_prob_B: ``[B]`` rollout log-probs (no grad needed; detached here).
        advantages_B: ``[B]`` advantages (detached here).
        clip_range: eps_low (and eps_high unless ``clip_range_high`` is given: DAPO's asymmetric clip).
        max_log_ratio: the log-ratio is clamped to +-this before exp. A sample that far off-policy (far beyond any
            clip range we use) carries no useful signal, and without the clamp exp() overflows to inf, whose
            gradient is inf * 0 = NaN in the clipped branch and poisons the whole step.

    Returns:
        ``(loss, info)``; info holds detached 0-dim tensors: ``clip_fraction`` (share of samples with
        |r - 1| > eps, as Flow-GRPO logs it), ``ratio/mean``, ``ratio/min``, ``ratio/max``, ``approx_kl``
        (mean 0.5 * (logp - logp_old)^2).
    """
    clip_high = clip_range if clip_range_high is None else clip_range_high
    if not (clip_range > 0 and clip_high > 0):
        raise ValueError(f"clip ranges must be > 0, got clip_range={clip_range}, clip_range_high={clip_range_high}")
    if not (log_prob_B.shape == old_log_prob_B.shape == advantages_B.shape and log_prob_B.ndim == 1):
        raise ValueError(f"log_prob_B, old_log_prob_B and advantages_B must all be [B], got {tuple(log_prob_B.shape)}, "
                         f"{tuple(old_log_prob_B.shape)}, {tuple(advantages_B.shape)}")
    log_ratio_B = log_prob_B.float() - old_log_prob_B.detach().float()
    ratio_B = torch.exp(log_ratio_B.clamp(-max_log_ratio, max_log_ratio))
    adv_B = advantages_B.detach().float().to(ratio_B.device)
    unclipped_B = -adv_B * ratio_B
    clipped_B = -adv_B * ratio_B.clamp(1.0 - clip_range, 1.0 + clip_high)
    loss = torch.maximum(unclipped_B, clipped_B).mean()
    with torch.no_grad():
        r = ratio_B.detach()
        outside = (r < 1.0 - clip_range) | (r > 1.0 + clip_high)
        info = {
            "clip_fraction": outside.float().mean(),
            "ratio/mean": r.mean(),
            "ratio/min": r.min(),
            "ratio/max": r.max(),
            "approx_kl": 0.5 * (log_ratio_B.detach() ** 2).mean(),
        }
    return loss, info


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL between N(mean, std^2) and N(mean_ref, std^2) per element, averaged over non-batch elements -> ``[B]``.

    ``mean((mean - mean_ref)^2 / (2 std^2))`` with the full step std of :mod:`mixgrpo.algo.sde` (sigma_t * sqrt(-dt)),
    the OSP-Next form. Flow-GRPO's code divides by sigma_t^2 without the sqrt(-dt), a per-step constant rescale.
    ``mean_ref`` is the reference policy's mean (no grad); gradients flow through ``mean``.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    kl = (mean.float() - mean_ref.detach().float()) ** 2 / (2.0 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
