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

SSP x Ulysses (S*U ranks, U > 1). Each subsequence is further split by *frames* over the U ranks of a Ulysses
group, and sparse-block attention runs Ulysses over those U ranks. This is our choice instead of the release's
spatial tiles (reference §3.5): Skiparse never mixes frames, so every step of the switch above acts frame by
frame and stays a single all-to-all over the S ranks that hold the same frames; uneven frame splits (T=21 over
U=2) are handled by the uneven Ulysses all-to-all.

Shapes legend: B samples per rank, P = k*k, G = P / S subsequences per rank, grid (T, H, W) is the *padded*
patch grid (H, W multiples of k*k), T_u the frames this rank holds, n = T_u*H*W/P tokens per local
subsequence, R any trailing dims (channels; nothing for masks).
"""

from __future__ import annotations

from typing import Sequence

import torch

from policies.osp_next.skiparse import crop_grid, pad_grid, skiparse_rearrange, skiparse_restore
from policies.parallel.comm import ProcessGroup, all_gather, all_to_all, group_rank, group_size


def frame_shard(x: torch.Tensor, num_frames: int, sizes: Sequence[int], rank: int) -> torch.Tensor:
    """``[B', T*m, ...] -> [B', T_u*m, ...]``: this rank's frames (raster order puts t outermost)."""
    lead, seq = x.shape[0], x.shape[1]
    per_frame = seq // num_frames
    view = x.reshape(lead, num_frames, per_frame, *x.shape[2:])
    start = sum(sizes[:rank])
    return view.narrow(1, start, sizes[rank]).reshape(lead, sizes[rank] * per_frame, *x.shape[2:])


def frame_gather(
    x: torch.Tensor, frames_per_rank: Sequence[int], group: ProcessGroup, *, grad: str = "sum"
) -> torch.Tensor:
    """Inverse of :func:`frame_shard` over ``group``: ``[B', T_u*m, ...] -> [B', T*m, ...]``."""
    if group_size(group) == 1:
        return x
    rank = group_rank(group)
    per_frame = x.shape[1] // frames_per_rank[rank]
    view = x.reshape(x.shape[0], frames_per_rank[rank], per_frame, *x.shape[2:])
    full = all_gather(view, group, dim=1, sizes=list(frames_per_rank), grad=grad)
    return full.reshape(x.shape[0], sum(frames_per_rank) * per_frame, *x.shape[2:])


def _split_pieces(x: torch.Tensor, grid: tuple[int, int, int], k: int, num_ranks: int) -> torch.Tensor:
    """Step 1. ``[G*B, n, *R] -> [S, G(dst), G(src), B, T_u, a, c, R]``.

    Token-rearrange of each local subsequence on its sub-grid; the k*k pieces (outer index = the pattern's
    in-sequence (u, v) pair) are grouped by destination rank.
    """
    t, h, w = grid
    p = k * k
    g = p // num_ranks
    b = x.shape[0] // g
    # Local subsequence raster: (t, a, u, c, v) with a = H/P, c = W/P (see skiparse's module docstring).
    view = x.reshape(g, b, t, h // p, k, w // p, k, -1)
    pieces = view.permute(4, 6, 0, 1, 2, 3, 5, 7)  # [u, v, G, B, T_u, a, c, R]
    return pieces.reshape(num_ranks, g, g, b, t, h // p, w // p, view.shape[-1])


def _merge_pieces(
    received: torch.Tensor, grid: tuple[int, int, int], k: int, trailing: torch.Size
) -> torch.Tensor:
    """Step 3. ``[G(own), P(global src subsequence), B, T_u, a, c, R] -> [G*B, n, *R]``."""
    t, h, w = grid
    p = k * k
    g, _, b = received.shape[:3]
    view = received.reshape(g, k, k, b, t, h // p, w // p, received.shape[-1])
    out = view.permute(0, 3, 4, 5, 1, 6, 2, 7)  # [G, B, T_u, a, u, c, v, R]
    return out.reshape(g * b, t * h * w // p, *trailing)


def ssp_switch(x: torch.Tensor, grid: tuple[int, int, int], k: int, group: ProcessGroup) -> torch.Tensor:
    """Token <-> group switch of SSP-sharded subsequences with one all-to-all over ``group`` (S ranks).

    Args:
        x: ``[G*B, T_u*H*W/(k*k), ...]``: this rank's subsequences ``[rank*G, (rank+1)*G)`` (batch order
            (subsequence, sample)) in one pattern; ``grid = (T_u, H, W)`` with H, W multiples of k*k.

    Returns:
        the same shape, in the other pattern. The map is an involution, so its backward (composed of the
        adjoint all-to-all and the adjoint permutations) is the switch itself.
    """
    t, h, w = grid
    s = group_size(group)
    p = k * k
    if p % s:
        raise ValueError(f"ssp_switch: group size {s} must divide k*k = {p}; use ssp_size in a divisor of {p}")
    if h % p or w % p:
        raise ValueError(f"ssp_switch: grid {grid} must be padded so H and W are multiples of k*k = {p} (pad_grid)")
    g = p // s
    if x.dim() < 2 or x.shape[0] % g or x.shape[1] != t * h * w // p:
        raise ValueError(
            f"ssp_switch: x must be [G*B, T*H*W/(k*k), ...] = [{g}*B, {t * h * w // p}, ...] for grid {grid}, "
            f"k={k}, S={s}; got {tuple(x.shape)}"
        )
    pieces = _split_pieces(x, grid, k, s)
    # Scatter the destination dim, gather the sources into the subsequence dim: [1, G(own), S*G, B, ...].
    received = all_to_all(pieces.contiguous(), group, scatter_dim=0, gather_dim=2)
    return _merge_pieces(received[0], grid, k, x.shape[2:])


def ssp_shard_subsequences(x: torch.Tensor, k: int, rank: int, num_ranks: int) -> torch.Tensor:
    """``[P*B, ...] -> [G*B, ...]``: the subsequences this SSP rank owns (plain narrow; local backward)."""
    g = k * k // num_ranks
    b = x.shape[0] // (k * k)
    return x.narrow(0, rank * g * b, g * b)


def ssp_enter(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    pattern: str,
    k: int,
    *,
    ssp_rank: int,
    ssp_size: int,
    frames_per_rank: Sequence[int],
    ulysses_rank: int,
) -> torch.Tensor:
    """Full sequence (replicated) -> this rank's sparse shard.

    ``[B, T*H*W, ...]`` on the unpadded ``grid`` -> ``[G*B, T_u*H'*W'/(k*k), ...]``: pad H, W to multiples of
    k*k, rearrange to ``pattern``, keep this rank's subsequences and frames. Used for hidden states and for
    per-token side inputs (RoPE tables, masks), so they all land in the same layout. Backward zero-pads: the
    input's gradient on this rank is its share of a sum over ranks.
    """
    padded, full = pad_grid(x, grid, k)
    sparse = skiparse_rearrange(padded, full, pattern, k)
    mine = ssp_shard_subsequences(sparse, k, ssp_rank, ssp_size)
    return frame_shard(mine, full[0], frames_per_rank, ulysses_rank)


def ssp_repeat(x: torch.Tensor, k: int, ssp_size: int) -> torch.Tensor:
    """Per-sample inputs (text states, modulation) ``[B, ...] -> [G*B, ...]``, matching the (p, b) batch order."""
    return x.repeat(k * k // ssp_size, *([1] * (x.dim() - 1)))


def ssp_leave(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    pattern: str,
    k: int,
    *,
    ssp_group: ProcessGroup,
    ulysses_group: ProcessGroup,
    frames_per_rank: Sequence[int],
    grad: str = "sum",
) -> torch.Tensor:
    """Inverse of :func:`ssp_enter`: gather frames (Ulysses group) and subsequences (SSP group), restore, crop.

    ``grad="sum"``: downstream gradients are per-rank partial sums (the next blocks are sharded again);
    ``grad="slice"``: they are replicated (the gathered tensor is the model output).
    """
    x = frame_gather(x, frames_per_rank, ulysses_group, grad=grad)
    x = all_gather(x, ssp_group, dim=0, grad=grad)
    padded = (grid[0], *_padded_hw(grid, k))
    full = skiparse_restore(x, padded, pattern, k)
    return crop_grid(full, padded, grid)


def _padded_hw(grid: tuple[int, int, int], k: int) -> tuple[int, int]:
    block = k * k
    return -(-grid[1] // block) * block, -(-grid[2] // block) * block
