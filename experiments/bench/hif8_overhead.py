"""HiF8 fake-quant overhead and quality on one Wan2.1-14B block (dim 5120, ffn 13824, 40 heads).

Rows, each one forward + backward of the block in bf16 at 720P/81 frames (75,600 tokens; --seq-frac scales it):
  bf16           no quantization (baseline)
  hif8_torch     apply_hif8 (ten linears + Q/K/V, current scaling 15 / 224), torch elementwise path
  hif8_triton    the same with the fused Triton kernel (bit-identical values)
  fp8_scaled_mm  real FP8 GEMMs via torch._scaled_mm: E4M3 input/weight, E5M2 grads, per-tensor scales
                 (attention in bf16, not quantized) -- a speed reference for what native 8-bit would buy
Then the quantization SNR (dB, per-tensor scaling) of HiF8 vs FP8 on the block's weights, linear inputs and
grad_outputs: HiF8 maps amax to 15 (forward) / 224 (grads); E4M3 maps amax to 448, E5M2 to 57344.
Weights are random (std 0.02) and inputs N(0, 1): the SNR rows are indicative, not Wan's real statistics.
Finally a GPU check that the Triton and torch paths agree bit for bit on the block's tensors.

    python experiments/bench/hif8_overhead.py                       # H100, full 720P sequence (< 4 min)
    python experiments/bench/hif8_overhead.py --seq-frac 0.25       # shorter sequence
    python experiments/bench/hif8_overhead.py --device cpu --tiny   # smoke test (no Triton row)

Exits 1 if any row fails or the bit-identity check fails; --json PATH also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from policies.quant import apply_hif8, quantize_dequantize, remove_hif8, tensor_amax

WAN_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, text_len=512, seq_len=75_600)
TINY = dict(dim=32, ffn_dim=64, num_heads=2, text_len=16, seq_len=128)
E4M3_MAX, E5M2_MAX = 448.0, 57344.0


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.qkv_hook = None

    def forward(self, x_BNC: torch.Tensor, context_BLC: torch.Tensor | None = None) -> torch.Tensor:
        src = x_BNC if context_BLC is None else context_BLC
        q = self.norm_q(self.q(x_BNC)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(src)).unflatten(-1, (self.num_heads, -1))
        v = self.v(src).unflatten(-1, (self.num_heads, -1))
        if self.qkv_hook is not None:
            q, k, v = self.qkv_hook(q, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))


class WanBlock(nn.Module):
    """Wan2.1 attention block (modulated self-attn, cross-attn, GELU-tanh FFN); RoPE is left out (elementwise,
    the same cost in every row)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.self_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x_BNC: torch.Tensor, context_BLC: torch.Tensor, e_B6C: torch.Tensor) -> torch.Tensor:
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation + e_B6C).chunk(6, dim=1)
        x_BNC = x_BNC + self.self_attn(self.norm1(x_BNC) * (1 + scale) + shift) * gate
        x_BNC = x_BNC + self.cross_attn(self.norm3(x_BNC), context_BLC)
        return x_BNC + self.ffn(self.norm2(x_BNC) * (1 + c_scale) + c_shift) * c_gate


class OneBlock(nn.Module):
    """Holds the block as ``blocks.0`` so apply_hif8's default OSP-Next patterns match."""

    def __init__(self, **dims: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([WanBlock(dims["dim"], dims["ffn_dim"], dims["num_heads"])])

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](*args)


def _to_fp8(t: torch.Tensor, dtype: torch.dtype, fmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 cast: returns (t_fp8, dequant_scale) with t ~= t_fp8 * dequant_scale."""
    amax = tensor_amax(t).clamp_min(1e-8)
    scale = torch.full_like(amax, fmax) / amax
    # In place on the one fp32 copy: these tensors reach 10^9 elements at 720P.
    return t.to(torch.float32, copy=True).mul_(scale).clamp_(-fmax, fmax).to(dtype), scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        x8, sx = _to_fp8(x2, torch.float8_e4m3fn, E4M3_MAX)
        w8, sw = _to_fp8(weight, torch.float8_e4m3fn, E4M3_MAX)
        out = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=x.dtype) + bias
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x8, sx, w8, sw = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        g8, sg = _to_fp8(g2, torch.float8_e5m2, E5M2_MAX)
        grad_x = torch._scaled_mm(g8, _col_major(w8), scale_a=sg, scale_b=sw, out_dtype=grad_out.dtype)
        grad_w = torch._scaled_mm(g8.t().contiguous(), _col_major(x8), scale_a=sg, scale_b=sx, out_dtype=grad_out.dtype)
        return grad_x.view(ctx.x_shape), grad_w, g2.sum(0)


def use_fp8_linears(model: OneBlock) -> list[nn.Linear]:
    block = model.blocks[0]
    linears = [getattr(a, n) for a in (block.self_attn, block.cross_attn) for n in "qkvo"] + [block.ffn[0], block.ffn[2]]
    for lin in linears:
        lin.forward = (lambda m: lambda x: _FP8LinearFunction.apply(x, m.weight, m.bias))(lin)
    return linears


def restore_linears(linears: list[nn.Linear]) -> None:
    for lin in linears:
        del lin.forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(model: nn.Module, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor, *, warmup: int, iters: int,
                 device: torch.device) -> dict[str, float]:
    x = inputs[0].detach().requires_grad_()

    def step() -> None:
        model(x, *inputs[1:]).backward(grad)
        for p in model.parameters():
            p.grad = None
        x.grad = None

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    ms = (time.perf_counter() - start) / iters * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"ms": ms, "peak_gib": peak}


def snr_db(ref: torch.Tensor, approx_fn, chunk: int = 1 << 26) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2), streamed in chunks (approx_fn is elementwise)."""
    flat = ref.reshape(-1)
    signal = noise = 0.0
    for start in range(0, flat.numel(), chunk):
        piece = flat[start:start + chunk].float()
        signal += piece.double().square().sum().item()
        noise += (piece - approx_fn(piece).float()).double().square().sum().item()
    return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


def _hif8_fn(t: torch.Tensor, target: float):
    amax = tensor_amax(t)
    return lambda piece: quantize_dequantize(piece, amax, target_max=target, backend="torch")


def _fp8_fn(t: torch.Tensor, dtype: torch.dtype, fmax: float):
    amax = tensor_amax(t).clamp_min(1e-8)
    scale = torch.full_like(amax, fmax) / amax
    return lambda piece: (piece * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def capture_tensors(model: OneBlock, inputs, grad) -> dict[str, torch.Tensor]:
    """Weights, inputs and grad_outputs of the ten linears, from one bf16 forward + backward."""
    block, found, handles = model.blocks[0], {}, []
    names = [f"{a}.{n}" for a in ("self_attn", "cross_attn") for n in "qkvo"] + ["ffn.0", "ffn.2"]
    for name in names:
        lin = block.get_submodule(name)
        found[f"W {name}"] = lin.weight.detach()
        handles.append(lin.register_forward_pre_hook(lambda m, a, n=name: found.__setitem__(f"X {n}", a[0].detach())))
        handles.append(lin.register_full_backward_hook(
            lambda m, gi, go, n=name: found.__setitem__(f"G {n}", go[0].detach())))
    x = inputs[0].detach().requires_grad_()
    with warnings.catch_warnings():  # the text states need no grad; the hook still sees grad_output
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        model(x, *inputs[1:]).backward(grad)
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny dims for a CPU smoke test")
    parser.add_argument("--seq-frac", type=float, default=1.0, help="fraction of the 75,600-token 720P sequence")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not 0 < args.seq_frac <= 1:
        parser.error("--seq-frac must be in (0, 1]")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; run with --device cpu --tiny for the smoke test")

    dims = dict(TINY if args.tiny else WAN_14B)
    seq = max(16, int(dims["seq_len"] * args.seq_frac) // 16 * 16)  # FP8 GEMMs need multiples of 16
    torch.manual_seed(0)
    model = OneBlock(**dims)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model = model.to(device=device, dtype=torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    inputs = (rand(1, seq, dims["dim"]), rand(1, dims["text_len"], dims["dim"]), rand(1, 6, dims["dim"]) * 0.1)
    grad = rand(1, seq, dims["dim"]) * 1e-3
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; block dim {dims['dim']}, ffn {dims['ffn_dim']}, heads {dims['num_heads']}, "
          f"tokens {seq}, text {dims['text_len']}, bf16, fwd+bwd, {args.iters} iters after {args.warmup} warmup")

    results: dict[str, dict] = {"config": {**dims, "seq_len": seq, "device": name}, "timing": {}, "snr_db": {}}
    failures: list[str] = []

    def run_row(row: str, setup, teardown) -> None:
        try:
            state = setup()
            try:
                results["timing"][row] = time_fwd_bwd(model, inputs, grad, warmup=args.warmup, iters=args.iters,
                                                      device=device)
            finally:
                teardown(state)
        except Exception:  # report every row, fail at the end
            failures.append(row)
            print(f"[{row}] FAILED:\n{traceback.format_exc()}", file=sys.stderr)

    run_row("bf16", lambda: None, lambda s: None)
    run_row("hif8_torch", lambda: apply_hif8(model, backend="torch"), lambda s: remove_hif8(model))
    if device.type == "cuda":
        run_row("hif8_triton", lambda: apply_hif8(model, backend="triton"), lambda s: remove_hif8(model))
    else:
        print("hif8_triton row skipped: the Triton kernel needs a CUDA device")
    run_row("fp8_scaled_mm", lambda: use_fp8_linears(model), restore_linears)

    base = results["timing"].get("bf16", {}).get("ms")
    print(f"\n{'row':<16}{'ms/iter':>10}{'vs bf16':>10}{'peak GiB':>10}")
    for row, r in results["timing"].items():
        r["overhead_pct"] = (r["ms"] / base - 1) * 100 if base else float("nan")
        print(f"{row:<16}{r['ms']:>10.1f}{r['overhead_pct']:>+9.1f}%{r['peak_gib']:>10.1f}")
    for row in failures:
        print(f"{row:<16}{'FAILED':>10}")

    try:
        tensors = capture_tensors(model, inputs, grad)
        print(f"\n{'tensor':<22}{'HiF8 dB':>9}{'FP8 dB':>9}  (W, X: HiF8@15 vs E4M3@448; G: HiF8@224 vs E5M2)")
        for key, t in tensors.items():
            grad_role = key.startswith("G ")
            hif8 = snr_db(t, _hif8_fn(t, 224.0 if grad_role else 15.0))
            fp8 = snr_db(t, _fp8_fn(t, *((torch.float8_e5m2, E5M2_MAX) if grad_role else (torch.float8_e4m3fn, E4M3_MAX))))
            results["snr_db"][key] = {"hif8": hif8, "fp8": fp8}
            print(f"{key:<22}{hif8:>9.2f}{fp8:>9.2f}")
        if device.type == "cuda":
            mismatched = []
            for key, t in tensors.items():
                target = 224.0 if key.startswith("G ") else 15.0
                a = quantize_dequantize(t, tensor_amax(t), target_max=target, backend="torch")
                b = quantize_dequantize(t, tensor_amax(t), target_max=target, backend="triton")
                if not torch.equal(a.view(torch.int16), b.view(torch.int16)):
                    mismatched.append(key)
            results["triton_bit_identical"] = not mismatched
            print(f"\ntriton == torch bit for bit on all {len(tensors)} tensors: {not mismatched} {mismatched or ''}")
            if mismatched:
                failures.append("triton_bit_identity")
    except Exception:
        failures.append("snr")
        print(f"[snr] FAILED:\n{traceback.format_exc()}", file=sys.stderr)

    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.json)
    if failures:
        print(f"\nFAILED: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
