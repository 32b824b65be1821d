"""A benchmark policy with every part at real size: the OSP-Next transformer of ``policies.synthetic``, the real
Wan2.1 VAE (diffusers ``AutoencoderKLWan`` with Wan2.1's configuration: diffusers' defaults, base_dim 96,
z_dim 16, dim_mult (1, 2, 4, 4), temporal downsampling (False, True, True)) and the real UMT5-XXL encoder
architecture (transformers ``UMT5EncoderModel``: d_model 4096, 24 layers, 64 heads of 64, d_ff 10240, vocab
256384), all with seeded random weights, so text encoding and decoding cost what they cost in a real run.

No file is read: the tokenizer is a stable hash of each word into the vocabulary (the encoder's cost depends on
the sequence length only, which is Wan's 512 padded tokens). Every part is built on the meta device and
materialised on the target device by ``policies.synthetic.materialize_`` (values seeded by parameter name), so a
6.7B-parameter encoder appears on a GPU in seconds. The size of every part is a parameter, so CPU tests run the
same code path at tiny sizes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from policies.base import Policy
from policies.synthetic import build_synthetic_policy, materialize_
from policies.text import WAN_TEXT_LENGTH, clean_prompt, zero_padded_states
from policies.vae import WanVAE

UMT5_XXL: dict[str, Any] = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
                                tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False)
WAN21_VAE: dict[str, Any] = {}
"""AutoencoderKLWan's defaults are Wan2.1's VAE; overrides shrink it for tests (e.g. ``base_dim=8``)."""


def _materialized(build, device: torch.device, seed: int) -> nn.Module:
    with torch.device("meta"):
        module = build()
    return materialize_(module, device, seed=seed)


class HashedTokenUMT5(nn.Module):
    """``prompts -> text_states_BLD`` through a UMT5 encoder, tokens drawn from a stable hash of each word (crc32:
    the same in every process), padded to ``max_length`` with id 0 and masked like the real tokenizer's output."""

    def __init__(self, encoder: nn.Module, *, max_length: int = WAN_TEXT_LENGTH) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        vocab = self.encoder.config.vocab_size
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            words = clean_prompt(prompt).split()[: self.max_length - 1]
            tokens = [2 + zlib.crc32(w.encode()) % (vocab - 2) for w in words] + [1]  # 1 = </s>, as T5
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        device = next(self.encoder.parameters()).device
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        ids_BL, mask_BL = self.tokenize(list(prompts))
        states_BLD = self.encoder(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        return zero_padded_states(states_BLD, mask_BL)


def build_umt5(device: str | torch.device = "cpu", *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               max_length: int = WAN_TEXT_LENGTH, **overrides: Any) -> HashedTokenUMT5:
    """UMT5-XXL's encoder (``overrides``: UMT5Config fields, e.g. ``d_model=32, num_layers=1`` in tests)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**{**UMT5_XXL, **overrides})
    encoder = _materialized(lambda: UMT5EncoderModel(config), torch.device(device), seed).to(dtype)
    return HashedTokenUMT5(encoder, max_length=max_length)


def build_wan_vae(device: str | torch.device = "cpu", *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                  latent_patch: int = 2, tiling: bool = False, **overrides: Any) -> WanVAE:
    """The Wan2.1 VAE (``overrides``: AutoencoderKLWan arguments; ``z_dim`` must match the transformer's
    channels)."""
    from diffusers import AutoencoderKLWan

    vae = _materialized(lambda: AutoencoderKLWan(**{**WAN21_VAE, **overrides}), torch.device(device), seed)
    return WanVAE(vae=vae.to(dtype), latent_patch=latent_patch, tiling=tiling).to(device)


def build_realsize_policy(*, preset: str = "wan2.1-t2v-1.3b", num_frames: int, height: int, width: int,
                          layout: str = "full", num_full_blocks: int = 8, sparse_ratio: int = 2,
                          dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0,
                          text_overrides: dict[str, Any] | None = None, vae_overrides: dict[str, Any] | None = None,
                          text_len: int = WAN_TEXT_LENGTH, transformer_overrides: dict[str, Any] | None = None) -> Policy:
    """The synthetic policy's transformer with the real-size VAE and text encoder (see the module docstring).

    ``transformer_overrides`` (OSPNextConfig fields) shrink the transformer for tests; its ``text_dim`` and
    ``in_channels`` must match the encoder's ``d_model`` and the VAE's ``z_dim``."""
    device = torch.device(device)
    policy = build_synthetic_policy(preset=preset, num_frames=num_frames, height=height, width=width, layout=layout,
                                    num_full_blocks=num_full_blocks, sparse_ratio=sparse_ratio, dtype=dtype,
                                    device="meta", seed=seed, overrides=transformer_overrides)
    transformer = materialize_(policy.transformer, device, seed=seed).to(dtype)
    text = build_umt5(device, dtype=dtype, seed=seed + 1, max_length=text_len, **(text_overrides or {}))
    vae = build_wan_vae(device, dtype=dtype, seed=seed + 2, latent_patch=transformer.config.patch_size[1],
                        **(vae_overrides or {}))
    config = transformer.config
    if text.dim != config.text_dim or vae.latent_channels != config.in_channels:
        raise ValueError(f"the text encoder's d_model ({text.dim}) and the VAE's z_dim ({vae.latent_channels}) must "
                         f"equal the transformer's text_dim ({config.text_dim}) and in_channels "
                         f"({config.in_channels}); change text_overrides / vae_overrides")
    return Policy(transformer=transformer, text_encoder=text, vae=vae, spec=policy.spec)


__all__ = ["HashedTokenUMT5", "UMT5_XXL", "WAN21_VAE", "build_realsize_policy", "build_umt5", "build_wan_vae"]
