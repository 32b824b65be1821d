"""open_clip based rewards: ``clip_score``, ``hpsv2`` and ``aesthetic``.

Shape legend: N = images (sampled frames of all videos), C = 3, H, W = pixels, D = embedding width.

All three load the model the same way: an open_clip architecture (a built-in name such as ``ViT-H-14``, or a
path to a model-config JSON for anything else) plus a LOCAL checkpoint file, through
``open_clip.create_model(arch, pretrained=<file>)``. Nothing is downloaded. Frames are preprocessed on the
reward's device with the model's own preprocess config (shortest-side resize, center crop, CLIP mean/std)
instead of open_clip's PIL transforms, so videos never leave the GPU.

- ``clip_score``: cosine similarity of frame and prompt embeddings, averaged over sampled frames.
- ``hpsv2``: HPSv2.1 is an open_clip ViT-H-14 fine-tune whose reward is the same cosine similarity
  (Tencent-Hunyuan/MixGRPO:fastvideo/models/reward_model/hps_score.py), so it is ``clip_score`` with the HPS
  checkpoint; stock open_clip loads the ``{"state_dict": ...}`` file (no need for the HPSv2 fork).
- ``aesthetic``: LAION aesthetic predictor v2, an MLP on L2-normalised CLIP ViT-L/14 image embeddings
  (kvablack/ddpo-pytorch:ddpo_pytorch/aesthetic_scorer.py); the prompt is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import PerFrameReward
from rewards.registry import register_reward

PRECISIONS = ("fp32", "bf16", "fp16")


def require_file(path: str | Path | None, arg: str) -> Path:
    """Return ``path`` as a Path if it is an existing file, else raise a ValueError naming ``arg``."""
    if path is None or not Path(path).is_file():
        raise ValueError(
            f"{arg}={str(path)!r} is not an existing file; pass {arg}=<path of a local checkpoint file> "
            "(rewards never download weights)"
        )
    return Path(path)


def clip_preprocess(
    images_NCHW: torch.Tensor,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop: int | None = None,
) -> torch.Tensor:
    """CLIP preprocessing of images in [0, 1]: shortest side -> ``size`` (bicubic), center crop to ``crop``
    (default ``size``), normalise. Returns [N, C, crop, crop].

    Mirrors open_clip/transformers' PIL pipeline on tensors; the clamp stands in for PIL's uint8 saturation
    after bicubic overshoot.
    """
    crop = size if crop is None else crop
    h, w = images_NCHW.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images_NCHW, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    x = x[..., top : top + crop, left : left + crop].clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def resolve_arch(arch: str) -> str:
    """An open_clip model name; a ``.json`` path registers that config and returns its stem as the name."""
    import open_clip

    if arch.endswith(".json"):
        config = require_file(arch, "arch")
        open_clip.add_model_config(config)
        return config.stem
    if arch not in open_clip.list_models():
        raise ValueError(
            f"arch={arch!r} is not an open_clip model name; pass one of open_clip.list_models() or the path "
            "of a model-config JSON"
        )
    return arch


def load_open_clip(arch: str, checkpoint: str | Path | None, *, device: torch.device, precision: str, arg: str,
                   seed: int = 0) -> Any:
    """Build open_clip ``arch`` with weights from the local ``checkpoint`` file (None: seeded random weights, for
    benchmarks at the real architecture); returns (model, tokenizer)."""
    import open_clip

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    name = resolve_arch(arch)
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None, precision=precision, device=device)
        return model.eval().requires_grad_(False), open_clip.get_tokenizer(name)
    path = require_file(checkpoint, arg)
    model = open_clip.create_model(name, pretrained=str(path), precision=precision, device=device, weights_only=True)
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(name)


class _OpenClipReward(PerFrameReward):
    """Shared loading and image encoding of the open_clip rewards."""

    default_arch = "ViT-H-14"

    @staticmethod
    def check_arg_combination(args: dict) -> None:
        """Called by ``rewards.registry.check_args`` before anything loads, and by the constructor."""
        if bool(args.get("random_init", False)) == (args.get("checkpoint") is not None):
            raise ValueError("give exactly one of checkpoint (a local weights file) and random_init=true (seeded "
                             "random weights, for benchmarks)")

    def __init__(
        self,
        *,
        checkpoint: str | None = None,
        arch: str | None = None,
        precision: str = "fp32",
        num_frames: int = 4,
        name: str | None = None,
        batch_size: int | None = 32,
        random_init: bool = False,
    ) -> None:
        """``random_init=True``: seeded random weights instead of ``checkpoint`` (benchmarks: the real
        architecture's cost, meaningless scores)."""
        super().__init__(num_frames=num_frames, name=name, batch_size=batch_size)
        self.check_arg_combination({"checkpoint": checkpoint, "random_init": random_init})
        if checkpoint is not None:
            require_file(checkpoint, "checkpoint")  # fail at build time, before any actor starts
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.checkpoint, self.arch, self.precision = checkpoint, arch or self.default_arch, precision

    def _load(self, device: torch.device) -> None:
        self.model, self.tokenizer = load_open_clip(
            self.arch, self.checkpoint, device=device, precision=self.precision, arg="checkpoint"
        )

    def encode_images(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [N, D]."""
        cfg = self.model.visual.preprocess_cfg
        # open_clip's low-precision modes keep embeddings in fp32 and cast only conv/linear weights: match those.
        dtype = next((m.weight.dtype for m in self.model.visual.modules()
                      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))), torch.float32)
        pixels = clip_preprocess(images_NCHW.float(), size=cfg["size"][0], mean=cfg["mean"], std=cfg["std"])
        return self.model.encode_image(pixels.to(dtype), normalize=True).float()

    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D]; repeated prompts are encoded once."""
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique).to(self.device)
        emb_UD = self.model.encode_text(tokens, normalize=True).float()
        index = torch.tensor([unique.index(p) for p in prompts], device=emb_UD.device)
        return emb_UD.index_select(0, index)


@register_reward("clip_score")
class ClipScore(_OpenClipReward):
    """Cosine similarity of frame and prompt CLIP embeddings (in [-1, 1]), averaged over sampled frames."""

    def score_images(self, images_NCHW: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.encode_images(images_NCHW) * self.encode_texts(prompts)).sum(dim=-1)


@register_reward("hpsv2")
class HPSv2(ClipScore):
    """HPSv2.1: ``clip_score`` on open_clip ViT-H-14 with ``checkpoint=HPS_v2.1_compressed.pt`` (~0.2-0.37)."""

    default_arch = "ViT-H-14"


class AestheticMLP(nn.Module):
    """LAION aesthetic predictor v2 head; layer indices match ``sac+logos+ava1-l14-linearMSE.pth``."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings_ND: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings_ND).squeeze(-1)


def load_aesthetic_mlp(path: str | Path, *, device: torch.device) -> AestheticMLP:
    """Load the aesthetic MLP from a torch (``weights_only``) or safetensors state-dict file."""
    path = require_file(path, "mlp_checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "layers.0.weight" not in state:
        raise ValueError(
            f"mlp_checkpoint={str(path)!r} has no 'layers.0.weight'; expected the LAION aesthetic predictor "
            "state dict (sac+logos+ava1-l14-linearMSE.pth)"
        )
    mlp = AestheticMLP(embed_dim=state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.to(device).eval().requires_grad_(False)


@register_reward("aesthetic")
class Aesthetic(_OpenClipReward):
    """LAION aesthetic score (about 1-10) of sampled frames; CLIP ViT-L/14 from ``checkpoint``."""

    default_arch = "ViT-L-14"

    def __init__(self, *, mlp_checkpoint: str, checkpoint: str, **kwargs: Any) -> None:
        super().__init__(checkpoint=checkpoint, **kwargs)
        require_file(mlp_checkpoint, "mlp_checkpoint")
        self.mlp_checkpoint = mlp_checkpoint

    def _load(self, device: torch.device) -> None:
        super()._load(device)
        self.mlp = load_aesthetic_mlp(self.mlp_checkpoint, device=device)
        width = self.model.visual.output_dim
        if self.mlp.layers[0].in_features != width:
            raise ValueError(
                f"mlp_checkpoint expects {self.mlp.layers[0].in_features}-d embeddings but arch={self.arch!r} "
                f"gives {width}-d; use the CLIP the MLP was trained on (ViT-L-14 for the LAION MLP)"
            )

    def score_images(self, images_NCHW: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.mlp(self.encode_images(images_NCHW))
