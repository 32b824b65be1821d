"""Rollout engines: turn a batch of prompt groups into trajectories and decoded videos.

``LocalRolloutEngine`` samples in this process. Every random number of a rollout is derived from the request's
seeds (the group seed draws the shared initial noise, each sample seed draws that sample's SDE noise), so any
engine, on any worker, with any batching, reproduces a sample exactly from its seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mixgrpo.config import SamplerConfig
from mixgrpo.algo.sampler import Trajectory, concat_trajectories, sample
from mixgrpo.algo.sde import sigma_schedule
from policies.base import Policy


def group_seed(base_seed: int, iteration: int, group: int) -> int:
    """A seed per (run seed, iteration, group) that no other pair reuses (fits in int63)."""
    return ((base_seed * 1_000_003 + iteration) * 100_003 + group) % (2**62)


def sample_seed(group_seed_value: int, member: int) -> int:
    return (group_seed_value * 1_009 + member + 1) % (2**62)


@dataclass
class RolloutRequest:
    """One iteration's prompt groups. Sample ``b`` is member ``b % group_size`` of group ``b // group_size``."""

    iteration: int
    prompts: list[str]
    """One prompt per group."""
    group_seeds: list[int]
    group_size: int
    sde_steps: list[int]
    """Step indices sampled with the SDE (the window); all other steps are ODE."""
    group_ids: list[int] = field(default_factory=list)
    """Global ids of the groups (default 0..G-1); lets a worker serve a slice of the iteration."""
    prompt_fields: list[dict[str, Any]] = field(default_factory=list)
    """The extra fields of each group's prompt record (a JSONL line's; default none), which reach the rewards."""

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.group_seeds):
            raise ValueError(f"RolloutRequest: {len(self.prompts)} prompts but {len(self.group_seeds)} group seeds")
        if not self.group_ids:
            self.group_ids = list(range(len(self.prompts)))
        if not self.prompt_fields:
            self.prompt_fields = [{} for _ in self.prompts]
        if len(self.prompt_fields) != len(self.prompts):
            raise ValueError(f"RolloutRequest: {len(self.prompts)} prompts but {len(self.prompt_fields)} prompt_fields")

    @property
    def sample_seeds(self) -> list[int]:
        return [sample_seed(s, m) for s in self.group_seeds for m in range(self.group_size)]

    @property
    def sample_prompts(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.group_size)]

    def slice(self, groups: list[int]) -> "RolloutRequest":
        return RolloutRequest(iteration=self.iteration, prompts=[self.prompts[g] for g in groups],
                              group_seeds=[self.group_seeds[g] for g in groups], group_size=self.group_size,
                              sde_steps=self.sde_steps, group_ids=[self.group_ids[g] for g in groups],
                              prompt_fields=[self.prompt_fields[g] for g in groups])


@dataclass
class RolloutResult:
    request: RolloutRequest
    trajectory: Trajectory | None
    """None when the trajectories stayed on the workers that made them (Ray)."""
    videos_BTCHW: torch.Tensor
    """Decoded videos in [0, 1], on the CPU."""
    nfe: int
    seconds: float


def text_states(policy: Policy, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional states for the prompts and the negative prompt's states, batched alike."""
    cond = policy.encode_text(prompts).to(device)
    neg = policy.encode_text([policy.negative_prompt] * len(prompts)).to(device)
    return cond, neg


class LocalRolloutEngine:
    """Samples in this process with the policy it is given (the learner's own weights in the local backend)."""

    def __init__(self, policy: Policy, sampler_cfg: SamplerConfig, *, device: torch.device, batch_groups: int,
                 keep_uncond: bool = False) -> None:
        self.policy = policy
        self.keep_uncond = keep_uncond  # store the CFG uncond velocity of SDE steps (learner.reuse_rollout_uncond)
        self.cfg = sampler_cfg
        self.device = device
        self.batch_groups = max(1, batch_groups)
        self.sigmas = sigma_schedule(sampler_cfg.num_steps, sampler_cfg.shift)
        self.model_dtype = next(policy.transformer.parameters()).dtype

    @torch.no_grad()
    def rollout(self, request: RolloutRequest) -> RolloutResult:
        start = time.perf_counter()
        self.policy.transformer.eval()
        chunks, videos, nfe = [], [], 0
        for first in range(0, len(request.prompts), self.batch_groups):
            part = request.slice(list(range(first, min(first + self.batch_groups, len(request.prompts)))))
            cond, neg = text_states(self.policy, part.prompts, self.device)
            traj = sample(
                self.policy.velocity,
                text_states_BLD=cond,
                negative_text_states_BLD=neg if self.cfg.guided else None,
                guidance_scale=self.cfg.guidance_scale,
                sigmas=self.sigmas,
                sde_steps=request.sde_steps,
                eta=self.cfg.eta,
                sde_kind=self.cfg.sde_kind,
                post_window=self.cfg.post_window,
                post_window_ratio=self.cfg.post_window_ratio,
                latent_shape=self.policy.latent_shape(),
                group_size=request.group_size,
                seeds=part.sample_seeds,
                group_seeds=part.group_seeds,
                device=self.device,
                dtype=self.model_dtype,
                keep_uncond=self.keep_uncond,
            )
            videos.append(self.policy.decode(traj.latents).float().cpu())
            chunks.append(traj)
            nfe = traj.nfe
        trajectory = concat_trajectories(chunks) if len(chunks) > 1 else chunks[0]
        return RolloutResult(request=request, trajectory=trajectory, videos_BTCHW=torch.cat(videos),
                             nfe=nfe, seconds=time.perf_counter() - start)


@torch.no_grad()
def generate(policy: Policy, cfg, prompts: list[str], *, seed: int, device: torch.device,
             seeds: list[int] | None = None) -> torch.Tensor:
    """Videos ``[B, T, C, H, W]`` in [0, 1] for ``prompts`` with the deterministic ODE sampler (no SDE window).

    ``cfg`` is the experiment config (its sampler section is used); video ``i`` starts from the noise of seed
    ``seeds[i]`` (default ``seed + i``).
    """
    policy.transformer.eval()
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    engine = LocalRolloutEngine(policy, cfg.sampler, device=device, batch_groups=len(prompts))
    cond, neg = text_states(policy, prompts, device)
    traj = sample(policy.velocity, text_states_BLD=cond, negative_text_states_BLD=neg if cfg.sampler.guided else None,
                  guidance_scale=cfg.sampler.guidance_scale, sigmas=engine.sigmas, sde_steps=[], eta=0.0,
                  sde_kind=cfg.sampler.sde_kind, post_window="euler", post_window_ratio=1.0,
                  latent_shape=policy.latent_shape(), group_size=1, seeds=seeds, group_seeds=seeds, device=device)
    return policy.decode(traj.latents).float().cpu()
