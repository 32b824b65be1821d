"""What the RL code is written against: a flow-matching policy.

A policy bundles three parts, each replaceable:

- ``transformer``: the velocity model, ``transformer(latents_BCTHW, timesteps_B, text_states_BLD) -> v_BCTHW``
  with timesteps on Wan's 0..1000 scale (``1000 * sigma``); rectified-flow convention
  ``x_sigma = sigma * noise + (1 - sigma) * x0`` and ``v = noise - x0``.
- ``text_encoder``: ``text_encoder(prompts: list[str]) -> text_states_BLD`` (frozen).
- ``vae``: ``vae.decode(latents_BCTHW) -> videos_BTCHW`` in [0, 1] and ``vae.encode(videos_BTCHW) -> latents``
  (frozen), plus ``vae.latent_shape(num_frames, height, width) -> (C, T, H, W)``.

``mixgrpo`` never looks inside these parts; it only calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TextEncoder(Protocol):
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor: ...


@runtime_checkable
class VideoAutoencoder(Protocol):
    def encode(self, videos_BTCHW: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latents_BCTHW: torch.Tensor) -> torch.Tensor: ...
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]: ...


@runtime_checkable
class FlowPolicy(Protocol):
    transformer: nn.Module
    text_encoder: TextEncoder
    vae: VideoAutoencoder
    negative_prompt: str


@dataclass(kw_only=True)
class PolicySpec:
    """The video a policy produces: frames and pixel size (before VAE compression)."""

    num_frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for field in ("num_frames", "height", "width"):
            if getattr(self, field) <= 0:
                raise ValueError(f"PolicySpec.{field} must be positive, got {getattr(self, field)}")


def flow_velocity(transformer: nn.Module, latents_BCTHW: torch.Tensor, sigma_B: torch.Tensor,
                  text_states_BLD: torch.Tensor) -> torch.Tensor:
    """The one velocity convention of every caller (rollout, learner, reference model, generation): ``sigma`` in
    [0, 1] goes to the transformer as Wan's 0..1000 timestep, and the velocity comes back in fp32 (the sampler's
    latents and log-probs are fp32 whatever the model's dtype)."""
    return transformer(latents_BCTHW, sigma_B * 1000.0, text_states_BLD).float()


class Policy(nn.Module):
    """A concrete FlowPolicy. Only ``transformer`` is trainable; encoders stay frozen."""

    def __init__(
        self,
        *,
        transformer: nn.Module,
        text_encoder: nn.Module,
        vae: nn.Module,
        spec: PolicySpec,
        negative_prompt: str = "",
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        self.spec = spec
        self.negative_prompt = negative_prompt

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one latent video for this policy's spec."""
        return self.vae.latent_shape(self.spec.num_frames, self.spec.height, self.spec.width)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder(list(prompts))

    def velocity(self, latents_BCTHW: torch.Tensor, sigma_B: torch.Tensor, text_states_BLD: torch.Tensor) -> torch.Tensor:
        """fp32 flow velocity at noise level sigma in [0, 1] (:func:`flow_velocity`)."""
        return flow_velocity(self.transformer, latents_BCTHW, sigma_B, text_states_BLD)

    @torch.no_grad()
    def decode(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents_BCTHW).clamp(0.0, 1.0)
