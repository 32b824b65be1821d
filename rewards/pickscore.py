"""PickScore: a CLIP-H fine-tune scored through transformers' ``CLIPModel``.

Shape legend: N = images (sampled frames of all videos), D = embedding width.

Loads ``CLIPModel.from_pretrained(model_path)`` and ``AutoProcessor.from_pretrained(processor_path)`` from
LOCAL folders (``yuvalkirstain/PickScore_v1`` and ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` in the original
setup; yifan123/flow_grpo:flow_grpo/pickscore_scorer.py). The raw score is ``logit_scale.exp() * cos``
(about 17-25). With ``normalize=True`` (default) it is mapped with MixGRPO's training normalisation
``(s - 18) / 8`` (Tencent-Hunyuan/MixGRPO:fastvideo/models/reward_model/pick_score.py); advantages are
group z-scores, so the affine map only matters for reward-sum aggregation and logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rewards.base import PerFrameReward
from rewards.clip import clip_preprocess
from rewards.registry import register_reward

PICKSCORE_SHIFT, PICKSCORE_SCALE = 18.0, 8.0


def require_dir(path: str | Path | None, arg: str) -> Path:
    """Return ``path`` as a Path if it is an existing folder, else raise a ValueError naming ``arg``."""
    if path is None or not Path(path).is_dir():
        raise ValueError(
            f"{arg}={str(path)!r} is not an existing folder; pass {arg}=<local folder saved with save_pretrained> "
            "(rewards never download weights)"
        )
    return Path(path)


@register_reward("pickscore")
class PickScore(PerFrameReward):
    """PickScore of sampled frames against the prompt, averaged over frames."""

    def __init__(
        self,
        *,
        model_path: str,
        processor_path: str | None = None,
        normalize: bool = True,
        dtype: str = "float32",
        num_frames: int = 4,
        name: str | None = None,
        batch_size: int | None = 32,
    ) -> None:
        super().__init__(num_frames=num_frames, name=name, batch_size=batch_size)
        self.model_path = require_dir(model_path, "model_path")
        self.processor_path = require_dir(processor_path or model_path, "processor_path")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        self.normalize, self.dtype = normalize, getattr(torch, dtype)

    def _load(self, device: torch.device) -> None:
        from transformers import AutoProcessor, CLIPModel

        self.processor = AutoProcessor.from_pretrained(self.processor_path, local_files_only=True)
        model = CLIPModel.from_pretrained(self.model_path, local_files_only=True, dtype=self.dtype)
        self.model = model.to(device).eval().requires_grad_(False)

    def _pixels(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        ip = self.processor.image_processor
        crop = ip.crop_size["height"] if ip.do_center_crop else ip.size["shortest_edge"]
        pixels = clip_preprocess(
            images_NCHW.float(), size=ip.size["shortest_edge"], crop=crop, mean=ip.image_mean, std=ip.image_std
        )
        return pixels.to(self.dtype)

    def score_images(self, images_NCHW: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        m = self.model
        image_ND = m.visual_projection(m.vision_model(pixel_values=self._pixels(images_NCHW)).pooler_output)
        text = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        text_ND = m.text_projection(
            m.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
        )
        cos_N = torch.nn.functional.cosine_similarity(image_ND.float(), text_ND.float(), dim=-1)
        scores_N = m.logit_scale.exp().float() * cos_N
        return (scores_N - PICKSCORE_SHIFT) / PICKSCORE_SCALE if self.normalize else scores_N
