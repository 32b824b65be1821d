"""One OSP-Next block, fwd+bwd and fwd only: full attention vs Skiparse (token, group), bf16 / fp8 / HiF8, eager
vs the training path's compile.

Wan2.1-14B block shapes (dim 5120, 40 heads, FFN 13824, 512 text tokens) at 720P/81 frames: latent 21x90x160,
patch (1, 2, 2) -> grid 21x45x80 = 75,600 tokens; a Skiparse block (k=2) pads H to 48 and attends within 4
subsequences of 20,160 tokens. The block is ``OSPNextBlock`` itself, fed exactly as ``OSPNext._blocks`` feeds it:
full blocks take ``[B, N, C]`` with the full RoPE tables; sparse blocks take ``SequencePlan.enter_sparse``'s
``[P*B, N'/P, C]`` with the rearranged RoPE tables and padding mask of ``sparse_position_tables``.

Quantization goes through the training path's functions (``apply_fp8(blocks="all")``, ``apply_hif8``), compile
through ``policies.compile.apply_compile``. Token and group blocks have the same shapes and share one block (the
block's maths does not depend on its kind), so they share one compiled graph. Timing: CUDA events, ``--warmup``
then the median of ``--iters``. One JSON line per (block kind, quant, compile).

FLOPs counted (model FLOPs, 2 per multiply-add): the ten linears (cross-attention K/V on the text tokens), self
attention 4*N^2*d for a full block and 4*N'^2*d/P for a sparse one (padding tokens included: the kernel runs them),
cross attention 4*N*L*d; backward = 2x forward.

    PYTHONPATH=$PWD python experiments/bench/block_speed.py                      # full matrix, ~5 min on an H100
    PYTHONPATH=$PWD python experiments/bench/block_speed.py --kinds full --quant bf16 --compile false
    PYTHONPATH=$PWD python experiments/bench/block_speed.py --device cpu --tiny  # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_speed import Clock  # noqa: E402  (the one CUDA-event / perf_counter clock of the benchmarks)
from policies.osp_next import OSPNextConfig, SequencePlan, SparseGeometry
from policies.osp_next.layout import repeat_per_subsequence, sparse_position_tables
from policies.osp_next.model import OSPNextBlock
from policies.osp_next.rope import rope_angles, rope_tables

KINDS = ("full", "token", "group")
QUANTS = ("bf16", "fp8", "hif8")
GRID_720P = (21, 45, 80)
TINY_GRID = (3, 9, 8)


class OneBlock(nn.Module):
    """A holder with ``.blocks`` so apply_fp8 / apply_hif8 / apply_compile see the same names as in a model."""

    def __init__(self, block: OSPNextBlock) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block])


def block_config(tiny: bool) -> OSPNextConfig:
    if tiny:
        return OSPNextConfig.preset("tiny", dim=64, num_heads=4, ffn_dim=128, text_len=16, num_layers=1)
    return OSPNextConfig.preset("wan2.1-t2v-14b", num_layers=1)


def build_block(config: OSPNextConfig, quant: str, compile_: bool, device: torch.device,
                dtype: torch.dtype) -> OneBlock:
    torch.manual_seed(0)
    holder = OneBlock(OSPNextBlock(config, "full")).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, param in holder.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    if quant == "fp8":
        from policies.quant.fp8 import apply_fp8

        apply_fp8(holder, blocks="all")
    elif quant == "hif8":
        from policies.quant.apply import apply_hif8

        apply_hif8(holder)
    if compile_:
        from policies.compile import apply_compile

        apply_compile(holder)
    return holder


def block_inputs(config: OSPNextConfig, kind: str, grid: tuple[int, int, int], device: torch.device,
                 dtype: torch.dtype) -> tuple[Any, ...]:
    """The block's positional arguments after ``x``, and ``x``, as ``OSPNext._blocks`` builds them (batch 1)."""
    plan, k = SequencePlan(), config.sparse_ratio
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = grid[0] * grid[1] * grid[2]
    x = torch.randn(1, tokens, config.dim, generator=gen, device=device, dtype=dtype)
    context = torch.randn(1, config.text_len, config.dim, generator=gen, device=device, dtype=dtype)
    e = torch.randn(1, 6, config.dim, generator=gen, device=device, dtype=dtype) * 0.1
    angles = rope_angles(grid, config.head_dim, max_seq_len=config.rope_max_seq_len)
    if kind == "full":
        cos, sin = rope_tables(angles[None], device=device)
        return x, (context, e, cos, sin, None, plan.full_attention)
    geometry = SparseGeometry(grid=grid, k=k)
    rope, mask = sparse_position_tables(plan, geometry, {kind}, angles_ND2=angles, batch=1, device=device)
    x = plan.enter_sparse(x, geometry, kind)
    return x, (repeat_per_subsequence(context, k), repeat_per_subsequence(e, k), *rope[kind], mask[kind],
               plan.sparse_attention)


def block_flops(config: OSPNextConfig, kind: str, grid: tuple[int, int, int]) -> float:
    """Forward model FLOPs of one block at batch 1 (see the module docstring)."""
    d, f, L, k = config.dim, config.ffn_dim, config.text_len, config.sparse_ratio
    n = grid[0] * grid[1] * grid[2]
    linears = 2 * n * (4 * d * d + 2 * d * d + 2 * d * f) + 2 * L * 2 * d * d
    if kind == "full":
        self_attn = 4 * n * n * d
    else:
        t, h, w = SparseGeometry(grid=grid, k=k).padded_grid
        n_pad = t * h * w
        self_attn = 4 * n_pad * n_pad * d / (k * k)
        n = n_pad  # the sparse block's cross attention runs on the padded tokens too
    return float(linears + self_attn + 4 * n * L * d)


def time_ms(fn, clock: Clock, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = clock.mark()
        fn()
        end = clock.mark()
        clock.sync()
        times.append(clock.seconds(start, end) * 1000.0)
    return times


def run_row(config: OSPNextConfig, holder: OneBlock, kind: str, grid, args, device, dtype, clock) -> dict[str, Any]:
    block = holder.blocks[0]
    x, rest = block_inputs(config, kind, grid, device, dtype)
    x.requires_grad_(True)
    grad_out = torch.randn_like(x)

    def fwd_bwd() -> None:
        out = block(x, *rest)
        out.backward(grad_out)
        x.grad = None
        for p in holder.parameters():
            p.grad = None

    def fwd() -> None:
        with torch.no_grad():
            block(x, *rest)

    compile_start = time.perf_counter()
    fwd_bwd()  # first call: compiles (if compiled); not timed
    fwd()
    first_call_s = time.perf_counter() - compile_start
    train = time_ms(fwd_bwd, clock, args.warmup, args.iters)
    forward = time_ms(fwd, clock, args.warmup, args.iters)
    flops = block_flops(config, kind, grid)
    ms_train, ms_fwd = statistics.median(train), statistics.median(forward)
    return dict(kind=kind, tokens=int(x.shape[0] * x.shape[1]), seq_per_attention=int(x.shape[1]),
                ms_fwd_bwd=round(ms_train, 2), ms_fwd=round(ms_fwd, 2),
                tflops_fwd_bwd=round(3 * flops / ms_train / 1e9, 1), tflops_fwd=round(flops / ms_fwd / 1e9, 1),
                gflop_fwd=round(flops / 1e9, 1), first_calls_s=round(first_call_s, 1),
                times_fwd_bwd_ms=[round(t, 2) for t in train], times_fwd_ms=[round(t, 2) for t in forward])


def parse_list(value: str, allowed: tuple[str, ...], name: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"--{name} takes a comma list of {','.join(allowed)}, got {value!r}")
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny block and grid (CPU smoke test)")
    parser.add_argument("--kinds", default=",".join(KINDS), type=lambda v: parse_list(v, KINDS, "kinds"))
    parser.add_argument("--quant", default=",".join(QUANTS), type=lambda v: parse_list(v, QUANTS, "quant"))
    parser.add_argument("--compile", default="false,true",
                        type=lambda v: [s == "true" for s in parse_list(v, ("false", "true"), "compile")],
                        help="comma list of false,true: eager and/or apply_compile (default both)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = block_config(args.tiny)
    grid = TINY_GRID if args.tiny else GRID_720P
    clock = Clock(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for quant in args.quant:
        for compile_ in args.compile:
            holder = build_block(config, quant, compile_, device, dtype)
            for kind in args.kinds:
                head = dict(card=card, torch=torch.__version__, quant=quant, compile=compile_, grid=list(grid))
                try:
                    row = {**head, **run_row(config, holder, kind, grid, args, device, dtype, clock)}
                except Exception as err:  # noqa: BLE001  (one failing variant must not cost the others)
                    row = {**head, "kind": kind, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                print(json.dumps(row), flush=True)
            del holder
            if compile_:
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
