"""Rewards that need no weights: ``jpeg_compressibility`` and ``temporal_flicker``.

Shape legend: B = videos, T = frames, C = channels, H, W = pixels, N = images.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch

from rewards.base import PerFrameReward, Reward
from rewards.registry import register_reward


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 with round-to-nearest, the quantisation a saved video or image applies."""
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8)


def jpeg_size_kb(image_CHW_uint8: torch.Tensor, *, quality: int) -> float:
    """Size in kB (1000 bytes) of one image encoded as JPEG at ``quality`` with PIL."""
    from PIL import Image

    array = image_CHW_uint8.permute(1, 2, 0).cpu().numpy()
    mode = "L" if array.shape[-1] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode=mode).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


@register_reward("jpeg_compressibility")
class JpegCompressibility(PerFrameReward):
    """DDPO's compressibility: minus the JPEG size in kB (quality 95) of each sampled frame, averaged.

    Same definition as kvablack/ddpo-pytorch:ddpo_pytorch/rewards.py ``jpeg_compressibility`` (Flow-GRPO
    additionally divides by 500; use the ensemble weight for that). ``sign=+1`` gives incompressibility.
    """

    def __init__(self, *, quality: int = 95, sign: int = -1, num_frames: int = 4, **kwargs: Any) -> None:
        super().__init__(num_frames=num_frames, **kwargs)
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be a JPEG quality in [1, 100], got {quality}")
        if sign not in (-1, 1):
            raise ValueError(f"sign must be -1 (compressibility) or +1 (incompressibility), got {sign}")
        self.quality, self.sign = quality, sign

    def score_images(self, images_NCHW: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        sizes = [jpeg_size_kb(img, quality=self.quality) for img in to_uint8(images_NCHW)]
        return self.sign * torch.tensor(sizes, dtype=torch.float32)


def temporal_flicker_score(videos_BTCHW: torch.Tensor) -> torch.Tensor:
    """VBench temporal flickering [B]: (255 - MAE) / 255 over consecutive uint8 frames; 1 = perfectly static.

    Vchitect/VBench:vbench/temporal_flickering.py averages the per-pair mean absolute difference of uint8
    frames; quantising first keeps sub-1/255 noise from counting, as in VBench.
    """
    if videos_BTCHW.shape[1] < 2:
        raise ValueError(f"temporal_flicker needs at least 2 frames, got T = {videos_BTCHW.shape[1]}")
    frames = to_uint8(videos_BTCHW).float()
    mae_B = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
    return (255.0 - mae_B) / 255.0


@register_reward("temporal_flicker")
class TemporalFlicker(Reward):
    """Higher = steadier video: VBench's temporal-flickering score on all frames."""

    def score(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        return temporal_flicker_score(videos_BTCHW)
