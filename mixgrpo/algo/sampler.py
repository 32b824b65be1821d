"""The mixed ODE/SDE sampler: one rollout of a batch of prompt groups -> a :class:`Trajectory`.

Shape legend: N prompt groups, G members per group, B = N * G samples (sample ``b = n * G + g``), S stored (SDE)
steps, K sampler steps, C/T/H/W latent channels/frames/height/width, L/D text tokens/width.

One rollout (MixGRPO, Alg. 1, with the peers' per-group initial noise):

1. Each group's initial noise comes from its group seed; all G members start from it.
2. Steps before the first SDE step are Euler ODE steps, computed ONCE per group (N rows, not B).
3. At the first SDE step the batch branches to G members. Inside [first, last SDE step] the SDE steps draw their
   noise from a per-sample generator seeded by ``noise_seed(sample seed, step)``, so any worker reproduces a sample
   from its seed whatever the batch it shares; non-SDE steps inside that span are Euler.
4. After the last SDE step: Euler, or DPM-Solver++(2M) (MixGRPO-Flash), on a sub-grid of the remaining sigmas
   with ceil(ratio * n) of the n remaining steps (``post_window_sigmas``). MixGRPO's code instead rebuilds a
   linspace with int(ratio * n) *points* (one step fewer) and shifts it again; a sub-grid keeps the schedule's shape.

Latents stay fp32 throughout; only the velocity model's input is cast to ``dtype``. CFG: cond and uncond rows go
through the model in ONE call, ``v = v_u + g * (v_c - v_u)`` (fp32). The learner's :func:`recompute_log_prob` runs
exactly the same computation, so with unchanged weights (and a batch-invariant model) it returns the stored
log-probs bit for bit: ratio == 1 before the first update.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence

import torch

from mixgrpo.algo.sde import dpm_solver_2m_step, euler_step, get_sde_step, x0_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``velocity_fn(x_BCTHW, sigma_B, text_states_BLD) -> v_BCTHW`` with sigma in [0, 1]."""

POST_WINDOW_SOLVERS = ("euler", "dpm2m")


@dataclass(kw_only=True)
class Trajectory:
    """One rollout batch. Tensors are on one device; sample b belongs to group ``group_index[b]``."""

    latents: torch.Tensor
    """``[B, C, T, H, W]`` fp32 final latents (sigma = sigmas[-1])."""
    x_t: torch.Tensor
    """``[S, B, C, T, H, W]`` fp32 latents entering each stored SDE step."""
    x_next: torch.Tensor
    """``[S, B, C, T, H, W]`` fp32 latents the SDE step produced."""
    log_prob: torch.Tensor
    """``[B, S]`` fp32 rollout log-probs of x_next given x_t."""
    sigmas: torch.Tensor
    """``[S]`` fp32 sigma of each stored step."""
    sigma_next: torch.Tensor
    """``[S]`` fp32 sigma each stored step goes to."""
    step_indices: torch.Tensor
    """``[S]`` int64 sampler step index of each stored step."""
    seeds: torch.Tensor
    """``[B]`` int64 per-sample seeds (SDE noise)."""
    group_index: torch.Tensor
    """``[B]`` int64 index of the sample's prompt group in the rollout's text states."""
    num_groups: int
    """Prompt groups of the rollout (``group_index`` < num_groups; ``select`` keeps it, ``concat`` sums it)."""
    nfe: int
    """Model evaluations along ONE sample's trajectory: steps run (after compression) x 2 with CFG (cond and
    uncond are two forward evaluations even though they share one batched call)."""
    num_model_rows: int
    """Rows that went through the model in the whole rollout (cost: prefix rows count once per group)."""
    sde_kind: str
    eta: float
    guidance_scale: float
    cfg: bool
    """Whether the rollout used classifier-free guidance (negative text states were given)."""
    model_dtype: torch.dtype
    uncond_velocity: torch.Tensor | None = None
    """``[S, B, C, T, H, W]`` fp32 CFG unconditional velocity the rollout computed at each stored step (kept only
    with ``sample(keep_uncond=True)``). While the policy still has the sampling weights (the first optimizer step
    of an on-policy update), the learner reuses it instead of running the uncond rows again; exact up to the
    model's batch invariance (the rollout ran cond and uncond in one call), and only when rollout and learner run
    the same numerics (no dropout, the same quantization and dtype)."""

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.step_indices.shape[0]

    def to(self, device: torch.device | str) -> Trajectory:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if f.name != "model_dtype" and isinstance(getattr(self, f.name), torch.Tensor)})

    def select(self, sample_idx: torch.Tensor | Sequence[int]) -> Trajectory:
        """The samples ``sample_idx`` (in that order); step dims are kept."""
        idx = torch.as_tensor(sample_idx, dtype=torch.long, device=self.latents.device)
        return replace(
            self, latents=self.latents[idx], x_t=self.x_t[:, idx], x_next=self.x_next[:, idx],
            log_prob=self.log_prob[idx], seeds=self.seeds[idx], group_index=self.group_index[idx],
            uncond_velocity=None if self.uncond_velocity is None else self.uncond_velocity[:, idx],
        )


def concat_trajectories(trajectories: Sequence[Trajectory], num_groups: Sequence[int] | None = None) -> Trajectory:
    """Concatenate rollouts of one iteration (same window and settings) along samples, in order.

    Group indices are offset so they index the concatenation of the rollouts' text states. ``num_groups`` (the
    groups of each rollout) is optional; when given it must match the trajectories' own ``num_groups``.
    """
    if num_groups is not None and list(num_groups) != [t.num_groups for t in trajectories]:
        raise ValueError(f"num_groups {list(num_groups)} does not match the trajectories' "
                         f"{[t.num_groups for t in trajectories]}")
    first = trajectories[0]
    for traj in trajectories[1:]:
        same = (torch.equal(traj.step_indices, first.step_indices) and torch.equal(traj.sigmas, first.sigmas)
                and (traj.sde_kind, traj.eta, traj.guidance_scale) == (first.sde_kind, first.eta, first.guidance_scale))
        if not same:
            raise ValueError("trajectories come from different windows or sampler settings; "
                             "concatenate the rollouts of one iteration only")
    offsets = [sum(t.num_groups for t in trajectories[:i]) for i in range(len(trajectories))]
    return replace(
        first,
        latents=torch.cat([t.latents for t in trajectories]),
        x_t=torch.cat([t.x_t for t in trajectories], dim=1),
        x_next=torch.cat([t.x_next for t in trajectories], dim=1),
        log_prob=torch.cat([t.log_prob for t in trajectories]),
        seeds=torch.cat([t.seeds for t in trajectories]),
        group_index=torch.cat([t.group_index + off for t, off in zip(trajectories, offsets)]),
        num_groups=sum(t.num_groups for t in trajectories),
        num_model_rows=sum(t.num_model_rows for t in trajectories),
        uncond_velocity=(torch.cat([t.uncond_velocity for t in trajectories], dim=1)
                         if all(t.uncond_velocity is not None for t in trajectories) else None),
    )


def noise_seed(seed: int, step: int) -> int:
    """Seed of the generator that draws sample ``seed``'s SDE noise at sampler step ``step`` (63-bit, stable)."""
    digest = hashlib.blake2b(f"sde-noise/{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sde_noise(seeds: Sequence[int], step: int, latent_shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[B, C, T, H, W]`` standard normal noise, row b from its own CPU generator (device-independent values)."""
    rows = [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(noise_seed(s, step)))
            for s in seeds]
    return torch.stack(rows).to(device)


def initial_noise(group_seeds: Sequence[int], latent_shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[N, C, T, H, W]`` initial noise, one per group from its seed."""
    rows = [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in group_seeds]
    return torch.stack(rows).to(device)


def post_window_sigmas(tail_sigmas: torch.Tensor, ratio: float) -> torch.Tensor:
    """Sub-grid of ``tail_sigmas`` (n + 1 points = n steps) with m = ceil(ratio * n) steps, endpoints kept."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"post_window_ratio must be in (0, 1] (1 keeps every step), got {ratio}")
    num_tail = tail_sigmas.shape[0] - 1
    if num_tail <= 0:
        return tail_sigmas
    num_kept = max(1, math.ceil(ratio * num_tail - 1e-9))
    # round half up (not torch.round's half-to-even) so the pick rule is the obvious one
    picks = torch.floor(torch.linspace(0, num_tail, num_kept + 1, dtype=torch.float64) + 0.5).long()
    return tail_sigmas[picks]


def guided_velocity(
    velocity_fn: VelocityFn,
    x_BCTHW: torch.Tensor,
    sigma: float,
    text_states_BLD: torch.Tensor,
    negative_text_states_BLD: torch.Tensor | None,
    guidance_scale: float,
    *,
    dtype: torch.dtype = torch.float32,
    detach_uncond: bool = False,
    separate_uncond: bool = False,
    uncond_BCTHW: torch.Tensor | None = None,
    uncond_out: list | None = None,
) -> torch.Tensor:
    """fp32 velocity at (x, sigma); with negative text states, CFG from one batched cond+uncond call.

    ``separate_uncond`` (with ``detach_uncond``, under grad) runs the uncond rows in their own call under no_grad,
    so backward touches only the cond rows: half the backward compute and activation memory of the learner. The
    forward values then match the rollout's batched call only up to the model's batch invariance.

    ``negative_text_states_BLD`` is ``[B or 1, L, D]`` with the same L as the prompts (pad both, e.g. to 512 as Wan
    does). ``detach_uncond`` stops the gradient through the uncond half (Flow-GRPO, OSP-Next); the forward value is
    unchanged, so the log-prob stays bit-equal to the rollout's.
    """
    num = x_BCTHW.shape[0]
    sigma_B = torch.full((num,), float(sigma), dtype=torch.float32, device=x_BCTHW.device)
    if negative_text_states_BLD is None:
        return velocity_fn(x_BCTHW.to(dtype), sigma_B, text_states_BLD).float()
    neg = negative_text_states_BLD
    if neg.shape[1:] != text_states_BLD.shape[1:] or neg.shape[0] not in (1, num):
        raise ValueError(f"negative_text_states_BLD {tuple(neg.shape)} must be [B or 1, L, D] with the prompts' "
                         f"L, D {tuple(text_states_BLD.shape[1:])}; pad both to the same token length")
    neg = neg.expand(num, -1, -1).to(text_states_BLD.dtype)
    if uncond_BCTHW is not None:  # the uncond velocity computed earlier with the same weights: cond rows only
        v_uncond = uncond_BCTHW.detach().float()
        v_cond = velocity_fn(x_BCTHW.to(dtype), sigma_B, text_states_BLD).float()
        return v_uncond + guidance_scale * (v_cond - v_uncond)
    if separate_uncond and detach_uncond and torch.is_grad_enabled():
        with torch.no_grad():
            v_uncond = velocity_fn(x_BCTHW.to(dtype), sigma_B, neg).float()
        v_cond = velocity_fn(x_BCTHW.to(dtype), sigma_B, text_states_BLD).float()
        return v_uncond + guidance_scale * (v_cond - v_uncond)
    x2 = torch.cat([x_BCTHW, x_BCTHW]).to(dtype)
    v_both = velocity_fn(x2, torch.cat([sigma_B, sigma_B]), torch.cat([text_states_BLD, neg])).float()
    v_cond, v_uncond = v_both.chunk(2)
    if uncond_out is not None:
        uncond_out.append(v_uncond.detach())
    if detach_uncond:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@dataclass
class _Rollout:
    """Mutable loop state of one rollout (kept out of the public API)."""

    velocity_fn: VelocityFn
    text: torch.Tensor
    negative: torch.Tensor | None
    guidance_scale: float
    dtype: torch.dtype
    micro_batch_size: int | None
    uncond_out: list | None = None
    nfe: int = 0
    num_model_rows: int = 0

    def velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        cfg = self.negative is not None
        self.nfe += 2 if cfg else 1
        self.num_model_rows += x.shape[0] * (2 if cfg else 1)
        chunk = x.shape[0] if self.micro_batch_size is None else self.micro_batch_size
        out = []
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            neg = self.negative
            if neg is not None and neg.shape[0] > 1:
                neg = neg[rows]
            out.append(guided_velocity(self.velocity_fn, x[rows], sigma, self.text[rows], neg, self.guidance_scale,
                                       dtype=self.dtype, uncond_out=self.uncond_out))
        return torch.cat(out)

    def branch(self, group_size: int) -> None:
        self.text = self.text.repeat_interleave(group_size, dim=0)
        if self.negative is not None and self.negative.shape[0] > 1:
            self.negative = self.negative.repeat_interleave(group_size, dim=0)


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    *,
    text_states_BLD: torch.Tensor,
    negative_text_states_BLD: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    sigmas: torch.Tensor,
    sde_steps: Sequence[int],
    eta: float,
    sde_kind: str = "flow_grpo",
    post_window: str = "euler",
    post_window_ratio: float = 1.0,
    latent_shape: Sequence[int],
    group_size: int,
    seeds: Sequence[int],
    group_seeds: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    micro_batch_size: int | None = None,
    keep_uncond: bool = False,
) -> Trajectory:
    """Roll out N prompt groups of ``group_size`` samples each (see the module docstring for the semantics).

    Args:
        velocity_fn: ``(x_BCTHW, sigma_B, text_states_BLD) -> v_BCTHW``, called under no_grad; it may see N or B
            rows (2N / 2B with CFG) per call.
        text_states_BLD: ``[N, L, D]`` prompt states, one row per group.
        negative_text_states_BLD: ``[N or 1, L, D]`` negative-prompt states; None disables CFG (then
            ``guidance_scale`` must be <= 1 and is not used, diffusers' convention).
        sigmas: ``[K + 1]`` decreasing sigmas in [0, 1] (``sde.sigma_schedule``).
        sde_steps: sampler step indices in [0, K) that are SDE steps (the window; may be empty: a pure ODE rollout).
        eta, sde_kind: the SDE noise level and variant (``sde.SDE_STEPS``).
        post_window: ``"euler"`` or ``"dpm2m"`` after the last SDE step; post_window_ratio: fraction of those steps
            kept (MixGRPO-Flash 0.4, Flash* 0.2).
        latent_shape: ``(C, T, H, W)``. group_size: G.
        seeds: ``[B]`` per-sample seeds (SDE noise). group_seeds: ``[N]`` per-group seeds (initial noise).
        device: where latents live. dtype: the model's input dtype (latents stay fp32).
        micro_batch_size: at most this many samples (2x rows with CFG) per model call; None = all at once.
        keep_uncond: with CFG, store the uncond velocity of each SDE step (``Trajectory.uncond_velocity``).
    """
    num_groups = _validate(text_states_BLD, negative_text_states_BLD, guidance_scale, sigmas, sde_steps,
                           post_window, latent_shape, group_size, seeds, group_seeds, micro_batch_size)
    step_fn = get_sde_step(sde_kind)
    device = torch.device(device)
    sigma_list = [float(s) for s in sigmas.detach().cpu().double()]  # python floats: identical in recompute
    num_steps = len(sigma_list) - 1
    sde_set = sorted(set(int(i) for i in sde_steps))
    first, last = (sde_set[0], sde_set[-1]) if sde_set else (num_steps, num_steps - 1)
    state = _Rollout(velocity_fn, text_states_BLD.to(device),
                     None if negative_text_states_BLD is None else negative_text_states_BLD.to(device),
                     guidance_scale, dtype, micro_batch_size)

    x = initial_noise(group_seeds, latent_shape, device)
    for i in range(first):  # deterministic prefix, once per group
        x = euler_step(x, state.velocity(x, sigma_list[i]), sigma_list[i], sigma_list[i + 1])
    x = x.repeat_interleave(group_size, dim=0)
    state.branch(group_size)

    stored: dict[str, list[torch.Tensor]] = {"x_t": [], "x_next": [], "log_prob": [], "uncond": []}
    keep_uncond = keep_uncond and negative_text_states_BLD is not None
    prev_x0, prev_sigma = None, None
    for i in range(first, last + 1):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        state.uncond_out = [] if keep_uncond and i in sde_set else None
        v = state.velocity(x, sigma)
        if state.uncond_out is not None:
            stored["uncond"].append(torch.cat(state.uncond_out))
            state.uncond_out = None
        prev_x0, prev_sigma = x0_from_velocity(x, v, sigma), sigma
        if i in sde_set:
            noise = sde_noise(seeds, i, latent_shape, device)
            x_next, log_prob, _, _ = step_fn(x, v, sigma, sigma_next, eta, noise=noise)
            stored["x_t"].append(x)
            stored["x_next"].append(x_next)
            stored["log_prob"].append(log_prob)
            x = x_next
        else:
            x = euler_step(x, v, sigma, sigma_next)

    tail = post_window_sigmas(sigmas.detach().cpu().double()[last + 1:], post_window_ratio).tolist()
    for sigma, sigma_next in zip(tail[:-1], tail[1:]):
        v = state.velocity(x, sigma)
        if post_window == "dpm2m":
            x0 = x0_from_velocity(x, v, sigma)
            x = dpm_solver_2m_step(x, x0, sigma, sigma_next, prev_x0_pred=prev_x0, prev_sigma=prev_sigma)
            prev_x0, prev_sigma = x0, sigma
        else:
            x = euler_step(x, v, sigma, sigma_next)

    steps = torch.tensor(sde_set, dtype=torch.long)
    num_samples = x.shape[0]
    empty = x.new_zeros((0, *x.shape))
    return Trajectory(
        latents=x,
        x_t=torch.stack(stored["x_t"]) if sde_set else empty,
        x_next=torch.stack(stored["x_next"]) if sde_set else empty.clone(),
        log_prob=torch.stack(stored["log_prob"], dim=1) if sde_set else x.new_zeros((num_samples, 0)),
        sigmas=torch.tensor([sigma_list[i] for i in sde_set], dtype=torch.float32, device=device),
        sigma_next=torch.tensor([sigma_list[i + 1] for i in sde_set], dtype=torch.float32, device=device),
        step_indices=steps.to(device),
        seeds=torch.tensor([int(s) for s in seeds], dtype=torch.long, device=device),
        group_index=torch.arange(num_groups, device=device).repeat_interleave(group_size),
        num_groups=num_groups,
        nfe=state.nfe,
        num_model_rows=state.num_model_rows,
        sde_kind=sde_kind,
        eta=float(eta),
        guidance_scale=float(guidance_scale),
        cfg=negative_text_states_BLD is not None,
        model_dtype=dtype,
        uncond_velocity=torch.stack(stored["uncond"]) if keep_uncond and sde_set else None,
    )


def recompute_log_prob(
    velocity_fn: VelocityFn,
    traj: Trajectory,
    *,
    step: int,
    sample_idx: torch.Tensor | Sequence[int],
    text_states_BLD: torch.Tensor,
    negative_text_states_BLD: torch.Tensor | None = None,
    guidance_scale: float,
    eta: float,
    sde_kind: str,
    detach_uncond: bool = True,
    separate_uncond: bool = False,
    reuse_uncond: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of stored step ``step`` (index into S) for samples ``sample_idx`` under ``velocity_fn``.

    Runs under the caller's grad mode (the learner's forward). ``text_states_BLD`` is ``[b, L, D]``, one row per
    selected sample (``rollout_text[traj.group_index[sample_idx]]``); negative states ``[b or 1, L, D]``.
    ``guidance_scale``, ``eta`` and ``sde_kind`` must be the rollout's (checked: any difference breaks ratio == 1).

    Returns:
        ``(log_prob [b], mean [b, C, T, H, W], std)`` fp32; ``mean`` and ``std`` feed ``loss.kl_to_reference``.
    """
    used = {"guidance_scale": traj.guidance_scale, "eta": traj.eta, "sde_kind": traj.sde_kind}
    given = {"guidance_scale": float(guidance_scale), "eta": float(eta), "sde_kind": sde_kind}
    if used != given:
        raise ValueError(f"recompute settings {given} differ from the rollout's {used}; pass the rollout's values "
                         "(sampler.guidance_scale, sampler.eta, sampler.sde_kind)")
    if (negative_text_states_BLD is not None) != traj.cfg:
        raise ValueError(f"the rollout {'used' if traj.cfg else 'did not use'} CFG; pass negative_text_states_BLD "
                         "exactly when the rollout had them, or the log-probs cannot match")
    if not 0 <= step < traj.num_steps:
        raise ValueError(f"step={step} is not a stored step index; the trajectory stores {traj.num_steps} steps")
    idx = torch.as_tensor(sample_idx, dtype=torch.long, device=traj.x_t.device)
    x_t, x_next = traj.x_t[step, idx], traj.x_next[step, idx]
    if text_states_BLD.shape[0] != x_t.shape[0]:
        raise ValueError(f"text_states_BLD has {text_states_BLD.shape[0]} rows for {x_t.shape[0]} samples; "
                         "index the rollout's text states with traj.group_index[sample_idx]")
    sigma, sigma_next = float(traj.sigmas[step]), float(traj.sigma_next[step])
    # reuse_uncond: only valid while velocity_fn has the sampling weights (the caller knows; see the field's doc).
    uncond = traj.uncond_velocity[step, idx] if reuse_uncond and traj.uncond_velocity is not None and detach_uncond \
        else None
    v = guided_velocity(velocity_fn, x_t, sigma, text_states_BLD, negative_text_states_BLD, guidance_scale,
                        dtype=traj.model_dtype, detach_uncond=detach_uncond, separate_uncond=separate_uncond,
                        uncond_BCTHW=uncond)
    _, log_prob, mean, std = get_sde_step(sde_kind)(x_t, v, sigma, sigma_next, eta, prev_sample=x_next)
    return log_prob, mean, std


def _validate(
    text: torch.Tensor,
    negative: torch.Tensor | None,
    guidance_scale: float,
    sigmas: torch.Tensor,
    sde_steps: Sequence[int],
    post_window: str,
    latent_shape: Sequence[int],
    group_size: int,
    seeds: Sequence[int],
    group_seeds: Sequence[int],
    micro_batch_size: int | None,
) -> int:
    if text.ndim != 3:
        raise ValueError(f"text_states_BLD must be [N, L, D] (one row per prompt group), got {tuple(text.shape)}")
    num_groups = text.shape[0]
    if negative is None and guidance_scale > 1.0:
        raise ValueError(f"guidance_scale={guidance_scale} needs negative_text_states_BLD; pass them, or set "
                         "guidance_scale to 1.0 (or 0) to sample without CFG")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None (one call for the whole batch), "
                         f"got {micro_batch_size}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if len(group_seeds) != num_groups or len(seeds) != num_groups * group_size:
        raise ValueError(f"need {num_groups} group_seeds and {num_groups * group_size} seeds (N groups x group_size), "
                         f"got {len(group_seeds)} and {len(seeds)}")
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape must be (C, T, H, W), got {tuple(latent_shape)}")
    if sigmas.ndim != 1 or sigmas.shape[0] < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be a strictly decreasing [K + 1] schedule; build it with sde.sigma_schedule")
    if not (0.0 <= float(sigmas[-1]) and float(sigmas[0]) <= 1.0):
        raise ValueError(f"sigmas must lie in [0, 1], got {float(sigmas[0])} .. {float(sigmas[-1])}")
    num_steps = sigmas.shape[0] - 1
    bad = [i for i in sde_steps if not 0 <= int(i) < num_steps]
    if bad:
        raise ValueError(f"sde_steps {bad} are outside [0, {num_steps}); the schedule has {num_steps} steps")
    if post_window not in POST_WINDOW_SOLVERS:
        raise ValueError(f"post_window={post_window!r} is unknown; choose one of {POST_WINDOW_SOLVERS}")
    return num_groups
