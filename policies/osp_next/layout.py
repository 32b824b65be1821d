"""Where tokens live during an OSP-Next forward: the sequence plan and the sparse-layout inputs.

Shapes legend: B batch, N = T*H*W tokens, N' = T*H'*W' after padding H, W to multiples of k*k, P = k*k,
C channels, L text tokens, D2 = head_dim/2.

Every layout operation of :class:`policies.osp_next.model.OSPNext` goes through ``model.sequence_plan``, an
instance of :class:`SequencePlan` (or a subclass). Sequence-parallel plans (Ulysses, SSP) override its methods;
the model code never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policies.osp_next.attention import attention
from policies.osp_next.rope import rope_tables
from policies.osp_next.skiparse import (
    crop_grid,
    pad_grid,
    padded_grid,
    skiparse_rearrange,
    skiparse_restore,
    skiparse_switch,
    valid_mask,
)


@dataclass(frozen=True)
class SparseGeometry:
    """The patch grid of one forward and its Skiparse padding."""

    grid: tuple[int, int, int]
    k: int

    @property
    def padded_grid(self) -> tuple[int, int, int]:
        return padded_grid(self.grid, self.k)

    @property
    def needs_padding(self) -> bool:
        return self.padded_grid != tuple(self.grid)


class SequencePlan:
    """Single-device plan; the interface sequence-parallel plans override.

    Full blocks work on ``shard_full(x_BNC)``, a slice of the token axis (the whole sequence here; Ulysses keeps
    N/G tokens per rank). Sparse blocks work on ``[P*B, N'/P, C]`` subsequences (all of them here; SSP keeps a
    contiguous slice of the batch axis). The model calls, in order:

    - ``shard_full(t)`` / ``unshard_full(t)``: full sequence <-> this rank's tokens, for hidden states ``[B, N, C]``
      and the full-block RoPE tables ``[1, N, D2]`` (token axis 1);
    - ``full_attention(q, k, v, key_mask=, backend=)``: the kernel of a full block on ``[B, N_local, H, D]``
      (Ulysses: all-to-all heads <-> sequence around the kernel);
    - ``enter_sparse(x_BNC, geometry, pattern)``: full unsharded sequence -> pad + rearrange + ``shard_batch``;
    - ``switch(x, geometry, from_pattern, to_pattern)``: token <-> group on this rank's subsequences (SSP: the one
      all-to-all);
    - ``sparse_attention(q, k, v, key_mask=, backend=)``: the kernel of a sparse block on ``[P*B_local, N'/P, H, D]``;
    - ``leave_sparse(x, geometry, pattern)``: ``unshard_batch`` + restore + crop -> full unsharded ``[B, N, C]``;
    - ``shard_batch(t)`` / ``unshard_batch(t)``: the same batch slicing for every per-subsequence tensor (hidden
      states, repeated text states ``[P*B, L, C]`` and modulation ``[P*B, 6, C]``, RoPE tables ``[P*B, N'/P, D2]``,
      key masks ``[P*B, N'/P]``), all in (p, q, b) batch order.
    """

    def shard_full(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unshard_full(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def shard_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unshard_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def full_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       key_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
        return attention(q, k, v, key_mask=key_mask, backend=backend)

    def sparse_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                         key_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
        return attention(q, k, v, key_mask=key_mask, backend=backend)

    def enter_sparse(self, x_BNC: torch.Tensor, geometry: SparseGeometry, pattern: str) -> torch.Tensor:
        x_padded, grid = pad_grid(x_BNC, geometry.grid, geometry.k)
        return self.shard_batch(skiparse_rearrange(x_padded, grid, pattern, geometry.k))

    def switch(self, x: torch.Tensor, geometry: SparseGeometry, from_pattern: str, to_pattern: str) -> torch.Tensor:
        return skiparse_switch(x, geometry.padded_grid, from_pattern, to_pattern, geometry.k)

    def leave_sparse(self, x: torch.Tensor, geometry: SparseGeometry, pattern: str) -> torch.Tensor:
        full = skiparse_restore(self.unshard_batch(x), geometry.padded_grid, pattern, geometry.k)
        return crop_grid(full, geometry.padded_grid, geometry.grid)


def repeat_per_subsequence(x_B: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, ...] -> [k*k*B, ...]`` in (p, q, b) order: every subsequence of sample b sees sample b's tensor."""
    return x_B.repeat(k * k, *([1] * (x_B.dim() - 1)))


def sparse_position_tables(
    plan: SequencePlan, geometry: SparseGeometry, patterns: set[str], *, angles_ND2: torch.Tensor, batch: int,
    device: torch.device,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor | None]]:
    """RoPE tables and padding masks of the sparse blocks: the angles and the valid-token mask are padded and
    rearranged exactly like the tokens, so each token keeps its global position (padding: angle 0, masked).

    Returns:
        (pattern -> (cos, sin) each ``[P*B, N'/P, D2]``, pattern -> key mask ``[P*B, N'/P]`` or None), sharded.
    """
    k = geometry.k
    angles, grid = pad_grid(angles_ND2[None], geometry.grid, k)
    mask = valid_mask(geometry.grid, k, device=device)[None] if geometry.needs_padding else None
    rope, key_mask = {}, {}
    for pattern in sorted(patterns):
        angles_P = skiparse_rearrange(angles, grid, pattern, k).repeat_interleave(batch, dim=0)
        cos, sin = rope_tables(angles_P, device=device)
        rope[pattern] = (plan.shard_batch(cos), plan.shard_batch(sin))
        key_mask[pattern] = None if mask is None else plan.shard_batch(
            skiparse_rearrange(mask, grid, pattern, k).repeat_interleave(batch, dim=0))
    return rope, key_mask
