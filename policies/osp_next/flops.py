"""Model FLOPs of an OSP-Next / Wan2.1 DiT, from its configuration and the token counts (pure functions).

Counted as a matmul-FLOP model (2 FLOPs per multiply-add), the convention MFU is quoted in: every linear and
convolution, and attention's two batched products (``q k^T`` and ``p v``: 4 * Nq * Nk * dim per sample). Element-
wise work (norms, RoPE, softmax, GELU, modulation) is not counted; it is a few per cent of the time and no FLOP
counter of the MFU convention counts it either.

What one forward of ``B`` samples on a patch grid ``(T, H, W)`` computes, per block (d = dim, f = ffn_dim,
L = text_len: the model zero-pads the text to ``text_len`` tokens and attends to all of them):

- full block, N = T*H*W tokens: linears ``2*N*d*(4d)`` (self-attention q, k, v, o) + ``2*N*d*(2d)``
  (cross-attention q, o) + ``2*L*d*(2d)`` (cross-attention k, v over the text) + ``2*N*d*f*2`` (FFN);
  self-attention ``4*N*N*d``; cross-attention ``4*N*L*d``.
- sparse (token / group) block, Skiparse k: the sequence is padded to N' (H, W rounded up to multiples of k*k)
  and split into P = k*k subsequences of N'/P tokens that attend among themselves, so self-attention costs
  ``P * 4*(N'/P)**2*d = 4*N'**2*d/P``; every linear runs on the N' padded tokens; the text states are repeated
  per subsequence by the model, so the cross-attention k, v projections run P times (counted: the GPU does it).

Plus the embeddings (patch convolution, text MLP over L tokens, timestep MLP and its 6-way projection) and the
head. ``forward_flops`` is exact for the matmuls and attention products the model runs (tests compare it with
``torch.utils.flop_counter.FlopCounterMode``).

Backward: 2x forward for every matmul (the gradient of the input and of the weight). With LoRA the base weights
take no gradient, so an update runs the forward plus the input-gradient pass only: 1x the linears (the cross-
attention k, v over the text and the embeddings take none: their inputs carry no gradient) but 2x attention
(dq, dk and dv all flow back to trained layers; with the default targets the cross-attention k, v projections
are adapted, so dk, dv of cross-attention are needed too). The adapters' own r-rank products are left out
(``2*r*(d_in+d_out)`` per token per adapted linear: ~1% at r=32, d=5120). Recomputation (activation
checkpointing) is not counted: these are model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from policies.osp_next.config import OSPNextConfig
from policies.osp_next.skiparse import padded_grid


@dataclass(frozen=True, kw_only=True)
class ForwardFlops:
    """One forward's FLOPs split by what the backward does with them (all per the whole batch)."""

    embed: int
    """Patch convolution, text and timestep MLPs: no input gradient in training."""
    linear: int
    """Linears of the blocks whose input carries a gradient, and the head."""
    text_kv: int
    """Cross-attention k, v projections of the text states (no input gradient)."""
    attention: int
    """Self- and cross-attention products (q k^T and p v)."""

    @property
    def total(self) -> int:
        return self.embed + self.linear + self.text_kv + self.attention


def patch_grid(config: OSPNextConfig, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent ``(T, H, W)`` -> patch grid, checked like the model checks it."""
    if len(latent_shape) != 3 or any(s % p for s, p in zip(latent_shape, config.patch_size)):
        raise ValueError(f"latent (T, H, W) = {tuple(latent_shape)} must be divisible by patch_size "
                         f"{config.patch_size}")
    return tuple(s // p for s, p in zip(latent_shape, config.patch_size))


def forward_breakdown(config: OSPNextConfig, grid: tuple[int, int, int], batch: int = 1) -> ForwardFlops:
    """FLOPs of one forward of ``batch`` samples on the patch ``grid`` ``(T, H, W)``."""
    if batch < 0 or min(grid) < 1:
        raise ValueError(f"batch must be >= 0 and grid positive, got batch={batch}, grid={grid}")
    d, f, L = config.dim, config.ffn_dim, config.text_len
    num_subseq = config.sparse_ratio ** 2
    full_tokens = math.prod(grid)
    sparse_tokens = math.prod(padded_grid(tuple(grid), config.sparse_ratio))
    patch = math.prod(config.patch_size)
    embed = 2 * (full_tokens * config.in_channels * patch * d          # patch convolution
                 + L * (config.text_dim * d + d * d)                     # text MLP
                 + config.freq_dim * d + d * d + d * 6 * d)              # timestep MLP + projection
    linear = 2 * full_tokens * d * config.out_channels * patch           # head
    text_kv = attention = 0
    for kind in config.block_kinds():
        tokens, copies = (full_tokens, 1) if kind == "full" else (sparse_tokens, num_subseq)
        linear += 2 * tokens * d * (4 * d + 2 * d + 2 * f)
        text_kv += copies * 2 * L * d * 2 * d
        attention += 4 * tokens * tokens * d // copies + 4 * tokens * L * d
    return ForwardFlops(embed=batch * embed, linear=batch * linear, text_kv=batch * text_kv,
                        attention=batch * attention)


def forward_flops(config: OSPNextConfig, grid: tuple[int, int, int], batch: int = 1) -> int:
    return forward_breakdown(config, grid, batch).total


def backward_flops(config: OSPNextConfig, grid: tuple[int, int, int], batch: int = 1, *, lora: bool) -> int:
    """Backward FLOPs: 2x forward (full fine-tuning) or the input-gradient pass (LoRA, see the module doc)."""
    parts = forward_breakdown(config, grid, batch)
    if not lora:
        return 2 * parts.total
    return parts.linear + 2 * parts.attention


def rollout_flops(config: OSPNextConfig, latent_shape: tuple[int, int, int], *, num_videos: int, num_steps: int,
                  cfg: bool) -> int:
    """A rollout: ``num_steps`` denoising steps of ``num_videos`` videos, two forwards per step with CFG."""
    grid = patch_grid(config, latent_shape)
    return forward_flops(config, grid) * num_videos * num_steps * (2 if cfg else 1)


def update_flops(config: OSPNextConfig, latent_shape: tuple[int, int, int], *, num_samples: int, trained_steps: int,
                 cfg: bool, lora: bool, reference_forward: bool) -> int:
    """An update: for every trained step of every sample, the forward with its backward (CFG: both branches are
    differentiated), plus a no-grad forward of the reference model when the loss has a KL term."""
    grid = patch_grid(config, latent_shape)
    forwards = num_samples * trained_steps * (2 if cfg else 1)
    per = forward_flops(config, grid)
    total = per + backward_flops(config, grid, lora=lora)
    if reference_forward:
        total += per
    return forwards * total


__all__ = ["ForwardFlops", "backward_flops", "forward_breakdown", "forward_flops", "patch_grid", "rollout_flops",
           "update_flops"]
