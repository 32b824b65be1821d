"""Attention kernels: flash-attn (FA3, then FA2) -> torch SDPA -> plain math reference.

Shapes legend: B batch, Nq / Nk query / key tokens, H heads, D head_dim.

All backends take ``q, k, v`` as ``[B, N, H, D]`` and an optional ``key_mask`` ``[B, Nk]`` (True = valid key)
and return ``[B, Nq, H, D]``. Skiparse padding is the only source of masks; a row whose keys are all padding
(possible only when a whole subsequence is padding, i.e. a tiny grid) attends to every key instead, so it stays
finite; its queries are padding too and are cropped away, so this changes no valid output.
"""

from __future__ import annotations

import importlib
import math
from functools import lru_cache
from types import ModuleType

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "math")


@lru_cache(maxsize=1)
def _flash_module() -> ModuleType | None:
    """flash_attn_interface (FA3, Hopper) if importable, else flash_attn (FA2), else None."""
    for name in ("flash_attn_interface", "flash_attn"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def flash_available() -> bool:
    return _flash_module() is not None


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """Which kernel "auto" means for these inputs (flash needs CUDA and fp16/bf16)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_available():
        return "flash"
    return "sdpa"


def _safe_key_mask(key_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    if key_mask is None:
        return None
    if key_mask.shape != (k.shape[0], k.shape[1]) or key_mask.dtype != torch.bool:
        raise ValueError(f"key_mask must be bool [B, Nk] = {[k.shape[0], k.shape[1]]}, got "
                         f"{key_mask.dtype} {list(key_mask.shape)}")
    return key_mask | ~key_mask.any(dim=1, keepdim=True)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(D) + mask) v, written out."""
    scores_BHQK = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores_BHQK = scores_BHQK.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores_BHQK.softmax(dim=-1), v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """flash-attn; with a key mask the keys are packed (varlen) so padded keys are never read."""
    module = _flash_module()
    if module is None:
        raise ValueError("attention backend 'flash' needs flash_attn_interface (FA3) or flash_attn (FA2) installed; "
                         "install one or use backend='sdpa'")
    if key_mask is None:
        out = module.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    batch, num_q = q.shape[:2]
    k_lens = key_mask.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (batch + 1) * num_q, num_q, dtype=torch.int32, device=q.device)
    keep = key_mask.reshape(-1)
    out = module.flash_attn_varlen_func(
        q.reshape(batch * num_q, *q.shape[2:]), k.reshape(-1, *k.shape[2:])[keep], v.reshape(-1, *v.shape[2:])[keep],
        cu_q, cu_k, num_q, int(k_lens.max()),
    )
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(q.shape[:-1] + v.shape[-1:])


_KERNELS = {"flash": flash_attention, "sdpa": sdpa_attention, "math": math_attention}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              key_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head attention without projections.

    Args:
        q: ``[B, Nq, H, D]``; k, v: ``[B, Nk, H, D]``.
        key_mask: ``[B, Nk]`` bool, True = valid key; None = all valid.
        backend: "auto", "flash", "sdpa" or "math".

    Returns:
        ``[B, Nq, H, D]``.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k, v must be [B, N, H, D] with matching B, H, D; got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    return _KERNELS[resolve_backend(backend, q)](q, k, v, _safe_key_mask(key_mask, q, k))
