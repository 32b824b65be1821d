"""Ulysses sequence parallelism for attention (DeepSpeed-Ulysses).

Each of P ranks holds a contiguous shard of the sequence with every head. Before attention one all-to-all per
tensor (q, k, v) trades "my tokens, all heads" for "all tokens, my heads"; attention is then exact for those
heads; one all-to-all brings the output back to "my tokens, all heads". Four all-to-alls of a ``[B, N/P, C]``
tensor per attention, forward; the same four in backward (each all-to-all's adjoint is the reverse one).

Uneven shards are supported: pass ``seq_sizes`` (every rank's shard length, e.g. ``even_sizes(N, P)``); the
head count must divide by P.

Shapes legend: B batch, N_r tokens on this rank, N = sum of shards, H heads, D head dim; tensors are
``[B, N, H, D]`` (the flash-attn layout).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from policies.parallel.comm import ProcessGroup, all_to_all, group_rank, group_size

# attention(q_BNHD, k_BNHD, v_BNHD) -> o_BNHD, for the full sequence and a subset of heads.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def heads_to_sequence(
    x_BNHD: torch.Tensor, group: ProcessGroup, seq_sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """``[B, N_r, H, D] -> [B, N, H/P, D]``: gather the sequence, scatter the heads."""
    _check_heads(x_BNHD, group)
    return all_to_all(x_BNHD, group, scatter_dim=2, gather_dim=1, gather_sizes=seq_sizes)


def sequence_to_heads(
    x_BNHD: torch.Tensor, group: ProcessGroup, seq_sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """``[B, N, H/P, D] -> [B, N_r, H, D]``: the inverse of :func:`heads_to_sequence`."""
    return all_to_all(x_BNHD, group, scatter_dim=1, gather_dim=2, scatter_sizes=seq_sizes)


def ulysses_attention(
    q_BNHD: torch.Tensor,
    k_BNHD: torch.Tensor,
    v_BNHD: torch.Tensor,
    attention: AttentionFn,
    group: ProcessGroup,
    *,
    seq_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Exact attention over the whole sequence from sequence shards; returns this rank's output shard.

    Args:
        q_BNHD, k_BNHD, v_BNHD: this rank's tokens, all heads (RoPE already applied with global positions).
        attention: local attention on ``[B, N, H/P, D]``; close over any mask for the full sequence.
        seq_sizes: every rank's shard length (default: all equal to this rank's).
    """
    if group_size(group) == 1:
        return attention(q_BNHD, k_BNHD, v_BNHD)
    if seq_sizes is not None and seq_sizes[group_rank(group)] != q_BNHD.shape[1]:
        raise ValueError(
            f"seq_sizes[{group_rank(group)}]={seq_sizes[group_rank(group)]} must equal this rank's "
            f"sequence length {q_BNHD.shape[1]}"
        )
    q, k, v = (heads_to_sequence(t, group, seq_sizes) for t in (q_BNHD, k_BNHD, v_BNHD))
    return sequence_to_heads(attention(q, k, v), group, seq_sizes)


def _check_heads(x_BNHD: torch.Tensor, group: ProcessGroup) -> None:
    world = group_size(group)
    if x_BNHD.dim() != 4 or x_BNHD.shape[2] % world:
        raise ValueError(
            f"Ulysses needs [B, N, H, D] tensors with H divisible by the group size {world}; got "
            f"{tuple(x_BNHD.shape)}; choose ulysses_size among the divisors of the head count"
        )
