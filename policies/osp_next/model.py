"""OSP-Next: the Wan2.1 T2V DiT with a per-block attention kind ("full", "token" or "group").

Shapes legend: B batch, C channels (dim), N = T*H*W patch tokens, L text tokens, H heads, D head_dim, D2 = D/2,
P = k*k subsequences per sample, N' tokens after Skiparse padding.

Parameter names are Wan2.1's original ones (``wan/modules/model.py``), so original checkpoints load as they are;
``checkpoint.py`` maps diffusers' names. Numerics follow diffusers' ``WanTransformer3DModel``: LayerNorms,
modulation and residual adds in float32, timestep sinusoid in float32. Departures from the release: none in the
maths; RoPE runs in float32 (Wan: float64) and text states shorter than ``text_len`` are zero-padded inside the
model (Wan and diffusers' pipeline pad the same way outside it).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from policies.osp_next.attention import attention
from policies.osp_next.config import OSPNextConfig
from policies.osp_next.layout import SequencePlan, SparseGeometry, repeat_per_subsequence, sparse_position_tables
from policies.osp_next.rope import apply_rope, rope_angles, rope_tables

QKVHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed and returned in float32 whatever the parameter and input dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def timestep_sinusoid(timesteps_B: torch.Tensor, dim: int) -> torch.Tensor:
    """``[B] -> [B, dim]`` float32: [cos | sin] of t * 10000**(-i/(dim/2)) (Wan; float32 as diffusers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps_B.device) / half)
    angles = timesteps_B.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class SelfAttention(nn.Module):
    """Wan self-attention. ``qkv_hook`` (default None) sees ``q, k, v`` ``[B, N, H, D]`` after RoPE, right before
    the kernel, and returns replacements (e.g. fake quantization)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.qkv_hook: QKVHook | None = None

    def forward(self, x_BNC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                attend: Callable[..., torch.Tensor], key_mask: torch.Tensor | None) -> torch.Tensor:
        q = apply_rope(self.norm_q(self.q(x_BNC)).unflatten(-1, (self.num_heads, -1)), cos, sin)
        k = apply_rope(self.norm_k(self.k(x_BNC)).unflatten(-1, (self.num_heads, -1)), cos, sin)
        v = self.v(x_BNC).unflatten(-1, (self.num_heads, -1))
        if self.qkv_hook is not None:
            q, k, v = self.qkv_hook(q, k, v)
        return self.o(attend(q, k, v, key_mask=key_mask).flatten(2))


class CrossAttention(SelfAttention):
    """Wan T2V cross-attention to the text states (no RoPE, no key mask: padded text is attended, as in Wan)."""

    def forward(self, x_BNC: torch.Tensor, context_BLC: torch.Tensor, *, backend: str) -> torch.Tensor:
        q = self.norm_q(self.q(x_BNC)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(context_BLC)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context_BLC).unflatten(-1, (self.num_heads, -1))
        if self.qkv_hook is not None:
            q, k, v = self.qkv_hook(q, k, v)
        return self.o(attention(q, k, v, backend=backend).flatten(2))


class OSPNextBlock(nn.Module):
    """One Wan attention block; ``kind`` only says in which layout the model feeds it (the maths is identical)."""

    def __init__(self, config: OSPNextConfig, kind: str) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.kind = kind
        self.backend = config.attention_backend
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, config.qk_norm, eps)
        # Wan's names: norm3 is the (optional, affine) cross-attention norm, norm2 the FFN norm.
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x_BNC: torch.Tensor, context_BLC: torch.Tensor, e_B6C: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, key_mask: torch.Tensor | None, attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float() + e_B6C.float()).chunk(6, dim=1)
        # float32 modulation and residuals as diffusers; addcmul promotes to float32 in one pass over the activations.
        y = torch.addcmul(shift, self.norm1(x_BNC), 1 + scale).type_as(x_BNC)
        y = self.self_attn(y, cos, sin, attend=functools.partial(attend, backend=self.backend), key_mask=key_mask)
        x_BNC = torch.addcmul(x_BNC, y, gate).type_as(x_BNC)
        y = self.norm3(x_BNC).type_as(x_BNC)
        x_BNC = x_BNC + self.cross_attn(y, context_BLC, backend=self.backend)
        y = self.ffn(torch.addcmul(c_shift, self.norm2(x_BNC), 1 + c_scale).type_as(x_BNC))
        return torch.addcmul(x_BNC, y, c_gate).type_as(x_BNC)


class Head(nn.Module):
    def __init__(self, config: OSPNextConfig) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.out_channels * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x_BNC: torch.Tensor, e_BC: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e_BC.float()[:, None]).chunk(2, dim=1)
        return self.head(torch.addcmul(shift, self.norm(x_BNC), 1 + scale).type_as(x_BNC))


class OSPNext(nn.Module):
    """The OSP-Next / Wan2.1 T2V transformer: ``model(latents_BCTHW, timesteps_B, text_states_BLD) -> v_BCTHW``.

    ``sequence_plan`` (a :class:`SequencePlan`) owns every layout operation; ``gradient_checkpointing = True``
    recomputes each block in backward.
    """

    def __init__(self, config: OSPNextConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(OSPNextBlock(config, kind) for kind in config.block_kinds())
        self.head = Head(config)
        self.sequence_plan = SequencePlan()
        self.gradient_checkpointing = False
        self._tables: dict[tuple, Any] = {}

    # ---- checkpoints (implemented in checkpoint.py) ----
    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> "OSPNext":
        """Load a diffusers Wan2.1 folder, an original Wan2.1 / OSP-Next file, or our own folder; ``overrides``
        are OSPNextConfig fields, e.g. ``layout="dual_end", num_full_blocks=8, sparse_ratio=2``."""
        from policies.osp_next.checkpoint import load_pretrained

        return load_pretrained(cls, path, **overrides)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` (original Wan key names) atomically into ``path``."""
        from policies.osp_next.checkpoint import save_pretrained

        save_pretrained(self, path)

    def set_layout(self, layout: str | list[str], **fields: Any) -> None:
        """Switch the attention layout in place (same weights), e.g. ``set_layout("full")`` or
        ``set_layout("dual_end", num_full_blocks=8, sparse_ratio=2)``."""
        self.config = OSPNextConfig.from_dict(self.config.to_dict(), layout=layout, **fields)
        for block, kind in zip(self.blocks, self.config.block_kinds()):
            block.kind = kind
            block.backend = self.config.attention_backend
        self._tables = {}

    # ---- forward ----
    def patch_grid(self, latents_BCTHW: torch.Tensor) -> tuple[int, int, int]:
        if latents_BCTHW.dim() != 5 or latents_BCTHW.shape[1] != self.config.in_channels:
            raise ValueError(f"latents must be [B, {self.config.in_channels}, T, H, W], got "
                             f"{list(latents_BCTHW.shape)}")
        sizes = latents_BCTHW.shape[2:]
        if any(s % p for s, p in zip(sizes, self.config.patch_size)):
            raise ValueError(f"latent (T, H, W) = {tuple(sizes)} must be divisible by patch_size "
                             f"{self.config.patch_size}; crop or pad the latents")
        return tuple(s // p for s, p in zip(sizes, self.config.patch_size))

    def embed_text(self, text_states_BLD: torch.Tensor) -> torch.Tensor:
        """Zero-pad to ``text_len`` tokens (as Wan does) and project: ``[B, L, text_dim] -> [B, text_len, C]``."""
        cfg = self.config
        if text_states_BLD.dim() != 3 or text_states_BLD.shape[2] != cfg.text_dim:
            raise ValueError(f"text_states must be [B, L, {cfg.text_dim}], got {list(text_states_BLD.shape)}")
        if text_states_BLD.shape[1] > cfg.text_len:
            raise ValueError(f"text_states has {text_states_BLD.shape[1]} tokens, more than text_len="
                             f"{cfg.text_len}; truncate them or raise text_len")
        padded = F.pad(text_states_BLD, (0, 0, 0, cfg.text_len - text_states_BLD.shape[1]))
        return self.text_embedding(padded.to(self.text_embedding[0].weight.dtype))

    def forward(self, latents_BCTHW: torch.Tensor, timesteps_B: torch.Tensor,
                text_states_BLD: torch.Tensor) -> torch.Tensor:
        """Flow velocity ``[B, C_out, T, H, W]`` for latents at timesteps on Wan's 0..1000 scale."""
        grid = self.patch_grid(latents_BCTHW)
        batch = latents_BCTHW.shape[0]
        if timesteps_B.shape != (batch,):
            raise ValueError(f"timesteps must be [B] = [{batch}], got {list(timesteps_B.shape)}")
        if text_states_BLD.shape[0] != batch:
            raise ValueError(f"text_states batch {text_states_BLD.shape[0]} != latents batch {batch}")
        dtype = self.patch_embedding.weight.dtype
        x_BNC = self.patch_embedding(latents_BCTHW.to(dtype)).flatten(2).transpose(1, 2).contiguous()
        sinusoid = timestep_sinusoid(timesteps_B, self.config.freq_dim)
        e_BC = self.time_embedding(sinusoid.to(dtype))
        e_B6C = self.time_projection(e_BC).unflatten(1, (6, self.config.dim))
        context_BLC = self.embed_text(text_states_BLD)
        x_BNC = self._blocks(x_BNC, grid, context_BLC, e_B6C)
        x_BNC = self.sequence_plan.unshard_full(self.head(x_BNC, e_BC))
        return self.unpatchify(x_BNC, grid)

    def unpatchify(self, x_BNC: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        t, h, w = grid
        x = x_BNC.reshape(x_BNC.shape[0], t, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x_BNC.shape[0], -1, t * pt, h * ph, w * pw)

    def _position_tables(self, geometry: SparseGeometry, batch: int, device: torch.device) -> Any:
        """Full-block (cos, sin) ``[1, N, D2]`` and the sparse per-pattern tables and masks, cached per shape."""
        plan = self.sequence_plan
        kinds = tuple(block.kind for block in self.blocks)
        key = (geometry, batch, str(device), id(plan), kinds)
        if key not in self._tables:
            angles = rope_angles(geometry.grid, self.config.head_dim, max_seq_len=self.config.rope_max_seq_len)
            full = tuple(plan.shard_full(t) for t in rope_tables(angles[None], device=device))
            patterns = set(kinds) - {"full"}
            sparse = sparse_position_tables(plan, geometry, patterns, angles_ND2=angles, batch=batch, device=device)
            self._tables = {key: (full, *sparse)}
        return self._tables[key]

    def _blocks(self, x_BNC: torch.Tensor, grid: tuple[int, int, int], context_BLC: torch.Tensor,
                e_B6C: torch.Tensor) -> torch.Tensor:
        """Run every block, moving the activations between the full and the sparse layouts only at kind changes."""
        plan, k = self.sequence_plan, self.config.sparse_ratio
        geometry = SparseGeometry(grid=grid, k=k)
        (cos, sin), sparse_rope, sparse_mask = self._position_tables(geometry, x_BNC.shape[0], x_BNC.device)
        if any(block.kind != "full" for block in self.blocks):
            sparse_context = plan.shard_batch(repeat_per_subsequence(context_BLC, k))
            sparse_e = plan.shard_batch(repeat_per_subsequence(e_B6C, k))
        x = plan.shard_full(x_BNC)
        layout = "full"
        recompute = self.gradient_checkpointing  # a bool, or the set of block indices to recompute
        for index, block in enumerate(self.blocks):
            if block.kind == "full":
                if layout != "full":
                    x = plan.shard_full(plan.leave_sparse(x, geometry, layout))
                args = (context_BLC, e_B6C, cos, sin, None, plan.full_attention)
            else:
                if layout == "full":
                    x = plan.enter_sparse(plan.unshard_full(x), geometry, block.kind)
                else:
                    x = plan.switch(x, geometry, layout, block.kind)
                args = (sparse_context, sparse_e, *sparse_rope[block.kind], sparse_mask[block.kind],
                        plan.sparse_attention)
            layout = block.kind
            if (recompute is True or (not isinstance(recompute, bool) and index in recompute)) and torch.is_grad_enabled():
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        if layout != "full":
            x = plan.shard_full(plan.leave_sparse(x, geometry, layout))
        return x
