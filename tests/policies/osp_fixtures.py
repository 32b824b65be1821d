"""Shared tiny-model helpers for the OSP-Next tests (not a test module)."""

import torch
from diffusers import WanTransformer3DModel

TINY_DIFFUSERS = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                      out_channels=4, text_dim=16, freq_dim=16, ffn_dim=48, rope_max_seq_len=64)
TEXT_LEN = 8


def tiny_diffusers_wan(num_layers: int = 4, seed: int = 0) -> WanTransformer3DModel:
    """A random diffusers Wan transformer whose weights are all O(0.2), so every norm / gate matters."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(num_layers=num_layers, **TINY_DIFFUSERS).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def tiny_inputs(batch: int = 2, frames: int = 2, height: int = 8, width: int = 8, text_tokens: int = 5, seed: int = 1):
    """(latents [B, 4, T, H, W], timesteps [B] on 0..1000, text states [B, L, 16])."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, frames, height, width, generator=g)
    timesteps = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, text_tokens, 16, generator=g)
    return latents, timesteps, text


def pad_text(text: torch.Tensor) -> torch.Tensor:
    """What diffusers' Wan pipeline feeds its transformer: text states zero-padded to text_len."""
    return torch.nn.functional.pad(text, (0, 0, 0, TEXT_LEN - text.shape[1]))
