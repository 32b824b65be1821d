"""Sparse Sequence Parallelism (SSP) for Skiparse-2D blocks.

A Skiparse layout holds each video as k*k subsequences in the batch (``policies.osp_next.skiparse``). SSP gives
each of S ranks ``G = k*k / S`` whole subsequences, so attention, cross-attention and FFN of a sparse block need
no communication; only the token <-> group pattern switch between blocks exchanges data, with ONE all-to-all:

1. local rearrange: each held subsequence, on its own sub-grid (T, H/k, W/k), is token-rearranged with ratio k
   into k*k pieces; piece (p1, q1) of token subsequence (p2, q2) is the (p2, q2)-part of group subsequence
   (p1, q1) (and symmetrically for group -> token);
2. exchange: piece (p1, q1) goes to the rank that owns subsequence (p1, q1), in one all-to-all;
3. local reverse: each rank reassembles its subsequences from the k*k received pieces.

Per rank this moves the hidden state once, ``[G*B, N/(k*k), C]``, where Ulysses moves q, k, v and o (four
tensors of the same size): one quarter of the bytes, one collective instead of four.

SSP x Ulysses (S*U ranks, U > 1). Each subsequence is further split by *rows* over the U ranks of a Ulysses
group, and sparse-block attention runs Ulysses over those U ranks. A row is one (t, h // (k*k)) pair: k*k patch
rows of one frame. Both Skiparse layouts order a subsequence as (t, h // (k*k), ..., w, ...) with the row
outermost, and the switch above never moves data between rows, so it stays a single all-to-all over the S ranks
that hold the same rows. This is our choice in place of the release's 2-D spatial tiles (reference §3.5): the
same "local equivalence" (tiles that are multiples of k*k), cut along T and H only, so any U works and the split
is balanced to one row (720p: 21*12 = 252 rows). Uneven row splits use the uneven Ulysses all-to-all.

Shapes legend: B samples per rank, P = k*k, G = P / S subsequences per rank, grid (T, H, W) is the *padded*
patch grid (H, W multiples of k*k), rows = T*H/P, rows_u the rows this rank holds, n = rows_u*W tokens per
local subsequence, R any trailing dims (channels; nothing for masks).
"""

from __future__ import annotations

from typing import Sequence

import torch

from policies.osp_next.skiparse import crop_grid, pad_grid, padded_grid, skiparse_rearrange, skiparse_restore
from policies.parallel.comm import ProcessGroup, all_gather, all_to_all, group_rank, group_size


def num_rows(padded_grid: tuple[int, int, int], k: int) -> int:
    """Rows of a padded grid, one per (t, h // (k*k)): ``T * H / (k*k)``; each holds W tokens per subsequence."""
    return padded_grid[0] * padded_grid[1] // (k * k)


def row_shard(x: torch.Tensor, rows: int, sizes: Sequence[int], rank: int) -> torch.Tensor:
    """``[B', rows*W, ...] -> [B', rows_u*W, ...]``: this rank's rows (plain narrow; local backward)."""
    view = x.reshape(x.shape[0], rows, x.shape[1] // rows, *x.shape[2:])
    start = sum(sizes[:rank])
    return view.narrow(1, start, sizes[rank]).reshape(x.shape[0], -1, *x.shape[2:])


def row_gather(
    x: torch.Tensor, rows_per_rank: Sequence[int], group: ProcessGroup, *, grad: str = "sum"
) -> torch.Tensor:
    """Inverse of :func:`row_shard` over ``group``: ``[B', rows_u*W, ...] -> [B', rows*W, ...]``."""
    if group_size(group) == 1:
        return x
    mine = rows_per_rank[group_rank(group)]
    view = x.reshape(x.shape[0], mine, x.shape[1] // mine, *x.shape[2:])
    full = all_gather(view, group, dim=1, sizes=list(rows_per_rank), grad=grad)
    return full.reshape(x.shape[0], -1, *x.shape[2:])


def _split_pieces(x: torch.Tensor, rows: int, width: int, k: int, num_ranks: int) -> torch.Tensor:
    """Step 1. ``[G*B, rows_u*W, *R] -> [S, G(dst), G(src), B, rows_u, W/P, R]``.

    The token rearrangement (ratio k) of each local subsequence on its own sub-grid: the k*k pieces are indexed
    by the pattern's in-sequence pair (u, v), which is the *other* pattern's subsequence index, hence the owner.
    """
    p = k * k
    g = p // num_ranks
    b = x.shape[0] // g
    # Both layouts order a subsequence as (row, u, c, v), c = W/P (skiparse's module docstring).
    view = x.reshape(g, b, rows, k, width // p, k, -1)
    pieces = view.permute(3, 5, 0, 1, 2, 4, 6)  # [u, v, G, B, rows_u, c, R]
    return pieces.reshape(num_ranks, g, g, b, rows, width // p, view.shape[-1])


def _merge_pieces(received: torch.Tensor, rows: int, width: int, k: int, trailing: torch.Size) -> torch.Tensor:
    """Step 3. ``[G(own), P(source subsequence = new u, v), B, rows_u, W/P, R] -> [G*B, rows_u*W, *R]``."""
    p = k * k
    g, _, b = received.shape[:3]
    view = received.reshape(g, k, k, b, rows, width // p, received.shape[-1])
    out = view.permute(0, 3, 4, 1, 5, 2, 6)  # [G, B, rows_u, u, c, v, R]
    return out.reshape(g * b, rows * width, *trailing)


def ssp_switch(x: torch.Tensor, rows: int, width: int, k: int, group: ProcessGroup) -> torch.Tensor:
    """Token <-> group switch of SSP-sharded subsequences with one all-to-all over ``group`` (S ranks).

    Args:
        x: ``[G*B, rows*width, ...]``: this rank's subsequences ``[rank*G, (rank+1)*G)`` (batch order
            (subsequence, sample)), ``rows`` rows each, in one pattern; ``width`` = padded W (multiple of k*k).

    Returns:
        the same shape in the other pattern. The map is an involution, so its backward (the adjoint all-to-all
        between the adjoint permutations) is the switch itself.
    """
    s = group_size(group)
    p = k * k
    if p % s:
        raise ValueError(f"ssp_switch: group size {s} must divide k*k = {p}; use an ssp_size that divides {p}")
    if width % p:
        raise ValueError(f"ssp_switch: width {width} must be a multiple of k*k = {p}; pad the grid (pad_grid)")
    g = p // s
    if x.dim() < 2 or x.shape[0] % g or x.shape[1] != rows * width:
        raise ValueError(
            f"ssp_switch: x must be [G*B, rows*width, ...] = [{g}*B, {rows * width}, ...] for rows={rows}, "
            f"width={width}, k={k}, S={s}; got {tuple(x.shape)}"
        )
    pieces = _split_pieces(x, rows, width, k, s)
    # Scatter the destination dim, gather the sources into the subsequence dim: [1, G(own), S*G, B, ...].
    received = all_to_all(pieces.contiguous(), group, scatter_dim=0, gather_dim=2)
    return _merge_pieces(received[0], rows, width, k, x.shape[2:])


def ssp_shard_subsequences(x: torch.Tensor, k: int, rank: int, num_ranks: int) -> torch.Tensor:
    """``[P*B, ...] -> [G*B, ...]``: the subsequences this SSP rank owns (plain narrow; local backward)."""
    g = k * k // num_ranks
    b = x.shape[0] // (k * k)
    return x.narrow(0, rank * g * b, g * b)


def ssp_repeat(x: torch.Tensor, k: int, ssp_size: int) -> torch.Tensor:
    """Per-sample inputs (text states, modulation) ``[B, ...] -> [G*B, ...]``, matching the (p, b) batch order."""
    return x.repeat(k * k // ssp_size, *([1] * (x.dim() - 1)))


def ssp_enter(
    x: torch.Tensor, grid: tuple[int, int, int], pattern: str, k: int, *, ssp_rank: int, ssp_size: int,
    rows_per_rank: Sequence[int], ulysses_rank: int,
) -> torch.Tensor:
    """Full sequence (replicated) -> this rank's sparse shard.

    ``[B, T*H*W, ...]`` on the unpadded ``grid`` -> ``[G*B, rows_u*W', ...]``: pad H, W to multiples of k*k,
    rearrange to ``pattern``, keep this rank's subsequences and rows. Backward zero-pads: the input's gradient
    on this rank is its share of a sum over ranks.
    """
    padded, full = pad_grid(x, grid, k)
    sparse = skiparse_rearrange(padded, full, pattern, k)
    mine = ssp_shard_subsequences(sparse, k, ssp_rank, ssp_size)
    return row_shard(mine, num_rows(full, k), rows_per_rank, ulysses_rank)


def ssp_leave(
    x: torch.Tensor, grid: tuple[int, int, int], pattern: str, k: int, *, ssp_group: ProcessGroup,
    ulysses_group: ProcessGroup, rows_per_rank: Sequence[int], grad: str = "sum",
) -> torch.Tensor:
    """Inverse of :func:`ssp_enter`: gather rows (Ulysses group) and subsequences (SSP group), restore, crop.

    ``grad="sum"``: downstream gradients are per-rank partial sums (the next blocks are sharded again);
    ``grad="slice"``: they are replicated (the gathered tensor is the model output).
    """
    x = row_gather(x, rows_per_rank, ulysses_group, grad=grad)
    x = all_gather(x, ssp_group, dim=0, grad=grad)
    padded = padded_grid(grid, k)
    return crop_grid(skiparse_restore(x, padded, pattern, k), padded, grid)
