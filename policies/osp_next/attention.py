"""Attention kernels: flash-attn (FA3, then FA2) -> torch SDPA -> math reference; torch's varlen flash on request.

Shapes legend: B batch, Nq / Nk query / key tokens, H heads, D head_dim.

All backends take ``q, k, v`` as ``[B, N, H, D]`` and an optional ``key_mask`` ``[B, Nk]`` (True = valid key)
and return ``[B, Nq, H, D]``. Skiparse padding is the only source of masks; a row whose keys are all padding
(possible only when a whole subsequence is padding, i.e. a tiny grid) attends to every key instead, so it stays
finite; its queries are padding too and are cropped away, so this changes no valid output.

Masks are never handed to a kernel: SDPA's fast kernels (cuDNN, flash) take none, and its masked fallback was 1.4x
slower on H100 (experiments/bench/RESULTS.md). The flash backends pack the valid keys (varlen); SDPA groups the batch rows by their number of
valid keys (Skiparse padding gives at most k*k distinct counts) and runs one unmasked call per group on the
gathered valid keys. Both are exact: a masked key has weight 0 in the masked softmax.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any, Callable

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "varlen", "sdpa", "math")


def _import_flash() -> ModuleType | None:
    """flash_attn_interface (FA3, Hopper) if importable, else flash_attn (FA2), else None."""
    for name in ("flash_attn_interface", "flash_attn"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _import_torch_varlen() -> Callable[..., torch.Tensor] | None:
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.9, CUDA flash kernel) if present."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


# Resolved once at import: plain module constants keep torch.compile from tracing import machinery.
_FLASH = _import_flash()
_TORCH_VARLEN = _import_torch_varlen()


def flash_available() -> bool:
    return _FLASH is not None


def resolve_backend(backend: str, q: torch.Tensor, masked: bool = False) -> str:
    """Which kernel "auto" means: flash-attn on CUDA half precision if installed, else SDPA. (torch's varlen flash
    kernel, "varlen", measured slower than SDPA's cuDNN kernel on H100; see experiments/bench/RESULTS.md.)"""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if flash_available():
            return "flash"
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


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class _MaskCache:
    """Index tensors derived from a key mask, cached per mask object: the model keeps its masks for the whole run,
    and deriving them needs a device sync (nonzero, tolist). Kept out of torch.compile graphs."""

    def __init__(self) -> None:
        self._entries: list[tuple[torch.Tensor, str, Any]] = []

    @torch.compiler.disable
    def __call__(self, key_mask: torch.Tensor, kind: str) -> Any:
        for mask, entry_kind, value in self._entries:
            if mask is key_mask and entry_kind == kind:
                return value
        value = _DERIVE[kind](_fill_empty_rows(key_mask))
        self._entries = [(key_mask, kind, value)] + self._entries[:7]
        return value


def _key_groups(mask: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int]], torch.Tensor | None]:
    """Rows grouped by valid-key count: [(rows [G], flat key index [G*count], count)], and the permutation that
    puts the concatenated group outputs back in row order (None when there is one group of all rows)."""
    counts = mask.sum(dim=1)
    groups = []
    for count in sorted(set(counts.tolist())):
        rows = (counts == count).nonzero().squeeze(1)
        positions = mask[rows].nonzero()[:, 1].view(len(rows), count)
        groups.append((rows, (rows[:, None] * mask.shape[1] + positions).reshape(-1), count))
    if len(groups) == 1:
        return groups, None
    return groups, torch.cat([rows for rows, _, _ in groups]).argsort()


def _key_packing(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat index of the valid keys and their cumulative lengths (varlen kernels)."""
    cu_k = F.pad(mask.sum(dim=1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return mask.reshape(-1).nonzero().squeeze(1), cu_k


_DERIVE = {"groups": _key_groups, "packing": _key_packing}
_mask_cache = _MaskCache()


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA; with a mask, one unmasked call per group of rows with equally many valid keys."""
    if key_mask is None:
        return _sdpa(q, k, v)
    groups, order = _mask_cache(key_mask, "groups")
    keys, values = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    outs = []
    for rows, flat_keys, count in groups:
        shape = (len(rows), count, *k.shape[2:])
        q_rows = q if order is None else q.index_select(0, rows)
        outs.append(_sdpa(q_rows, keys.index_select(0, flat_keys).view(shape),
                          values.index_select(0, flat_keys).view(shape)))
    return outs[0] if order is None else torch.cat(outs).index_select(0, order)


def _packed_attention(kernel: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_mask: torch.Tensor | None) -> torch.Tensor:
    """Call a varlen kernel ``(q, k, v, cu_q, cu_k, max_q, max_k)`` with only the valid keys packed."""
    batch, num_q, num_k = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * num_q, num_q, dtype=torch.int32, device=q.device)
    keys, values = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    if key_mask is None:
        cu_k = torch.arange(0, (batch + 1) * num_k, num_k, dtype=torch.int32, device=q.device)
    else:
        index, cu_k = _mask_cache(key_mask, "packing")
        keys, values = keys.index_select(0, index), values.index_select(0, index)
    # num_k bounds every packed length; passing the bound avoids a device sync.
    out = kernel(q.reshape(batch * num_q, *q.shape[2:]), keys, values, cu_q, cu_k, num_q, num_k)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(q.shape[:-1] + v.shape[-1:])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """flash-attn package (FA3 or FA2); masked calls go through its varlen kernel."""
    module = _FLASH
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
    kernel = _TORCH_VARLEN
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
