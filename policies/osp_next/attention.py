"""Attention kernels: flash-attn (FA3, then FA2) -> torch varlen flash (masked) -> torch SDPA -> math reference.

Shapes legend: B batch, Nq / Nk query / key tokens, H heads, D head_dim.

All backends take ``q, k, v`` as ``[B, N, H, D]`` and an optional ``key_mask`` ``[B, Nk]`` (True = valid key)
and return ``[B, Nq, H, D]``. Skiparse padding is the only source of masks; a row whose keys are all padding
(possible only when a whole subsequence is padding, i.e. a tiny grid) attends to every key instead, so it stays
finite; its queries are padding too and are cropped away, so this changes no valid output.

With a mask, the flash backends pack the valid keys (varlen) instead of masking: SDPA's flash kernel takes no mask
and its masked fallback is about half as fast on H100.
"""

from __future__ import annotations

import importlib
import math
from functools import lru_cache
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "varlen", "sdpa", "math")


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


@lru_cache(maxsize=1)
def _torch_varlen() -> Callable[..., torch.Tensor] | None:
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.9, CUDA flash kernel) if present."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def resolve_backend(backend: str, q: torch.Tensor, masked: bool = False) -> str:
    """Which kernel "auto" means: flash-attn on CUDA half precision if installed; else torch's varlen flash kernel
    for masked calls, SDPA otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if flash_available():
            return "flash"
        if masked and _torch_varlen() is not None:
            return "varlen"
    return "sdpa"


def _check_key_mask(key_mask: torch.Tensor | None, k: torch.Tensor) -> None:
    if key_mask is not None and (key_mask.shape != (k.shape[0], k.shape[1]) or key_mask.dtype != torch.bool):
        raise ValueError(f"key_mask must be bool [B, Nk] = {[k.shape[0], k.shape[1]]}, got "
                         f"{key_mask.dtype} {list(key_mask.shape)}")


def _fill_empty_rows(key_mask: torch.Tensor) -> torch.Tensor:
    """Rows with no valid key attend to all keys (see the module docstring)."""
    return key_mask | ~key_mask.any(dim=1, keepdim=True)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(D) + mask) v, written out."""
    scores_BHQK = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores_BHQK = scores_BHQK.masked_fill(~_fill_empty_rows(key_mask)[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores_BHQK.softmax(dim=-1), v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = None if key_mask is None else _fill_empty_rows(key_mask)[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class _KeyPacking:
    """Indices of the valid keys and their cumulative lengths, cached per mask tensor: the model keeps its masks
    for the whole run, and computing them needs a device sync (nonzero)."""

    def __init__(self) -> None:
        self._entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for mask, index, cu_k in self._entries:
            if mask is key_mask:
                return index, cu_k
        filled = _fill_empty_rows(key_mask)
        index = filled.reshape(-1).nonzero().squeeze(1)
        cu_k = F.pad(filled.sum(dim=1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        self._entries = [(key_mask, index, cu_k)] + self._entries[:7]
        return index, cu_k


_key_packing = _KeyPacking()


def _packed_attention(kernel: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_mask: torch.Tensor | None) -> torch.Tensor:
    """Call a varlen kernel ``(q, k, v, cu_q, cu_k, max_q, max_k)`` with only the valid keys packed."""
    batch, num_q, num_k = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * num_q, num_q, dtype=torch.int32, device=q.device)
    keys, values = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    if key_mask is None:
        cu_k = torch.arange(0, (batch + 1) * num_k, num_k, dtype=torch.int32, device=q.device)
    else:
        index, cu_k = _key_packing(key_mask)
        keys, values = keys.index_select(0, index), values.index_select(0, index)
    # num_k bounds every packed length; passing the bound avoids a device sync.
    out = kernel(q.reshape(batch * num_q, *q.shape[2:]), keys, values, cu_q, cu_k, num_q, num_k)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(q.shape[:-1] + v.shape[-1:])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """flash-attn package (FA3 or FA2); masked calls go through its varlen kernel."""
    module = _flash_module()
    if module is None:
        raise ValueError("attention backend 'flash' needs flash_attn_interface (FA3) or flash_attn (FA2) installed; "
                         "install one or use backend='sdpa'")
    if key_mask is None:
        out = module.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    return _packed_attention(module.flash_attn_varlen_func, q, k, v, key_mask)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch's own varlen flash kernel (CUDA, fp16/bf16)."""
    kernel = _torch_varlen()
    if kernel is None:
        raise ValueError("attention backend 'varlen' needs torch >= 2.9 (torch.nn.attention.varlen); "
                         "upgrade torch or use backend='sdpa'")
    return _packed_attention(kernel, q, k, v, key_mask)


_KERNELS = {"flash": flash_attention, "varlen": varlen_attention, "sdpa": sdpa_attention, "math": math_attention}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              key_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head attention without projections.

    Args:
        q: ``[B, Nq, H, D]``; k, v: ``[B, Nk, H, D]``.
        key_mask: ``[B, Nk]`` bool, True = valid key; None = all valid.
        backend: "auto", "flash", "varlen", "sdpa" or "math".

    Returns:
        ``[B, Nq, H, D]``.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k, v must be [B, N, H, D] with matching B, H, D; got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    _check_key_mask(key_mask, k)
    return _KERNELS[resolve_backend(backend, q, masked=key_mask is not None)](q, k, v, key_mask)
