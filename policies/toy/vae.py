"""Identity "VAE" for the toy world: the latent is the video itself, rescaled to [-1, 1].

Shape legend: B = videos, T = frames, C = RGB channels, H, W = pixels.

Pixel-space latents keep the toy policy honest (no learned compression to hide behind) and make decode exact,
so the toy reward sees precisely what the transformer produced.
"""

from __future__ import annotations

import torch
from torch import nn


class ToyPixelVAE(nn.Module):
    """``encode(videos_BTCHW in [0, 1]) -> latents_BCTHW in [-1, 1]`` and its exact inverse ``decode``."""

    channels = 3

    def _check(self, x: torch.Tensor, name: str, layout: str, channel_axis: int) -> None:
        if x.ndim != 5 or x.shape[channel_axis] != self.channels:
            raise ValueError(
                f"ToyPixelVAE.{name} expects a [{layout}] tensor with C = {self.channels}, got shape "
                f"{tuple(x.shape)}; the toy world is RGB video"
            )

    def encode(self, videos_BTCHW: torch.Tensor) -> torch.Tensor:
        self._check(videos_BTCHW, "encode", "B, T, C, H, W", 2)
        return videos_BTCHW.permute(0, 2, 1, 3, 4) * 2.0 - 1.0

    def decode(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        """Videos ``[B, T, C, H, W]``, not clamped (``Policy.decode`` clamps to [0, 1])."""
        self._check(latents_BCTHW, "decode", "B, C, T, H, W", 1)
        return (latents_BCTHW.permute(0, 2, 1, 3, 4) + 1.0) * 0.5

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one latent: the video's own size."""
        for field, value in (("num_frames", num_frames), ("height", height), ("width", width)):
            if value < 1:
                raise ValueError(f"ToyPixelVAE.latent_shape {field} must be >= 1, got {value}")
        return (self.channels, num_frames, height, width)
