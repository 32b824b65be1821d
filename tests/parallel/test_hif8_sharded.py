"""HiF8 under sequence parallelism: with amax shared over the group, every quantizer scales its shard with the
whole tensor's amax, so scales and forward values equal the single-device run's.

Each rank builds the same seeded HiF8 model and runs it alone (the reference), then a copy sharded by SSP (and
SSP x Ulysses on 4 ranks). Every quantizer's amax is recorded in call order. With ``share_amax`` the SP run's
amaxes equal the reference's to float32 reduction noise, and the output follows; without it (each rank scaling its
own shard, the old behaviour) amaxes differ by O(1) factors and so does the rounding: the check can fail.
Backward: gradients of the text's K/V projections arrive as per-rank partial sums (see
policies/quant/fake_quant.py), so only forward values are held to the reference here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from policies.parallel.apply import apply_sequence_parallel
from policies.quant import apply_hif8, share_amax
from tests.parallel.sp_harness import run_ranks
from tests.parallel.test_apply import PADDED, _inputs, _model

pytestmark = pytest.mark.dist


def _record_amax(model) -> list[torch.Tensor]:
    """Wrap every forward quantizer's scaler so the amax it scales with is appended to the returned list."""
    from policies.quant.apply import _named_quantizers

    seen: list[torch.Tensor] = []
    for key, quantizer in _named_quantizers(model).items():
        if key.endswith((".grad_output", ".dq", ".dk", ".dv")):
            continue
        scaler = quantizer.scaler
        original = scaler.amax_for

        def recording(x, reduce=None, original=original):
            amax = original(x, reduce)
            seen.append(amax.detach().clone())
            return amax

        scaler.amax_for = recording
    return seen


def _check(rank, world, ssp, ulysses):
    base = _model(4)
    apply_hif8(base, backend="torch")
    reference = copy.deepcopy(base)
    inputs = _inputs(PADDED)
    ref_amax = _record_amax(reference)
    with torch.no_grad():
        out_ref = reference(*inputs)
    errors = {}
    for shared in (True, False):
        model = copy.deepcopy(base)
        groups = apply_sequence_parallel(model, ssp_size=ssp, ulysses_size=ulysses)
        if shared:
            assert share_amax(model, groups.sp) > 0
        amax = _record_amax(model)
        with torch.no_grad():
            out = model(*inputs)
        assert len(amax) == len(ref_amax)
        ratios = torch.stack([a / r for a, r in zip(amax, ref_amax)])
        errors[shared] = (float((ratios - 1).abs().max()), float((out - out_ref).norm() / out_ref.norm()))
    # Shared: the same amax, so the same rounding: the output equals the reference up to float32 reduction order.
    # (On CPU both are exactly 0: every row of a shard is computed as in the whole tensor.)
    assert errors[True][0] < 1e-6, errors
    assert errors[True][1] < 1e-6, errors
    # Unshared: each rank's shard has its own, smaller amax; the rounding differs everywhere.
    assert errors[False][0] > 1e-2, errors
    assert errors[False][1] > 1e-3, errors


@pytest.mark.parametrize("world,ssp,ulysses", [(2, 2, 1), (4, 2, 2)])
def test_shared_amax_gives_sharded_hif8_the_single_device_scales(world, ssp, ulysses):
    run_ranks(_check, world, ssp, ulysses)
