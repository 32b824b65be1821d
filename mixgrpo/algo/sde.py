"""Rectified-flow sampler steps with Gaussian log-probabilities (pure functions, fp32 inside).

Convention (as in Flow-GRPO, DanceGRPO and MixGRPO): ``x_sigma = sigma * noise + (1 - sigma) * x0``, the model
predicts ``v = noise - x0``, sampling runs sigma from 1 to 0, and one step goes from ``sigma`` to
``sigma_next < sigma`` with ``dt = sigma_next - sigma < 0``. The x0-prediction is ``x0_hat = x - sigma * v``.

Shape legend: B batch, C channels, T/H/W latent frames/height/width. Any number of non-batch dims is accepted;
log-probs are ``[B]``, averaged (not summed) over every non-batch element, as all three peer codebases do.

Every stochastic step has the signature of :func:`flow_sde_step` and returns ``(x_next, log_prob, mean, std)``;
``SDE_STEPS`` maps the ``sde_kind`` knob to them. How we depart from the peers is said where it happens:

- sigma = 1 guard: sigma_t = eta*sqrt(sigma/(1-sigma)) is infinite at sigma = 1. The peers replace (1 - sigma) by
  (1 - sigmas[1]) there; at step 0 ``sigma_next`` *is* sigmas[1], so we use (1 - sigma_next) whenever sigma >= 1,
  which gives the peers' value without needing the whole schedule.
- DPM-Solver++ final step: lambda = log((1 - sigma) / sigma) is +inf at sigma = 0, so the step that lands on
  sigma = 0 is first order (diffusers' and MixGRPO's ``lower_order_final``).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

SigmaLike = float | torch.Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``; keeps 0 and 1 fixed."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0 (1 means no shift; MixGRPO uses 3, OSP-Next 7.5), got {shift}")
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sigma_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``[num_steps + 1]`` fp32 sigmas from exactly 1 down to exactly 0: linspace(1, 0) then the time shift.

    Computed in fp64 and rounded once so the schedule does not depend on the device.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (the number of sampler steps), got {num_steps}")
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_sigmas(sigmas, shift).to(torch.float32)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: SigmaLike) -> torch.Tensor:
    """Log-density of ``x`` under N(mean, std^2), averaged over all non-batch elements -> ``[B]`` fp32.

    ``std`` is a float, or a tensor broadcastable to ``x`` (e.g. ``[B, 1, 1, 1, 1]``).
    """
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    logp = -((x - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return logp.mean(dim=tuple(range(1, logp.ndim)))


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """Data prediction ``x0_hat = x - sigma * v`` (fp32)."""
    return x.float() - _bcast(sigma, x) * v.float()


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: SigmaLike, sigma_next: SigmaLike) -> torch.Tensor:
    """Deterministic ODE step ``x + (sigma_next - sigma) * v`` (fp32)."""
    return x.float() + (_bcast(sigma_next, x) - _bcast(sigma, x)) * v.float()


# --------------------------------------------------------------------------------------------------------------
# Stochastic steps: one signature, selected by ``sde_kind``.


class SDEStep(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        sigma: SigmaLike,
        sigma_next: SigmaLike,
        eta: float,
        *,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...


def flow_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    eta: float,
    *,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO Euler-Maruyama step with noise level ``sigma_t = eta * sqrt(sigma / (1 - sigma))``.

    mean = x + [v + sigma_t^2 / (2 sigma) * (x + (1 - sigma) v)] dt,  std = sigma_t * sqrt(-dt).

    Args:
        x, v: ``[B, ...]`` current latents and velocity (any float dtype; maths in fp32).
        sigma, sigma_next: python floats or ``[B]`` tensors, ``0 <= sigma_next < sigma <= 1``.
        eta: noise-level multiplier ``a`` (Flow-GRPO 0.7, MixGRPO 0.7).
        noise: ``[B, ...]`` standard normal used to draw x_next (a fresh ``randn`` when omitted).
        prev_sample: an existing x_next whose log-prob to evaluate (the learner's recompute); no noise is drawn.

    Returns:
        ``(x_next [B, ...], log_prob [B], mean [B, ...], std)``, all fp32; std broadcasts to x (``[B, 1, ...]``,
        or all-ones dims when the sigmas are floats).
    """
    s, s_next = _bcast(sigma, x), _bcast(sigma_next, x)
    _check_decreasing(s, s_next)
    # sigma = 1 guard, see the module docstring: (1 - sigma) -> (1 - sigma_next) at sigma = 1.
    one_minus = 1.0 - torch.where(s >= 1.0, s_next, s)
    sigma_t = eta * torch.sqrt(s / one_minus)
    mean, std = _score_sde_moments(x, v, s, s_next, sigma_t)
    return _gaussian_sample_and_score(mean, std, noise=noise, prev_sample=prev_sample)


def dance_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    eta: float,
    *,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DanceGRPO step: the same drift as :func:`flow_sde_step` with a constant noise level ``sigma_t = eta``.

    DanceGRPO writes it with the score ``-(x - (1 - sigma) x0_hat) / sigma^2``; substituting ``x0_hat = x - sigma v``
    gives exactly the Flow-GRPO drift, so only the noise schedule differs. std = eta * sqrt(-dt). Same arguments and
    returns as :func:`flow_sde_step`; no sigma = 1 guard is needed (nothing divides by 1 - sigma).
    """
    s, s_next = _bcast(sigma, x), _bcast(sigma_next, x)
    _check_decreasing(s, s_next)
    sigma_t = torch.full_like(s, float(eta))
    mean, std = _score_sde_moments(x, v, s, s_next, sigma_t)
    return _gaussian_sample_and_score(mean, std, noise=noise, prev_sample=prev_sample)


def osp_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    eta: float,
    *,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """OSP-Next's RL step: the same drift with ``sigma_t = eta * sigma`` (OSP-Next's code is eta = 1).

    OSP-Next writes ``std_t = sigma_min + (sigma_max - sigma_min) * sigma``, which is sigma for its 1 -> 0 schedule.
    Same arguments and returns as :func:`flow_sde_step`.
    """
    s, s_next = _bcast(sigma, x), _bcast(sigma_next, x)
    _check_decreasing(s, s_next)
    mean, std = _score_sde_moments(x, v, s, s_next, eta * s)
    return _gaussian_sample_and_score(mean, std, noise=noise, prev_sample=prev_sample)


def cps_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    eta: float,
    *,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients-preserving sampling (arXiv 2509.05952); ``eta`` is its noise_level (peers use 0.8).

    std = sigma_next * sin(eta * pi / 2); mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat with
    x0_hat = x - sigma v, x1_hat = x + (1 - sigma) v. The log-prob is the peers' ``-mean((x_next - mean)^2)``: no
    variance division and no constants, so it is NOT a normalised density; only differences of it are meaningful
    (the ratio), and it stays finite on the last step where std = 0. Same arguments and returns as
    :func:`flow_sde_step`.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta (the CPS noise_level) must be in [0, 1], got {eta}; peers use 0.8")
    s, s_next = _bcast(sigma, x), _bcast(sigma_next, x)
    _check_decreasing(s, s_next)
    x32, v32 = x.float(), v.float()
    std = s_next * math.sin(eta * math.pi / 2.0)
    # clamp: sigma_next^2 - std^2 >= 0 analytically, but rounding can make it -0.0-ish negative.
    coeff_x1 = torch.sqrt(torch.clamp(s_next**2 - std**2, min=0.0))
    mean = (1.0 - s_next) * (x32 - s * v32) + coeff_x1 * (x32 + (1.0 - s) * v32)
    x_next = _draw(mean, std, noise=noise, prev_sample=prev_sample)
    sq_err = (x_next.detach() - mean) ** 2
    log_prob = -sq_err.mean(dim=tuple(range(1, sq_err.ndim)))
    return x_next, log_prob, mean, std


SDE_STEPS: dict[str, SDEStep] = {
    "flow_grpo": flow_sde_step,
    "dance_grpo": dance_sde_step,
    "osp_next": osp_sde_step,
    "cps": cps_sde_step,
}


def get_sde_step(kind: str) -> SDEStep:
    """The stochastic step for ``kind`` (one of ``SDE_STEPS``)."""
    if kind not in SDE_STEPS:
        raise ValueError(f"sde_kind={kind!r} is unknown; choose one of {sorted(SDE_STEPS)}")
    return SDE_STEPS[kind]


# --------------------------------------------------------------------------------------------------------------
# DPM-Solver++ for rectified flow (alpha = 1 - sigma, lambda = log(alpha / sigma)), data prediction x0_hat.


def dpm_solver_2m_step(
    x: torch.Tensor,
    x0_pred: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    prev_x0_pred: torch.Tensor | None = None,
    prev_sigma: float | None = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step, midpoint form; first order when no history is given or on the step to sigma = 0.

    With h = lambda(sigma_next) - lambda(sigma), r = (lambda(sigma) - lambda(prev_sigma)) / h,
    D0 = x0_pred, D1 = (x0_pred - prev_x0_pred) / r:
        x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) (D0 + D1 / 2).
    e^{-h} = (sigma_next * alpha) / (alpha_next * sigma) is used directly so sigma_next = 0 stays finite.

    Args:
        x: ``[B, ...]`` latents at ``sigma``; x0_pred: ``[B, ...]`` x0_hat at (x, sigma).
        sigma, sigma_next: shared by the batch (python floats), ``0 <= sigma_next < sigma < 1``.
        prev_x0_pred, prev_sigma: x0_hat and sigma of the previous step (both or neither).
    Returns:
        x_next ``[B, ...]`` fp32.
    """
    if (prev_x0_pred is None) != (prev_sigma is None):
        raise ValueError("pass both prev_x0_pred and prev_sigma (second order) or neither (first order)")
    if not 0.0 <= sigma_next < sigma < 1.0:
        raise ValueError(f"need 0 <= sigma_next < sigma < 1 for DPM-Solver++, got sigma={sigma}, "
                         f"sigma_next={sigma_next}")
    alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
    # alpha_next * (e^{-h} - 1), written without e^{-h} so that sigma_next = 0 gives -alpha_next exactly.
    coeff = sigma_next * alpha / sigma - alpha_next
    d = x0_pred.float()
    second_order = prev_x0_pred is not None and sigma_next > 0.0 and prev_sigma < 1.0
    if second_order:
        if not prev_sigma > sigma:
            raise ValueError(f"prev_sigma must be > sigma, got prev_sigma={prev_sigma}, sigma={sigma}")
        lam, lam_next, lam_prev = _lambda(sigma), _lambda(sigma_next), _lambda(prev_sigma)
        r = (lam - lam_prev) / (lam_next - lam)
        d = d + 0.5 * (x0_pred.float() - prev_x0_pred.float()) / r
    return (sigma_next / sigma) * x.float() - coeff * d


# --------------------------------------------------------------------------------------------------------------
# helpers


def _lambda(sigma: float) -> float:
    return math.log((1.0 - sigma) / sigma)


def _bcast(sigma: SigmaLike, like: torch.Tensor) -> torch.Tensor:
    """A float or ``[B]`` sigma as an fp32 tensor broadcastable to ``like`` (``[B, 1, ...]`` or a 0-dim)."""
    t = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        return t.reshape((1,) * like.ndim)
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must be a float or a [B]={like.shape[0]} tensor, got shape {tuple(t.shape)}")
    return t.reshape((-1,) + (1,) * (like.ndim - 1))


def _check_decreasing(s: torch.Tensor, s_next: torch.Tensor) -> None:
    if bool((s_next >= s).any()) or bool((s > 1.0).any()) or bool((s_next < 0.0).any()):
        raise ValueError(
            "need 0 <= sigma_next < sigma <= 1 (sampling runs from noise sigma=1 to data sigma=0); "
            f"got sigma={s.flatten().tolist()}, sigma_next={s_next.flatten().tolist()}"
        )


def _score_sde_moments(
    x: torch.Tensor, v: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, sigma_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the marginal-preserving SDE step with diffusion sigma_t (Flow-GRPO Eq. 9).

    fp32 on purpose: in bf16 the drift term overflows / loses the tiny differences the ratio is made of.
    """
    x32, v32 = x.float(), v.float()
    dt = s_next - s
    mean = x32 + (v32 + sigma_t**2 / (2.0 * s) * (x32 + (1.0 - s) * v32)) * dt
    std = sigma_t * torch.sqrt(-dt)
    return mean, std


def _draw(
    mean: torch.Tensor, std: torch.Tensor, *, noise: torch.Tensor | None, prev_sample: torch.Tensor | None
) -> torch.Tensor:
    if prev_sample is not None:
        if noise is not None:
            raise ValueError("pass noise (to draw x_next) or prev_sample (to score a stored x_next), not both")
        return prev_sample.float()
    if noise is None:
        noise = torch.randn_like(mean)
    if noise.shape != mean.shape:
        raise ValueError(f"noise must have the latents' shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
    return mean + std * noise.float()


def _gaussian_sample_and_score(
    mean: torch.Tensor, std: torch.Tensor, *, noise: torch.Tensor | None, prev_sample: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x_next = _draw(mean, std, noise=noise, prev_sample=prev_sample)
    # std = 0 (eta = 0) is a deterministic step with no density: log-prob 0 makes its ratio 1 and its gradient 0
    # instead of NaN, so an eta = 0 rollout is a valid, noise-free (ODE) rollout.
    deterministic = std == 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    # x_next is detached: the gradient of the log-prob must flow through the mean only (the sample is data).
    log_prob = gaussian_log_prob(x_next.detach(), mean, safe_std)
    log_prob = torch.where(deterministic.reshape(deterministic.shape[0], -1)[:, 0], 0.0, log_prob)
    return x_next, log_prob, mean, std

