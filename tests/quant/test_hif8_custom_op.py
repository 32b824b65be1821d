"""HiF8 quantize-dequantize as the custom op mixgrpo::hif8_qdq: equal bit for bit to the autograd-Function
implementation it replaced (kept here verbatim as the reference), and traceable by torch.compile in one graph."""

import pytest
import torch

from policies.quant.fake_quant import LinearQuantizers, hif8_fake_quant, hif8_linear, quantize_dequantize
from policies.quant.hif8 import hif8_round_fp32_bits
from policies.quant.scaling import amax_to_scale, tensor_amax


def _old_quantize_dequantize(x, amax, *, target_max, saturate=False):
    """The torch path of quantize_dequantize before it became a custom op."""
    scale = amax_to_scale(amax, target_max)
    x_flat = x.contiguous().view(-1)
    out = torch.empty_like(x_flat)
    y = x_flat.to(torch.float32) * scale
    rounded = hif8_round_fp32_bits(y.view(torch.int32), saturate=saturate).view(torch.float32)
    out.copy_(rounded / scale)
    return out.view(x.shape)


class _OldStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, amax, target_max, saturate):
        return _old_quantize_dequantize(x, amax, target_max=target_max, saturate=saturate)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def _bits_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = a.float().isnan()
    if not torch.equal(nan, b.float().isnan()):
        return False
    return torch.equal(a.float().view(torch.int32)[~nan], b.float().view(torch.int32)[~nan])


def _edge_values():
    # Values of reference/hif8.md's table and section 5: each band edge, the TA ties, the denormal range,
    # max finite, the overflow threshold, signed zero, Inf and NaN.
    vals = [0.0, -0.0, 1.0, 1.0625, 1.125, 15.0, 15.5, 16.0, 224.0, 232.0, 2.0**15, 40960.0, 40959.0, 49152.0,
            2.0**-15, 1.5 * 2.0**-16, 2.0**-16, 2.0**-22, 2.0**-23, 1.5 * 2.0**-23, 2.0**-24, 0.09375, 3.0e-5,
            float("inf"), float("nan")]
    v = torch.tensor(vals, dtype=torch.float32)
    return torch.cat([v, -v])


CASES = [(15.0, False), (224.0, False), (15.0, True), (7.3, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_forward_and_backward_equal_the_old_function(dtype):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(37, 19, generator=g) * 0.03, torch.randn(5, 3, 8, generator=g) * 300.0, _edge_values()]
    for x32 in tensors:
        x = x32.to(dtype)
        for amax in (tensor_amax(x[x.isfinite()]), torch.tensor(1.0), torch.tensor(2.0**-10)):
            for target, sat in CASES:
                new = quantize_dequantize(x, amax, target_max=target, saturate=sat, backend="torch")
                old = _old_quantize_dequantize(x, amax, target_max=target, saturate=sat)
                assert _bits_equal(new, old), (dtype, target, sat, amax)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        grad = torch.randn(x.shape, generator=g).to(dtype)
        out_new = hif8_fake_quant(xa, backend="torch")
        out_old = _OldStraightThrough.apply(xb, tensor_amax(xb), 15.0, False)
        assert _bits_equal(out_new, out_old)
        out_new.backward(grad)
        out_old.backward(grad)
        assert _bits_equal(xa.grad, xb.grad) and _bits_equal(xa.grad, grad)


def test_op_returns_a_fresh_contiguous_tensor_for_strided_input():
    x = torch.randn(6, 8).t()
    out = quantize_dequantize(x, tensor_amax(x), target_max=15.0)
    assert out.is_contiguous() and out.shape == x.shape
    assert _bits_equal(out, _old_quantize_dequantize(x, tensor_amax(x), target_max=15.0))
    with pytest.raises(ValueError, match="backend"):
        quantize_dequantize(x, tensor_amax(x), target_max=15.0, backend="cuda")


def test_op_passes_torch_library_opcheck():
    x = torch.randn(4, 5)
    torch.library.opcheck(torch.ops.mixgrpo.hif8_qdq.default, (x, tensor_amax(x), 15.0, False, "torch"))


def _fake_quant_fn(x):
    # Only correctly rounded ops around the op (inductor's own sin/exp may differ from ATen's in the last ulp,
    # which is not what this test is about).
    return hif8_fake_quant(x * 2.0, backend="torch") * 3.0 + hif8_fake_quant(x, target_max=224.0, backend="torch")


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_fake_quant_is_bit_identical_in_one_graph(backend):
    torch._dynamo.reset()
    x = (torch.randn(33, 17, generator=torch.Generator().manual_seed(1)) * 0.1)
    ref_x, cx = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = _fake_quant_fn(ref_x)
    compiled = torch.compile(_fake_quant_fn, backend=backend, fullgraph=True)
    try:
        out = compiled(cx)
    except Exception as exc:  # inductor needs a working C++ compiler on CPU
        if backend == "inductor" and "compil" in str(exc).lower():
            pytest.skip(f"inductor cannot build CPU kernels here: {str(exc)[:200]}")
        raise
    assert torch.equal(out, ref)
    ref.sum().backward()
    out.sum().backward()
    assert torch.equal(cx.grad, ref_x.grad)


def test_dynamo_sees_no_graph_break_in_the_hif8_linear():
    torch._dynamo.reset()
    q = LinearQuantizers.build(backend="torch")
    w = torch.randn(16, 8) * 0.1

    def fn(x):
        return hif8_fake_quant(x, backend="torch") * 3.0

    explain = torch._dynamo.explain(fn)(torch.randn(4, 8))
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    # The HiF8 linear (an autograd.Function holding its quantizers) compiles and matches eager bit for bit.
    x = torch.randn(4, 8)
    eager = hif8_linear(x, w, None, q)
    compiled = torch.compile(lambda t: hif8_linear(t, w, None, q), backend="aot_eager")(x)
    assert torch.equal(eager, compiled)
