"""Fused Triton kernel for HiF8 fake quantization on GPU: amax -> scale -> TA round -> dequantize.

One pass over the tensor instead of the ~20 elementwise kernels of the torch path. It is bit-identical
to ``fake_quant.quantize_dequantize(..., backend="torch")``: the scale is the same fp32 ops in the same
order (clamp the amax at 1e-8, then a correctly rounded division), the rounding transcribes
``hif8.hif8_round_fp32_bits`` step by step, and the dequantization is a correctly rounded division
(``div_rn``; Triton's plain ``/`` may lower to an approximate division). The amax comes from torch
(one reduction kernel); CPU tensors never reach this file except under ``TRITON_INTERPRET=1`` in tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from policies.quant.scaling import AMAX_FLOOR

__all__ = ["hif8_quantize_dequantize_triton"]

_BLOCK = 2048
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


@triton.jit
def _hif8_qdq_kernel(
    x_ptr, out_ptr, amax_ptr, n, TARGET_MAX: tl.constexpr, SATURATE: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    amax = tl.load(amax_ptr).to(tl.float32)
    # torch.clamp_min keeps a NaN amax, tl.maximum would not: spell it as a select.
    amax = tl.where(amax < _AMAX_FLOOR, _AMAX_FLOOR, amax)
    # TARGET_MAX is a constexpr holding an fp32 value: a runtime Python float argument arrives as fp64 when
    # inductor launches the kernel, and div_rn refuses fp64.
    scale = tl.math.div_rn(tl.full(amax.shape, TARGET_MAX, tl.float32), amax)

    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale
    bits = y.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    abits = bits & 0x7FFFFFFF
    e = (abits >> 23) - 127
    ae = tl.abs(e)
    mb = 3 - (ae > 3).to(tl.int32) - (ae > 7).to(tl.int32) - (ae > 15).to(tl.int32)
    shift = 23 - mb
    one = tl.full(abits.shape, 1, tl.int32)
    rounded = (abits + (one << (shift - 1))) & ~((one << shift) - 1)
    rounded = tl.where(e == -23, (127 - 22) << 23, rounded)
    rounded = tl.where(e < -23, 0, rounded)
    if SATURATE:
        rounded = tl.where(rounded > 0x47000000, 0x47000000, rounded)
    else:
        rounded = tl.where(rounded > 0x47000000, 0x7F800000, rounded)
    out_bits = tl.where(rounded == 0, rounded, rounded | sign)
    if SATURATE:
        out_bits = tl.where(abits > 0x7F800000, 0, out_bits)
    else:
        out_bits = tl.where(abits > 0x7F800000, 0x7FC00000, out_bits)
    q = tl.math.div_rn(out_bits.to(tl.float32, bitcast=True), scale)
    if OUT_BF16:
        # Round to nearest even by hand: the Triton interpreter truncates fp32 -> bf16, while torch (and
        # Triton on GPU) round to nearest even. out_ptr is the int16 view of the bf16 output.
        qb = q.to(tl.int32, bitcast=True)
        rb = (qb + 0x7FFF + ((qb >> 16) & 1)) >> 16
        rb = tl.where(q != q, 0x7FC0, rb)
        tl.store(out_ptr + offs, rb.to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=mask)


def _fp32_value(value: float) -> float:
    """value rounded to fp32 (as ``torch.full_like(amax, value)`` rounds it in the torch path)."""
    return float(torch.tensor(float(value), dtype=torch.float32).item())


def hif8_quantize_dequantize_triton(
    x: torch.Tensor, amax: torch.Tensor, *, target_max: float, saturate: bool = False
) -> torch.Tensor:
    """``hif8_round(x * s) / s`` with ``s = target_max / max(amax, 1e-8)``, in ``x.dtype``, same shape.

    Args:
        x: float32/float16/bfloat16 tensor on a CUDA device (or CPU under the Triton interpreter).
        amax: 0-d float32 tensor on x's device (see ``scaling.Scaler.amax_for``).
    """
    x_flat = x.contiguous().view(-1)
    out = torch.empty_like(x_flat)
    n = x_flat.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        out_bf16 = x.dtype == torch.bfloat16
        _hif8_qdq_kernel[grid](
            x_flat, out.view(torch.int16) if out_bf16 else out, amax.to(torch.float32).reshape(1), n,
            TARGET_MAX=_fp32_value(target_max), SATURATE=bool(saturate), OUT_BF16=out_bf16, BLOCK=_BLOCK, num_warps=8,
        )
    return out.view(x.shape)
