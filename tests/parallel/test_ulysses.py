"""Ulysses attention on sequence shards equals attention on the whole sequence (forward and backward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from policies.parallel.comm import even_sizes, record_comm, shard
from policies.parallel.ulysses import ulysses_attention
from tests.parallel.sp_harness import run_ranks

pytestmark = pytest.mark.dist


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _check(rank: int, world: int) -> None:
    batch, heads, dim = 2, 2 * world, 8
    for seq in (4 * world, 4 * world + 3):  # even and uneven shards
        sizes = even_sizes(seq, world)
        gen = torch.Generator().manual_seed(3)
        qkv = [torch.randn(batch, seq, heads, dim, generator=gen).requires_grad_() for _ in range(3)]
        weight = torch.randn(batch, seq, heads, dim, generator=gen)
        ref = _sdpa(*qkv)
        torch.sum(ref * weight).backward()
        mine = [shard(t.detach(), 1, sizes, rank).requires_grad_() for t in qkv]
        with record_comm() as log:
            out = ulysses_attention(*mine, _sdpa, None, seq_sizes=sizes)
            torch.sum(out * shard(weight, 1, sizes, rank)).backward()
        # Same per-head maths on the same numbers; only SDPA's blocking could reorder fp32 sums.
        torch.testing.assert_close(out, shard(ref, 1, sizes, rank), rtol=1e-5, atol=1e-6)
        for t, r in zip(mine, qkv):
            torch.testing.assert_close(t.grad, shard(r.grad, 1, sizes, rank), rtol=1e-5, atol=1e-6)
        assert log.calls("all_to_all", direction="forward") == 4
        assert log.calls("all_to_all", direction="backward") == 4


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_matches_full_attention(world):
    run_ranks(_check, world)
