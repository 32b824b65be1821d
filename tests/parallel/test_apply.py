"""apply_sequence_parallel on a tiny OSP-Next: SSP, Ulysses and SSP x Ulysses equal one device (2 and 4 ranks).

Each rank builds the same seeded model, runs the single-device reference, then a copy under
apply_sequence_parallel with the same full inputs. Forward outputs must match on every rank, and parameter
gradients summed over the sequence-parallel group must match the reference gradients.

Tolerance (fp32): the parallel run computes the same sums in other orders (attention over a subset of heads or
over shorter batches, gradient partial sums added across ranks), so values agree to a few ulp of the largest
magnitudes involved; rtol 1e-4 / atol 1e-5 is ~100x that and still catches any misplaced token, head or
subsequence (those give O(1) errors) and any missing or doubled gradient share (O(grad) errors).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from policies.osp_next.config import OSPNextConfig
from policies.osp_next.model import OSPNext
from policies.parallel.apply import apply_sequence_parallel, sum_gradients
from policies.parallel.comm import record_comm
from tests.parallel.sp_harness import run_ranks

pytestmark = pytest.mark.dist

# full, token, group, token, group, full: every transition and both switch directions.
LAYOUT = ["full", "token", "group", "token", "group", "full"]


def _model(num_heads: int) -> OSPNext:
    config = OSPNextConfig.preset("tiny", dim=8 * num_heads, num_heads=num_heads, num_layers=len(LAYOUT),
                                  layout=LAYOUT, attention_backend="sdpa")
    torch.manual_seed(0)
    model = OSPNext(config)
    with torch.no_grad():  # O(0.1) weights everywhere, so every norm, gate and modulation matters
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model


def _inputs(grid, batch=2, seed=1):
    t, h, w = grid
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, t, 2 * h, 2 * w, generator=gen)  # patch (1, 2, 2)
    return latents, torch.rand(batch, generator=gen) * 1000, torch.randn(batch, 5, 16, generator=gen)


def _run(model, inputs, weight):
    model.zero_grad()
    out = model(*inputs)
    torch.sum(out * weight).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


NATIVE, PADDED = (2, 8, 8), (3, 7, 6)  # PADDED becomes (3, 8, 8): uneven token, row and head-free shards


def _check_equal(rank, world, cases, num_heads, halves=False):
    # halves: ranks {0, 1} and {2, 3} each shard their own model inside their own subgroup.
    group = dist.new_group([0, 1] if rank < 2 else [2, 3], use_local_synchronization=True) if halves else None
    reference = _model(num_heads)
    references = {}
    for ssp, ulysses, grid, checkpointing in cases:
        inputs = _inputs(grid)
        weight = torch.randn(inputs[0].shape[0], 4, *inputs[0].shape[2:], generator=torch.Generator().manual_seed(2))
        if grid not in references:
            references[grid] = _run(reference, inputs, weight)
        out_ref, grads_ref = references[grid]
        model = copy.deepcopy(reference)
        groups = apply_sequence_parallel(model, ssp_size=ssp, ulysses_size=ulysses, group=group)
        model.gradient_checkpointing = checkpointing
        out, grads = _run(model, inputs, weight)
        sum_gradients(model, groups.sp)
        where = f"S={ssp} U={ulysses} grid={grid} checkpointing={checkpointing}"
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"output {where}: {m}")
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, grads_ref[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"grad {name} {where}: {m}")


@pytest.mark.parametrize("world,cases", [
    (2, [(2, 1, NATIVE, False), (2, 1, PADDED, True), (1, 2, PADDED, False)]),
    (4, [(4, 1, PADDED, False), (2, 2, PADDED, True), (2, 2, NATIVE, False), (1, 4, PADDED, False),
         (2, 1, PADDED, False)]),  # the last: two data-parallel copies of a 2-rank SSP group
])
def test_sequence_parallel_equals_one_device(world, cases):
    run_ranks(_check_equal, world, cases, 4)


def test_sequence_parallel_inside_a_subgroup():
    run_ranks(_check_equal, 4, [(2, 1, PADDED, False), (1, 2, NATIVE, False)], 4, True)


def test_full_blocks_on_gcd_of_heads_count_replicas_once():
    # 6 heads over S*U = 4 ranks: full blocks run Ulysses over gcd(6, 4) = 2 ranks, twice side by side.
    run_ranks(_check_equal, 4, [(4, 1, PADDED, False)], 6)


def _check_quarter(rank, world):
    model = _model(4)
    inputs = _inputs(NATIVE)
    logs = {}
    for ssp, ulysses in [(4, 1), (1, 4)]:
        sp_model = copy.deepcopy(model)
        apply_sequence_parallel(sp_model, ssp_size=ssp, ulysses_size=ulysses)
        with record_comm() as log:
            sp_model(*inputs).sum().backward()
        logs[ssp] = log
        with pytest.raises(ValueError, match="already applied"):
            apply_sequence_parallel(sp_model, ssp_size=ssp, ulysses_size=ulysses)
    ssp_log, uly_log = logs[4], logs[1]
    for direction in ("forward", "backward"):
        for block in ("block.2", "block.3", "block.4"):  # sparse blocks after the first (which enters)
            ssp_bytes = ssp_log.wire_bytes(scope=block, direction=direction)
            uly_bytes = uly_log.wire_bytes(scope=block, direction=direction)
            assert ssp_log.calls(scope=block, direction=direction) == 1
            assert uly_log.calls(scope=block, direction=direction) == 4
            assert ssp_bytes > 0 and 4 * ssp_bytes == uly_bytes, (block, direction, ssp_bytes, uly_bytes)
    # Full blocks are Ulysses in both: identical traffic.
    assert ssp_log.wire_bytes(scope="block.0") == uly_log.wire_bytes(scope="block.0") > 0


def test_ssp_sparse_block_moves_a_quarter_of_ulysses_bytes():
    run_ranks(_check_quarter, 4)
