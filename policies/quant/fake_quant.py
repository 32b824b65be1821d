"""HiF8 fake quantization as autograd functions: straight-through tensors, HiF8 linears, Q/K/V hooks.

What is quantized follows OSP-Next's HiF8 training (quant-dequant simulation, master weights in high
precision):
- Linear: forward quantizes the input and the weight, each with its own per-tensor scale, then
  ``out = x_q @ w_q^T + b``. Backward quantizes the incoming gradient with its own scale and reuses the
  quantized tensors saved in forward: ``grad_x = g_q @ w_q``, ``grad_W = g_q^T @ x_q``,
  ``grad_b = sum(g_q)``. The bias is never quantized.
- Attention inputs: Q, K, V are quantized in forward, dQ, dK, dV in backward; softmax and dO are not.

Tensors saved for backward are the quantized ones (same dtype as the originals), so HiF8 costs one
extra weight-sized buffer per linear between forward and backward, not an extra activation.
Per-tensor amax is local to the calling process unless a quantizer is given an ``amax_group``
(``share_amax``): under sequence parallelism each rank then scales its shard with the whole tensor's amax
(an all-reduce MAX), so forward values equal the single-device run's. Gradients of tensors that every rank
computes in full (cross-attention K/V of the text) arrive as per-rank partial sums; quantizing a partial sum
cannot equal quantizing the sum, so those few backward values stay close to, not equal to, one device's.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from policies.quant.hif8 import _check_float, hif8_round_fp32_bits
from policies.quant.scaling import (
    BACKWARD_TARGET_MAX,
    FORWARD_TARGET_MAX,
    CurrentScaler,
    DelayedScaler,
    Scaler,
    amax_to_scale,
    tensor_amax,
)

__all__ = [
    "BACKENDS",
    "quantize_dequantize",
    "hif8_qdq",
    "hif8_fake_quant",
    "TensorQuantizer",
    "LinearQuantizers",
    "hif8_linear",
    "HiF8QKVHook",
    "make_scaler",
]

BACKENDS = ("auto", "torch", "triton")
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_CHUNK = 1 << 26


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not _HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
        return True
    return backend == "auto" and x.is_cuda and _HAS_TRITON


def _qdq_impl(x: torch.Tensor, amax: torch.Tensor, target_max: float, saturate: bool, backend: str) -> torch.Tensor:
    if _use_triton(x, backend):
        from policies.quant.triton_hif8 import hif8_quantize_dequantize_triton

        return hif8_quantize_dequantize_triton(x, amax, target_max=target_max, saturate=saturate)
    scale = amax_to_scale(amax, target_max)
    x_flat = x.contiguous().view(-1)
    out = torch.empty_like(x_flat)
    # Chunks bound the ~10 int32 temporaries of the rounding to a few GiB on 10^9-element activations.
    for src, dst in zip(x_flat.split(_CHUNK), out.split(_CHUNK)):
        y = src.to(torch.float32) * scale
        rounded = hif8_round_fp32_bits(y.view(torch.int32), saturate=saturate).view(torch.float32)
        dst.copy_(rounded / scale)
    return out.view(x.shape)


# One registered op for both devices, so torch.compile sees a single opaque node (inductor neither traces
# the Triton launch, which failed to build, nor re-fuses the bit manipulation) and autograd sees the
# straight-through rule.
@torch.library.custom_op("mixgrpo::hif8_qdq", mutates_args=())
def hif8_qdq(x: torch.Tensor, amax: torch.Tensor, target_max: float, saturate: bool, backend: str) -> torch.Tensor:
    """``hif8_round(x * s) / s``, ``s = target_max / max(amax, 1e-8)`` in fp32; a new contiguous tensor."""
    with torch.no_grad():
        return _qdq_impl(x.detach(), amax.detach(), target_max, saturate, backend)


@hif8_qdq.register_fake
def _hif8_qdq_fake(x, amax, target_max, saturate, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _hif8_qdq_setup_context(ctx, inputs, output):
    pass


def _hif8_qdq_backward(ctx, grad):
    # Straight-through: d out / d x = identity; no gradient to the amax (it comes from a detached tensor).
    return grad, None, None, None, None


hif8_qdq.register_autograd(_hif8_qdq_backward, setup_context=_hif8_qdq_setup_context)


def quantize_dequantize(
    x: torch.Tensor, amax: torch.Tensor, *, target_max: float, saturate: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """``hif8_round(x * s) / s`` with ``s = target_max / max(amax, 1e-8)`` computed in fp32; x's dtype out.

    ``backend="auto"`` uses the fused Triton kernel for CUDA tensors and the torch ops otherwise; the two
    are bit-identical. Runs as the custom op ``torch.ops.mixgrpo.hif8_qdq`` (straight-through gradient).
    """
    _check_float(x, "x")
    _use_triton(x, backend)  # validates the backend name here, with a clear message, not inside the op
    return hif8_qdq(x, amax, float(target_max), bool(saturate), backend)


def hif8_fake_quant(
    x: torch.Tensor,
    *,
    amax: torch.Tensor | None = None,
    target_max: float = FORWARD_TARGET_MAX,
    saturate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with a straight-through gradient (d out / d x = identity).

    ``amax`` defaults to x's own amax (current scaling).
    """
    if amax is None:
        amax = tensor_amax(x)
    return quantize_dequantize(x, amax, target_max=target_max, saturate=saturate, backend=backend)


def make_scaler(scaling: str, *, target_max: float, history_len: int = 16) -> Scaler:
    if scaling == "current":
        return CurrentScaler(target_max=target_max)
    if scaling == "delayed":
        return DelayedScaler(target_max=target_max, history_len=history_len)
    raise ValueError(f"scaling must be 'current' or 'delayed', got {scaling!r}")


@dataclass(kw_only=True)
class TensorQuantizer:
    """Quantizes one tensor role (e.g. a linear's input) with its own scaler."""

    scaler: Scaler
    saturate: bool = False
    backend: str = "auto"
    amax_group: Any = None
    """A torch.distributed group whose ranks hold shards of the same tensor: their amax is all-reduced (MAX)."""

    def _reduce(self, amax: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        amax = amax.clone()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.amax_group)
        return amax

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize without autograd (callers own the gradient rule)."""
        amax = self.scaler.amax_for(x, None if self.amax_group is None else self._reduce)
        return quantize_dequantize(
            x.detach(), amax, target_max=self.scaler.target_max, saturate=self.saturate, backend=self.backend
        )


def make_quantizer(scaling: str, target_max: float, *, history_len: int, saturate: bool, backend: str) -> TensorQuantizer:
    """One tensor's quantizer with its own scaler (current or delayed) mapping amax to ``target_max``."""
    scaler = make_scaler(scaling, target_max=target_max, history_len=history_len)
    return TensorQuantizer(scaler=scaler, saturate=saturate, backend=backend)


@dataclass(kw_only=True)
class LinearQuantizers:
    """The three per-tensor quantizers of one HiF8 linear: input and weight (forward), grad_output."""

    input: TensorQuantizer
    weight: TensorQuantizer
    grad_output: TensorQuantizer

    @classmethod
    def build(
        cls,
        *,
        scaling: str = "current",
        history_len: int = 16,
        forward_target_max: float = FORWARD_TARGET_MAX,
        backward_target_max: float = BACKWARD_TARGET_MAX,
        saturate: bool = False,
        backend: str = "auto",
    ) -> LinearQuantizers:
        def q(target_max: float) -> TensorQuantizer:
            return make_quantizer(scaling, target_max, history_len=history_len, saturate=saturate, backend=backend)

        return cls(input=q(forward_target_max), weight=q(forward_target_max), grad_output=q(backward_target_max))


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _HiF8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, quantizers: LinearQuantizers):
        # Under autocast, quantize the tensors the matmul would really see (the autocast dtype) and run the
        # matmul with autocast off, so forward and backward use one compute dtype.
        compute_dtype = _autocast_dtype(x) or x.dtype
        x_q = quantizers.input(x.to(compute_dtype))
        w_q = quantizers.weight(weight.to(compute_dtype))
        b = None if bias is None else bias.to(compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x_q, w_q, b)
        ctx.save_for_backward(x_q, w_q)
        ctx.quantizers = quantizers
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_q, w_q = ctx.saved_tensors
        g_q = ctx.quantizers.grad_output(grad_out.to(x_q.dtype))
        g_2d = g_q.reshape(-1, g_q.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g_q @ w_q).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_w = (g_2d.t() @ x_q.reshape(-1, x_q.shape[-1])).to(ctx.dtypes[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_2d.sum(0).to(ctx.dtypes[2])
        return grad_x, grad_w, grad_b, None


def hif8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, quantizers: LinearQuantizers
) -> torch.Tensor:
    """``F.linear`` with HiF8 fake-quantized input, weight (forward) and grad_output (backward).

    Args:
        x: ``[..., in_features]``; weight: ``[out_features, in_features]``; bias: ``[out_features]`` or None.
    """
    return _HiF8LinearFunction.apply(x, weight, bias, quantizers)


class _QKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, hook: HiF8QKVHook):
        ctx.hook = hook
        return hook.q(q), hook.k(k), hook.v(v)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        hook = ctx.hook
        return hook.dq(dq), hook.dk(dk), hook.dv(dv), None


class HiF8QKVHook:
    """``q, k, v = hook(q, k, v)``: per-tensor HiF8 on Q/K/V in forward and on dQ/dK/dV in backward.

    Set as an attention module's ``qkv_hook``; the model calls it right before the attention kernel.
    """

    def __init__(
        self,
        *,
        scaling: str = "current",
        history_len: int = 16,
        forward_target_max: float = FORWARD_TARGET_MAX,
        backward_target_max: float = BACKWARD_TARGET_MAX,
        saturate: bool = False,
        backend: str = "auto",
    ) -> None:
        def q(target_max: float) -> TensorQuantizer:
            return make_quantizer(scaling, target_max, history_len=history_len, saturate=saturate, backend=backend)

        self.q, self.k, self.v = (q(forward_target_max) for _ in range(3))
        self.dq, self.dk, self.dv = (q(backward_target_max) for _ in range(3))

    def quantizers(self) -> dict[str, TensorQuantizer]:
        return {"q": self.q, "k": self.k, "v": self.v, "dq": self.dq, "dk": self.dk, "dv": self.dv}

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _QKVFunction.apply(q, k, v, self)

    def __repr__(self) -> str:
        return f"HiF8QKVHook({self.q.scaler!r} fwd, {self.dq.scaler!r} bwd)"
