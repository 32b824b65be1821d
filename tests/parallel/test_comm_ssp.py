"""Autograd collectives, accounting and the SSP switch against single-process references (2 and 4 gloo ranks).

Every reference below is the same computation done on one process with all ranks' tensors, so forward values
and gradients must match bit-for-bit (the collectives only move data; sums of two or four fp32 terms could
round differently, hence allclose with a tight tolerance only where a reduction happens).
"""

from __future__ import annotations

import pytest
import torch

from policies.osp_next.skiparse import skiparse_rearrange, skiparse_switch
from policies.parallel.comm import (
    all_gather,
    all_to_all,
    comm_scope,
    even_sizes,
    record_comm,
    reduce_scatter,
    scatter,
    shard,
)
from policies.parallel.groups import SequenceParallelSizes, build_groups
from policies.parallel.ssp import num_rows, row_shard, ssp_shard_subsequences, ssp_switch
from tests.parallel.sp_harness import run_ranks

pytestmark = pytest.mark.dist


def _inputs(world: int, shape_of, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape_of(r), generator=gen) for r in range(world)]


def _check_collectives(rank: int, world: int) -> None:
    uneven = even_sizes(2 * world + 1, world)  # e.g. [3, 2] or [3, 2, 2, 2]
    # all_to_all, even and uneven gather sizes: out_r = cat_i(split(X_i, scatter)[r]) along the gather dim.
    for gather_sizes in (None, uneven):
        lens = gather_sizes or [3] * world
        xs = [x.requires_grad_() for x in _inputs(world, lambda r: (2, lens[r], 2 * world), seed=1)]
        ref = [torch.cat([x.chunk(world, dim=2)[r] for x in xs], dim=1) for r in range(world)]
        ws = _inputs(world, lambda r: ref[r].shape, seed=2)
        sum(torch.sum(o * w) for o, w in zip(ref, ws)).backward()
        x = xs[rank].detach().clone().requires_grad_()
        out = all_to_all(x, None, scatter_dim=2, gather_dim=1, gather_sizes=gather_sizes)
        assert torch.equal(out, ref[rank])
        torch.sum(out * ws[rank]).backward()
        assert torch.equal(x.grad, xs[rank].grad)
    # all_gather: grad="sum" (downstream grads are partial sums -> reduce-scatter) and "slice" (replicated).
    for sizes in (None, uneven):
        lens = sizes or [2] * world
        xs = [x.requires_grad_() for x in _inputs(world, lambda r: (lens[r], 3), seed=3)]
        full = torch.cat(xs)
        ws = _inputs(world, lambda r: full.shape, seed=4)
        sum(torch.sum(full * w) for w in ws).backward()
        x = xs[rank].detach().clone().requires_grad_()
        out = all_gather(x, None, dim=0, sizes=sizes, grad="sum")
        assert torch.equal(out, full)
        torch.sum(out * ws[rank]).backward()
        torch.testing.assert_close(x.grad, xs[rank].grad, rtol=1e-6, atol=1e-6)
        x.grad = None
        torch.sum(all_gather(x, None, dim=0, sizes=sizes, grad="slice") * ws[0]).backward()
        assert torch.equal(x.grad, shard(ws[0], 0, lens, rank))
    # scatter (replicated in, backward all-gathers) and reduce_scatter (backward all-gathers).
    for sizes in (None, uneven):
        lens = sizes or [2] * world
        xfull = _inputs(1, lambda r: (sum(lens), 3), seed=5)[0].requires_grad_()
        ws = _inputs(world, lambda r: (lens[r], 3), seed=6)
        out = scatter(xfull, None, dim=0, sizes=sizes)
        assert torch.equal(out, shard(xfull, 0, lens, rank))
        torch.sum(out * ws[rank]).backward()
        assert torch.equal(xfull.grad, torch.cat(ws))
        xs = [x.requires_grad_() for x in _inputs(world, lambda r: (sum(lens), 3), seed=7)]
        ref = shard(sum(xs), 0, lens, rank)
        x = xs[rank].detach().clone().requires_grad_()
        out = reduce_scatter(x, None, dim=0, sizes=sizes)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.sum(out * ws[rank]).backward()
        assert torch.equal(x.grad, torch.cat(ws))


def _check_accounting(rank: int, world: int) -> None:
    x = torch.randn(4 * world, 3, requires_grad=True)  # fp32: 48 * world bytes
    with record_comm() as log:
        with comm_scope("block.7"):
            out = all_to_all(x, None, scatter_dim=0, gather_dim=1)
            gathered = all_gather(torch.ones(2, requires_grad=True), None, dim=0)
        (out.sum() + gathered.sum()).backward()
    payload = 48 * world
    assert log.calls("all_to_all", "block.7", "forward") == 1
    assert log.calls("all_to_all", "block.7", "backward") == 1
    assert log.payload_bytes("all_to_all", "block.7", "forward") == payload
    assert log.wire_bytes("all_to_all", "block.7", "forward") == payload * (world - 1) // world
    assert log.wire_bytes("all_to_all", "block.7", "backward") == payload * (world - 1) // world
    assert log.wire_bytes("all_gather", "block.7", "forward") == 8 * (world - 1)
    assert log.calls("reduce_scatter", "block.7", "backward") == 1
    assert log.calls(scope="block.", prefix=True) == 4 and log.calls(scope="block.8") == 0
    # Outside record_comm nothing is recorded.
    all_to_all(x, None, scatter_dim=0, gather_dim=1)
    assert log.calls() == 4


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_match_single_process(world):
    run_ranks(_check_collectives_and_accounting, world)


def _check_collectives_and_accounting(rank: int, world: int) -> None:
    _check_collectives(rank, world)
    _check_accounting(rank, world)


def _check_switch(rank: int, world: int, ulysses: int) -> None:
    k, batch, channels = 2, 2, 3
    sizes = SequenceParallelSizes(ssp_size=world // ulysses, ulysses_size=ulysses, num_heads=4, sparse_ratio=k)
    groups = build_groups(sizes)
    s = sizes.ssp_size
    for grid in [(3, 4, 8), (1, 12, 4), (2, 8, 4)]:
        rows = even_sizes(num_rows(grid, k), ulysses)  # 3 rows over U=2: uneven [2, 1]
        for src, dst in [("token", "group"), ("group", "token")]:
            gen = torch.Generator().manual_seed(11)
            x_full = torch.randn(batch, grid[0] * grid[1] * grid[2], channels, generator=gen)
            x_sparse = skiparse_rearrange(x_full, grid, src, k).requires_grad_()
            ref = skiparse_switch(x_sparse, grid, src, dst, k)
            weight = torch.randn(ref.shape, generator=gen)
            torch.sum(ref * weight).backward()

            def mine(t):
                return row_shard(ssp_shard_subsequences(t, k, groups.ssp_rank, s), sum(rows), rows,
                                 groups.ulysses_rank)

            x = mine(x_sparse.detach()).requires_grad_()
            with record_comm() as log:
                out = ssp_switch(x, rows[groups.ulysses_rank], grid[2], k, groups.ssp)
                torch.sum(out * mine(weight)).backward()
            # Bit-for-bit: scatter(switch(gather(x))) == parallel switch, forward and backward.
            assert torch.equal(out, mine(ref))
            assert torch.equal(x.grad, mine(x_sparse.grad))
            assert log.calls("all_to_all", direction="forward") == 1
            assert log.calls("all_to_all", direction="backward") == 1
            assert log.payload_bytes("all_to_all", direction="forward") == x.numel() * 4


@pytest.mark.parametrize("world,ulysses", [(2, 1), (4, 1), (4, 2)])
def test_ssp_switch_equals_gather_switch_scatter(world, ulysses):
    run_ranks(_check_switch, world, ulysses)


def test_switch_rejects_unpadded_grid_and_bad_sizes():
    with pytest.raises(ValueError, match="ssp_size=3 must divide k\\*k = 4"):
        SequenceParallelSizes(ssp_size=3, ulysses_size=1, num_heads=4, sparse_ratio=2)
    with pytest.raises(ValueError, match="ulysses_size=3 must divide num_heads=4"):
        SequenceParallelSizes(ssp_size=1, ulysses_size=3, num_heads=4, sparse_ratio=2)
    with pytest.raises(ValueError, match="must divide the number of ranks"):
        SequenceParallelSizes(ssp_size=2, ulysses_size=2, num_heads=4, sparse_ratio=2).check_world(6)
    assert SequenceParallelSizes(ssp_size=4, ulysses_size=1, num_heads=6, sparse_ratio=2).full_size == 2
