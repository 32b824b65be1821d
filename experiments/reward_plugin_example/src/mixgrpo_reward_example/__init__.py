"""Colorfulness reward (Hasler & Suesstrunk 2003), shipped as a mixgrpo plugin.

The entry point in pyproject.toml registers ``Colorfulness`` under the name "colorfulness"; nothing here
imports mixgrpo's training code, only the ``rewards`` contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rewards import PerFrameReward


def colorfulness(images_NCHW: torch.Tensor) -> torch.Tensor:
    """Hasler-Suesstrunk colorfulness [N] of RGB images in [0, 1] (0 for grey images)."""
    r, g, b = images_NCHW.unbind(dim=1)
    rg, yb = r - g, 0.5 * (r + g) - b
    std = torch.sqrt(rg.flatten(1).var(dim=1, correction=0) + yb.flatten(1).var(dim=1, correction=0))
    mean = torch.sqrt(rg.flatten(1).mean(dim=1) ** 2 + yb.flatten(1).mean(dim=1) ** 2)
    return std + 0.3 * mean


class Colorfulness(PerFrameReward):
    """Mean colorfulness of ``num_frames`` evenly spaced frames; the prompt is ignored."""

    def score_images(self, images_NCHW: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images_NCHW.shape[1] != 3:
            raise ValueError(f"colorfulness needs RGB frames (C = 3), got C = {images_NCHW.shape[1]}")
        return colorfulness(images_NCHW.float())
