"""A synthetic policy for benchmarks: an OSP-Next preset with random weights and stand-in encoders.

It has the real transformer's shapes and cost (e.g. Wan2.1-1.3B) but needs no checkpoint, so a benchmark can
build it on every Ray worker from a config alone. The text encoder returns fixed random states per prompt and
the decoder maps latents to videos without a VAE: their cost is left out of what the benchmark compares.
Everything is seeded, so every process that builds it with the same arguments gets the same weights.

The transformer can be built on the meta device (no memory, no time) and materialised later, after it was
sharded: :func:`materialize_` writes each parameter (or this rank's shard of it) from a generator seeded by the
parameter's name, so a 14B model is initialised on the GPUs in seconds instead of minutes on the CPU, and a
sharded and an unsharded build hold the same values.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import nn

from policies.base import Policy, PolicySpec
from policies.parallel.fsdp import copy_full_
from policies.osp_next import OSPNext, OSPNextConfig
from policies.vae import check_video_size

WAN_TEMPORAL_FACTOR, WAN_SPATIAL_FACTOR = 4, 8


class HashedTextEncoder(nn.Module):
    """States ``[B, length, dim]`` drawn from a generator seeded by a stable hash of each prompt.

    zlib.crc32 rather than ``hash()``: Python salts string hashes per process, and every worker must agree.
    """

    def __init__(self, dim: int, length: int) -> None:
        super().__init__()
        self.dim, self.length = dim, length

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = [torch.randn(self.length, self.dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        return torch.stack(rows)


class LatentDecoder(nn.Module):
    """Wan-shaped latents (4x temporal, 8x spatial compression); ``decode`` squashes three channels to [0, 1]."""

    def __init__(self, channels: int, latent_patch: int) -> None:
        super().__init__()
        self.channels, self.latent_patch = channels, latent_patch

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        check_video_size(num_frames, height, width, temporal_factor=WAN_TEMPORAL_FACTOR,
                         spatial_factor=WAN_SPATIAL_FACTOR, latent_patch=self.latent_patch, owner="policy.")
        return (self.channels, (num_frames - 1) // WAN_TEMPORAL_FACTOR + 1, height // WAN_SPATIAL_FACTOR,
                width // WAN_SPATIAL_FACTOR)

    def encode(self, videos_BTCHW: torch.Tensor) -> torch.Tensor:
        raise ValueError("the synthetic policy's stand-in decoder has no encoder; use policy.kind=wan for encoding")

    def decode(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(latents_BCTHW[:, :3].float()).permute(0, 2, 1, 3, 4)


def build_synthetic_policy(*, preset: str = "wan2.1-t2v-1.3b", num_frames: int, height: int, width: int,
                           layout: str = "full", num_full_blocks: int = 8, sparse_ratio: int = 2,
                           dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                           seed: int = 0, overrides: dict | None = None) -> Policy:
    """An ``OSPNextConfig.preset(preset)`` transformer with seeded random weights, for ``num_frames x height x
    width`` videos (Wan sizes: frames 4n+1, height and width multiples of 16); ``overrides``: more
    OSPNextConfig fields."""
    config = OSPNextConfig.preset(preset, layout=layout, num_full_blocks=num_full_blocks, sparse_ratio=sparse_ratio,
                                  **(overrides or {}))
    decoder = LatentDecoder(config.in_channels, config.patch_size[1])
    spec = PolicySpec(num_frames=num_frames, height=height, width=width)
    decoder.latent_shape(num_frames, height, width)  # fail on a bad size now, not mid-rollout
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            transformer = OSPNext(config).to(dtype=dtype)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = OSPNext(config)
        transformer.to(device=device, dtype=dtype)
    text = HashedTextEncoder(config.text_dim, min(64, config.text_len))
    return Policy(transformer=transformer, text_encoder=text, vae=decoder, spec=spec)


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def _full_values(name: str, module: nn.Module, shape: torch.Size, *, seed: int, device: torch.device) -> torch.Tensor:
    """Values of parameter ``name`` (its whole shape, float32) from a generator seeded by the name.

    Linear and conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as torch's default init; norm weights 1,
    norm biases 0; modulation tables N(0, 1/dim) as OSPNext's own init; LoRA A ~ N(0, 1/r) and B = 0 as peft's
    "gaussian" init (the adapted model starts as the base).
    """
    leaf = name.rsplit(".", 1)[-1]
    generator = torch.Generator(device=device).manual_seed(_name_seed(seed, name))
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if "lora_B" in name:
        return out.zero_()
    if "lora_A" in name:
        return out.normal_(0.0, 1.0 / shape[0], generator=generator)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return out.fill_(1.0 if leaf == "weight" else 0.0)
    weight = getattr(module, "weight", None)
    if isinstance(module, (nn.Linear, nn.Conv3d)) and weight is not None:
        bound = 1.0 / math.sqrt(math.prod(weight.shape[1:]))
        return out.uniform_(-bound, bound, generator=generator)
    return out.normal_(0.0, 1.0 / math.sqrt(shape[-1]), generator=generator)


@torch.no_grad()
def materialize_(transformer: nn.Module, device: str | torch.device, *, seed: int = 0) -> nn.Module:
    """Give every meta-device parameter of ``transformer`` storage on ``device`` and seeded values, in place.

    Works on plain and on FSDP-sharded models (each rank writes its own shard of the same values); buffers (none in
    OSPNext) are zeroed. Returns the transformer.
    """
    device = torch.device(device)
    transformer.to_empty(device=device)
    modules = dict(transformer.named_modules())
    for name, param in transformer.named_parameters():
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else transformer
        full = _full_values(name, owner, param.shape, seed=seed, device=device)
        copy_full_(param, full)
    for buffer in transformer.buffers():
        buffer.zero_()
    return transformer
