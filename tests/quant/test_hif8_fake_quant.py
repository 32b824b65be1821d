"""Scaling, straight-through fake quant, HiF8 linear and Q/K/V hook vs the computation written by hand."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from policies.quant.fake_quant import HiF8QKVHook, LinearQuantizers, hif8_fake_quant, hif8_linear, quantize_dequantize
from policies.quant.hif8 import hif8_round
from policies.quant.scaling import CurrentScaler, DelayedScaler, amax_to_scale, tensor_amax


def _qdq_by_hand(t, target_max):
    """OSP-Next's formula: s = target / max|t|, t_q = round(t * s) / s, in fp32."""
    s = torch.tensor(target_max) / t.abs().max().float().clamp_min(1e-8)
    return hif8_round(t.float() * s) / s


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_quantize_dequantize_matches_formula_and_maps_amax_to_target():
    x = _randn(64, 33, seed=0, scale=0.02)
    for target in (15.0, 224.0):
        out = quantize_dequantize(x, tensor_amax(x), target_max=target, backend="torch")
        assert torch.equal(out, _qdq_by_hand(x, target))
        # At most 253 distinct levels, and amax lands on the target (15 and 224 are HiF8 values).
        s = amax_to_scale(tensor_amax(x), target)
        assert out.unique().numel() <= 253 < x.unique().numel()
        assert torch.isclose((out * s).abs().max(), torch.tensor(target), rtol=1e-6)
    assert not torch.equal(out, x)  # it really quantizes


def test_quantize_dequantize_edge_cases():
    zeros = torch.zeros(5)
    assert torch.equal(quantize_dequantize(zeros, tensor_amax(zeros), target_max=15.0), zeros)
    with_nan = torch.tensor([1.0, float("nan"), -2.0])
    assert quantize_dequantize(with_nan, tensor_amax(with_nan), target_max=15.0).isnan().all()
    bf = _randn(100, seed=1).to(torch.bfloat16)
    out = quantize_dequantize(bf, tensor_amax(bf), target_max=15.0)
    assert out.dtype == torch.bfloat16 and torch.equal(out, _qdq_by_hand(bf, 15.0).to(torch.bfloat16))
    # Delayed scaling can see values far above the history's amax: non-saturating overflow gives Inf.
    big = torch.tensor([1.0, 5000.0])
    assert quantize_dequantize(big, torch.tensor(1.0), target_max=15.0)[1].isinf()
    assert quantize_dequantize(big, torch.tensor(1.0), target_max=15.0, saturate=True)[1] == 32768.0 / 15.0


def test_straight_through_gradient_is_identity():
    x = _randn(4, 7, seed=2).requires_grad_()
    g = _randn(4, 7, seed=3)
    out = hif8_fake_quant(x)
    assert torch.equal(out, _qdq_by_hand(x.detach(), 15.0))
    out.backward(g)
    assert torch.equal(x.grad, g)


def test_current_and_delayed_scalers():
    x1, x2, x3 = torch.tensor([1.0, -4.0]), torch.tensor([2.0]), torch.tensor([-8.0])
    assert CurrentScaler(target_max=15).amax_for(x2).item() == 2.0
    d = DelayedScaler(target_max=15, history_len=2)
    assert d.amax_for(x1).item() == 4.0  # empty history: the tensor's own amax
    assert d.amax_for(x2).item() == 4.0  # max of the previous calls, not including this one
    assert d.amax_for(x3).item() == 4.0  # history now [4, 2]
    assert d.amax_for(x2).item() == 8.0  # 4 fell out of the window of 2, 8 came in
    assert d.amax_for(x2).item() == 8.0
    assert d.amax_for(x2).item() == 2.0
    with pytest.raises(ValueError, match="history_len"):
        DelayedScaler(target_max=15, history_len=0)
    with pytest.raises(ValueError, match="target_max"):
        CurrentScaler(target_max=-1)


def test_delayed_scaler_state_round_trip():
    a = DelayedScaler(target_max=224, history_len=3)
    for i in range(5):
        a.amax_for(torch.tensor([float(i + 1) * (-1) ** i]))
    b = DelayedScaler(target_max=224, history_len=3)
    b.load_state_dict(a.state_dict())
    for x in (torch.tensor([0.5]), torch.tensor([9.0]), torch.tensor([0.1])):
        assert a.amax_for(x).item() == b.amax_for(x).item()
    assert torch.equal(a.amax_history, b.amax_history) and a.num_observed == b.num_observed == 8
    with pytest.raises(ValueError, match="history_len"):
        DelayedScaler(target_max=224, history_len=4).load_state_dict(a.state_dict())


@pytest.mark.parametrize("with_bias", [True, False])
def test_hif8_linear_equals_hand_written_forward_and_gradients(with_bias):
    x = _randn(2, 3, 8, seed=4).requires_grad_()
    w = _randn(5, 8, seed=5, scale=0.1).requires_grad_()
    b = _randn(5, seed=6).requires_grad_() if with_bias else None
    g = _randn(2, 3, 5, seed=7, scale=1e-3)
    out = hif8_linear(x, w, b, LinearQuantizers.build())
    out.backward(g)

    x_q, w_q, g_q = _qdq_by_hand(x.detach(), 15.0), _qdq_by_hand(w.detach(), 15.0), _qdq_by_hand(g, 224.0)
    ref = x_q @ w_q.t() + (b.detach() if with_bias else 0)
    # Same quantized operands; only the matmul kernels' summation order may differ (fp32 rounding).
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(x.grad, g_q @ w_q, **tol)
    torch.testing.assert_close(w.grad, g_q.reshape(-1, 5).t() @ x_q.reshape(-1, 8), **tol)
    if with_bias:
        torch.testing.assert_close(b.grad, g_q.sum((0, 1)), **tol)
    # The unquantized result is far outside that tolerance, so the comparison can fail.
    assert (x.detach() @ w.detach().t() - (x_q @ w_q.t())).abs().max() > 1e-3
    assert (x.grad - g @ w.detach()).abs().max() > 1e-5


def test_hif8_linear_under_autocast_quantizes_in_the_autocast_dtype():
    x = _randn(6, 8, seed=8).requires_grad_()
    w = _randn(4, 8, seed=9).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hif8_linear(x, w, None, LinearQuantizers.build())
    assert out.dtype == torch.bfloat16
    x_q = _qdq_by_hand(x.detach().bfloat16(), 15.0).bfloat16()
    w_q = _qdq_by_hand(w.detach().bfloat16(), 15.0).bfloat16()
    torch.testing.assert_close(out, x_q @ w_q.t(), rtol=0.01, atol=0.01)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_qkv_hook_quantizes_inputs_forward_and_gradients_backward():
    q, k, v = (_randn(2, 5, 2, 4, seed=s).requires_grad_() for s in (10, 11, 12))
    wq, wk, wv = (_randn(2, 5, 2, 4, seed=s, scale=0.01) for s in (13, 14, 15))
    q_, k_, v_ = HiF8QKVHook()(q, k, v)
    for got, src in ((q_, q), (k_, k), (v_, v)):
        assert torch.equal(got, _qdq_by_hand(src.detach(), 15.0))
    ((q_ * wq).sum() + (k_ * wk).sum() + (v_ * wv).sum()).backward()
    for src, upstream in ((q, wq), (k, wk), (v, wv)):
        assert torch.equal(src.grad, _qdq_by_hand(upstream, 224.0))
        assert not torch.equal(src.grad, upstream)


_TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from policies.quant.fake_quant import quantize_dequantize
    from policies.quant.scaling import tensor_amax
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 1500, generator=g) * torch.logspace(-9, 5, 1500)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-30, -3e38, 2.0**-23])
    bad = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        wide_d, special_d = wide.to(dtype), special.to(dtype)
        cases = [(wide_d, tensor_amax(wide_d), 15.0, False), (wide_d, tensor_amax(wide_d), 224.0, True)]
        cases += [(special_d, torch.tensor(3.0e-3), 15.0, sat) for sat in (False, True)]
        cases += [(torch.zeros(7, dtype=dtype), torch.tensor(0.0), 15.0, False)]
        cases += [(wide_d[0], torch.tensor(float("nan")), 224.0, False)]
        for x, amax, target, saturate in cases:
            kw = dict(target_max=target, saturate=saturate)
            a = quantize_dequantize(x, amax, backend="triton", **kw)
            b = quantize_dequantize(x, amax, backend="torch", **kw)
            ia, ib = (t.float().view(torch.int32) for t in (a, b))
            nan = a.float().isnan()
            same = a.dtype == b.dtype and torch.equal(nan, b.float().isnan())
            bad += int(not (same and torch.equal(ia[~nan], ib[~nan])))
    print("MISMATCHES", bad)
    """
)


def test_triton_kernel_bit_identical_to_torch_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MISMATCHES 0" in result.stdout, result.stdout[-2000:]
