"""DiT forward speed: hybrid OSP-Next (dual_end, 8 full blocks, k=2) vs the same weights with full attention.

Wan2.1-14B shapes, random bf16 weights, batch 1, 81 frames (21 latent frames), text length 512:

    720P: latent 21x90x160 -> patch grid 21x45x80 (sparse blocks pad H to 48)
    768P: latent 21x96x160 -> patch grid 21x48x80 (no padding)

Both layouts run on one model instance (``set_layout``), so the weights are identical. Timing: warmup, then the
median of ``--iters`` forwards measured with CUDA events. ``--profile`` adds one forward per row split into
attention kernels, Skiparse rearrangement copies, linears and RoPE (CUDA events around each call; the rest is
norms, modulation, casts and the head). ``--device cpu --tiny`` runs a small model for smoke tests.

``--compile-from-policy`` times each row twice in one process on the same weights: eager, then after
``policies.compile.apply_compile`` (the training path's regional compile, not this script's ``--compile``), and
prints one JSON line per (row, compile). ``--layouts osp-next`` skips the full-attention layout:

    PYTHONPATH=$PWD python experiments/bench/dit_speed.py --resolutions 720p --layouts osp-next --compile-from-policy

    PYTHONPATH=$PWD python experiments/bench/dit_speed.py --iters 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import torch
from torch import nn

import policies.osp_next.model as model_module
from policies.osp_next import OSPNext, OSPNextConfig, SequencePlan

RESOLUTIONS = {"720p": (21, 90, 160), "768p": (21, 96, 160)}
TINY_RESOLUTIONS = {"720p": (3, 18, 16), "768p": (3, 16, 16)}  # padded / native grid, like the real ones
HYBRID = dict(layout="dual_end", num_full_blocks=8, sparse_ratio=2)
LAYOUTS = {"full": dict(layout="full"), "osp-next": HYBRID}


class Clock:
    """Wall-clock intervals: CUDA events on GPU (read after one sync), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Breakdown:
    """Accumulates time per category from (start, end) marks taken around calls."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.spans: list[tuple[str, Any, Any]] = []

    def wrap(self, category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.clock.mark()
            out = fn(*args, **kwargs)
            self.spans.append((category, start, self.clock.mark()))
            return out

        return timed

    def totals(self) -> dict[str, float]:
        self.clock.sync()
        out: dict[str, float] = defaultdict(float)
        for category, start, end in self.spans:
            out[category] += self.clock.seconds(start, end)
        return dict(out)


@contextmanager
def instrumented(model: OSPNext, breakdown: Breakdown) -> Iterator[None]:
    """Time attention kernels, layout changes, linears and RoPE of ``model`` while inside the block."""
    plan = model.sequence_plan
    timed_plan = SequencePlan()
    for name in ("full_attention", "sparse_attention"):
        setattr(timed_plan, name, breakdown.wrap("attention", getattr(plan, name)))
    for name in ("enter_sparse", "switch", "leave_sparse"):
        setattr(timed_plan, name, breakdown.wrap("rearrange", getattr(plan, name)))
    saved = (model_module.apply_rope, model_module.attention)
    model_module.apply_rope = breakdown.wrap("rope", saved[0])
    model_module.attention = breakdown.wrap("attention", saved[1])
    starts: dict[int, Any] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(lambda m, _: starts.__setitem__(id(m), breakdown.clock.mark())))
            hooks.append(module.register_forward_hook(
                lambda m, _i, _o: breakdown.spans.append(("linear", starts[id(m)], breakdown.clock.mark()))))
    model.sequence_plan = timed_plan
    try:
        yield
    finally:
        model.sequence_plan = plan
        model_module.apply_rope, model_module.attention = saved
        for hook in hooks:
            hook.remove()


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> OSPNext:
    """Random weights (std 0.02, norms at 1) allocated directly on the device: no checkpoint, no CPU copy."""
    if args.tiny:
        config = OSPNextConfig.preset("tiny", num_layers=10, dim=64, num_heads=4, ffn_dim=128, text_len=16,
                                      attention_backend=args.backend)
    else:
        config = OSPNextConfig.preset("wan2.1-t2v-14b", attention_backend=args.backend)
    with torch.device("meta"):
        model = OSPNext(config).to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    if args.compile:
        for block in model.blocks:
            block.compile()  # one graph per block shape, shared by all blocks (same code, params as inputs)
    return model.eval()


def make_inputs(config: OSPNextConfig, latent_thw: tuple[int, int, int], device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(1, config.in_channels, *latent_thw, generator=generator, device=device, dtype=dtype)
    timesteps = torch.full((1,), 500.0, device=device)
    text = torch.randn(1, config.text_len, config.text_dim, generator=generator, device=device, dtype=dtype)
    return latents, timesteps, text


@torch.inference_mode()
def time_forward(model: OSPNext, inputs: tuple[torch.Tensor, ...], clock: Clock, warmup: int,
                 iters: int) -> list[float]:
    for _ in range(warmup):
        model(*inputs)
    times = []
    for _ in range(iters):
        start = clock.mark()
        model(*inputs)
        end = clock.mark()
        clock.sync()
        times.append(clock.seconds(start, end))
    return times


@torch.inference_mode()
def profile_forward(model: OSPNext, inputs: tuple[torch.Tensor, ...], clock: Clock) -> dict[str, float]:
    breakdown = Breakdown(clock)
    with instrumented(model, breakdown):
        start = clock.mark()
        model(*inputs)
        end = clock.mark()
    totals = breakdown.totals()
    totals["total"] = clock.seconds(start, end)
    totals["other"] = totals["total"] - sum(v for k, v in totals.items() if k != "total")
    return totals


@torch.inference_mode()
def attention_kernels(device: torch.device, dtype: torch.dtype, clock: Clock, grid: tuple[int, int, int] = (21, 45, 80),
                      heads: int = 40) -> dict[str, Any]:
    """Masked sparse self-attention of one 720P block ([4, 20160, 40, 128], real Skiparse padding mask): error and
    time of each backend vs SDPA given the boolean mask."""
    import torch.nn.functional as F

    from policies.osp_next.attention import attention
    from policies.osp_next.skiparse import padded_grid, skiparse_rearrange, valid_mask

    mask = skiparse_rearrange(valid_mask(grid, 2, device=device)[None], padded_grid(grid, 2), "token", 2)
    generator = torch.Generator(device=device).manual_seed(2)
    q, k, v = (torch.randn(4, mask.shape[1], heads, 128, generator=generator, device=device, dtype=dtype)
               for _ in range(3))

    def masked_sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask[:, None, None, :]).transpose(1, 2)

    candidates = {"sdpa_bool_mask": masked_sdpa, "sdpa_unmasked": lambda: attention(q, k, v, backend="sdpa")}
    for backend in ("sdpa", "varlen", "flash"):
        candidates[backend] = lambda backend=backend: attention(q, k, v, key_mask=mask, backend=backend)
    reference = masked_sdpa()
    report = {}
    for name, fn in candidates.items():
        try:
            out = fn()
            start = clock.mark()
            for _ in range(3):
                fn()
            end = clock.mark()
            clock.sync()
            report[name] = dict(ms=clock.seconds(start, end) / 3 * 1000,
                                max_abs_diff=(out - reference).abs().max().item())
        except (ValueError, RuntimeError) as err:
            report[name] = dict(error=str(err)[:200])
        print(f"attention kernel {name:15s} {report[name]}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small model and grids (CPU smoke test)")
    parser.add_argument("--resolutions", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--backend", default="auto", help="attention backend (auto, flash, varlen, sdpa, math)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--compile-from-policy", action="store_true",
                        help="eager, then policies.compile.apply_compile, in one process (one JSON line each)")
    parser.add_argument("--compile-backend", default="inductor", help="apply_compile's backend (tests: eager)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--profile", action="store_true", help="one extra forward per row, split by category")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.compile and args.profile:
        parser.error("--profile times eager calls; run it without --compile")
    if args.compile and args.compile_from_policy:
        parser.error("--compile-from-policy compiles through policies.compile itself; drop --compile")

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    clock = Clock(device)
    kernels = attention_kernels(device, dtype, clock) if device.type == "cuda" and not args.tiny else {}
    model = build_model(args, device, dtype)
    if args.compile_from_policy:
        rows = eager_vs_policy_compile(model, args, device, dtype, clock)
        report(rows, args, device, kernels)
        return
    try:
        rows = run_rows(model, args, device, dtype, clock)
    except Exception as err:  # noqa: BLE001  (a compile failure must not cost the eager numbers)
        if not args.compile:
            raise
        print(f"torch.compile failed ({type(err).__name__}: {str(err)[:300]}); rerunning eager", flush=True)
        torch._dynamo.reset()
        for block in model.blocks:
            block._compiled_call_impl = None
        args.compile = False
        rows = run_rows(model, args, device, dtype, clock)
    report(rows, args, device, kernels)


def run_rows(model: OSPNext, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
             clock: Clock) -> list[dict[str, Any]]:
    shapes = TINY_RESOLUTIONS if args.tiny else RESOLUTIONS
    rows = []
    for resolution in args.resolutions:
        inputs = make_inputs(model.config, shapes[resolution], device, dtype)
        grid = model.patch_grid(inputs[0])
        for name in args.layouts:
            layout = LAYOUTS[name]
            model.set_layout(**layout)
            times = time_forward(model, inputs, clock, args.warmup, args.iters)
            row = dict(resolution=resolution, layout=name, grid=list(grid), tokens=grid[0] * grid[1] * grid[2],
                       median_s=statistics.median(times), times_s=times)
            print(f"{resolution} {name:9s} median {row['median_s']:.3f} s  ({', '.join(f'{t:.3f}' for t in times)})",
                  flush=True)
            if args.profile:
                row["profile_s"] = profile_forward(model, inputs, clock)
                print("  profile " + ", ".join(f"{k} {v:.3f}" for k, v in row["profile_s"].items()), flush=True)
            rows.append(row)
    return rows


def eager_vs_policy_compile(model: OSPNext, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                            clock: Clock) -> list[dict[str, Any]]:
    """Every row eager, then every row after the training path's ``apply_compile``; one JSON line per row."""
    from policies.compile import apply_compile

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for mode in ("eager", "policy"):
        if mode == "policy":
            stats = apply_compile(model, backend=args.compile_backend)
        for row in run_rows(model, args, device, dtype, clock):
            row["compile"] = mode
            if mode == "policy":
                row["compile_s"] = stats.seconds
            rows.append(row)
            print(json.dumps(dict(card=card, **{k: v for k, v in row.items() if k != "profile_s"})), flush=True)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device,
           kernels: dict[str, Any]) -> None:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{card}, torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"compile={args.compile}, backend={args.backend}, warmup={args.warmup}, iters={args.iters}")
    print("| resolution | grid (T x H x W) | full attention (s) | OSP-Next hybrid (s) | speedup |")
    print("|---|---|---|---|---|")
    by_key = {(r["resolution"], r["layout"]): r for r in rows if r.get("compile", "eager") == "eager"}
    summary = []
    for resolution in args.resolutions:
        if (resolution, "full") not in by_key or (resolution, "osp-next") not in by_key:
            continue
        full, hybrid = by_key[(resolution, "full")], by_key[(resolution, "osp-next")]
        ratio = full["median_s"] / hybrid["median_s"]
        summary.append(dict(resolution=resolution, speedup=ratio))
        grid = "x".join(map(str, full["grid"]))
        print(f"| {resolution} | {grid} | {full['median_s']:.3f} | {hybrid['median_s']:.3f} | {ratio:.2f}x |")
    if args.profile:
        categories = ["attention", "linear", "rearrange", "rope", "other", "total"]
        print("\n| resolution | layout | " + " | ".join(f"{c} (s)" for c in categories) + " |")
        print("|---|---|" + "---|" * len(categories))
        for row in rows:
            prof = row["profile_s"]
            print(f"| {row['resolution']} | {row['layout']} | "
                  + " | ".join(f"{prof.get(c, 0.0):.3f}" for c in categories) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(card=card, torch=torch.__version__, rows=rows, summary=summary, args=vars(args),
                           attention_kernels=kernels), handle, indent=2)


if __name__ == "__main__":
    main()
