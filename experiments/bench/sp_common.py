"""Shared pieces of the sequence-parallel benchmarks (sp_blocks.py, sp_forward.py): process-group setup, model
construction, timing across ranks, and replaying recorded collectives to time communication alone.

Launch: ``torchrun --nproc-per-node N experiments/bench/sp_*.py`` (NCCL on GPUs, NVLink multicast off), or
``--device cpu --tiny`` (gloo) for smoke tests; the scripts' ``main(argv)`` also runs inside an existing group.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from policies.osp_next import OSPNext, OSPNextConfig
from policies.parallel.comm import CommLog, _all_gather_base, _reduce_scatter_base

# Latent shapes (T, H, W) of 81-frame videos; patch (1, 2, 2) -> patch grids 21x45x80 (720P, sparse blocks pad H
# to 48) and 21x48x80 (768P, native).
RESOLUTIONS = {"720p": (21, 90, 160), "768p": (21, 96, 160)}
TINY_RESOLUTIONS = {"720p": (3, 18, 16), "768p": (3, 16, 16)}  # padded / native, like the real ones
SPARSE_RATIO = 2


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small model and grids (CPU smoke test)")
    parser.add_argument("--resolutions", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (rank 0)")


def setup(device_kind: str) -> tuple[int, int, torch.device]:
    """Join (or reuse) the default process group; one GPU per local rank."""
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu --tiny for a smoke run")
    # A rank that hangs in a collective prints where it is when torchrun's timeout terminates it.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    device = torch.device("cpu")
    if device_kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        # NVLink SHARP (multicast) stays off: it needs fabric-manager support the lent machines don't promise.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        # Binding the device up front stops NCCL from guessing it per group (it warns that a guess can hang).
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo",
                                device_id=device if device_kind == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def model_config(*, tiny: bool, layout: Any, num_layers: int, num_full_blocks: int = 0) -> OSPNextConfig:
    """Wan2.1-14B shapes (dim 5120, 40 heads, ffn 13824, text 512) or a tiny stand-in, with ``num_layers``."""
    fields = dict(num_layers=num_layers, layout=layout, sparse_ratio=SPARSE_RATIO)
    if layout == "dual_end":
        fields["num_full_blocks"] = num_full_blocks
    if tiny:
        return OSPNextConfig.preset("tiny", dim=32, num_heads=4, ffn_dim=64, **fields)
    return OSPNextConfig.preset("wan2.1-t2v-14b", **fields)


def build_model(config: OSPNextConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> OSPNext:
    """Random weights, identical on every rank (same seed, same device type), built directly on ``device``."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 40-layer fp32 copy would not fit next to it
    try:
        with torch.device(device):
            model = OSPNext(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return torch.float32 if args.device == "cpu" else torch.bfloat16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *, warmup: int, iters: int,
          group: dist.ProcessGroup | None = None) -> float:
    """Median seconds per call of the slowest rank of ``group`` (ranks start each call together)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        sync(device)
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    elapsed = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return float(elapsed.item())


def replay_seconds(log: CommLog, device: torch.device, dtype: torch.dtype, *, warmup: int, iters: int,
                   group: dist.ProcessGroup | None = None) -> tuple[float, dict[str, float]]:
    """Time the recorded collectives alone: every (collective, call) re-issued with the same byte count as one
    flat tensor over ``group``. Returns (total seconds, seconds per collective kind).

    The plans call collectives synchronously on the compute stream, so block time = compute + this.
    """
    world = dist.get_world_size(group)
    element = torch.tensor([], dtype=dtype).element_size()
    calls = []
    for row in log.rows():
        if row["calls"] == 0:
            continue
        per_call = row["payload_bytes"] // row["calls"] // element
        calls += [(row["collective"], per_call)] * row["calls"]
    # Uneven shards give ranks slightly different sizes; every rank must issue the same sizes, so take the max.
    numels = torch.tensor([n for _, n in calls] or [0], dtype=torch.int64, device=device)
    dist.all_reduce(numels, op=dist.ReduceOp.MAX, group=group)
    calls = [(kind, int(n)) for (kind, _), n in zip(calls, numels.tolist())]
    buffers = {}
    for kind, numel in calls:
        numel = max(world, numel - numel % world)
        buffers.setdefault((kind, numel), torch.zeros(numel, dtype=dtype, device=device))

    def issue(kind: str, numel: int) -> None:
        numel = max(world, numel - numel % world)
        x = buffers[(kind, numel)]
        if kind == "all_to_all":
            dist.all_to_all_single(torch.empty_like(x), x, group=group)
        elif kind == "all_gather":
            _all_gather_base(x.new_empty(numel * world), x, group=group)
        elif kind == "reduce_scatter":
            _reduce_scatter_base(x.new_empty(numel // world), x, group=group)
        else:
            dist.all_reduce(x, group=group)

    per_kind = {}
    for kind in sorted({k for k, _ in calls}):
        mine = [(k, n) for k, n in calls if k == kind]
        per_kind[kind] = timed(lambda: [issue(*c) for c in mine], device, warmup=warmup, iters=iters, group=group)
    return sum(per_kind.values()), per_kind


def comm_table(log: CommLog, direction: str | None = "forward") -> dict[str, dict[str, int]]:
    """Bytes and calls per collective kind (all scopes), for printing and JSON."""
    out: dict[str, dict[str, int]] = {}
    for row in log.rows():
        if direction is not None and row["direction"] != direction:
            continue
        entry = out.setdefault(row["collective"], {"calls": 0, "payload_bytes": 0, "wire_bytes": 0})
        for key in ("calls", "payload_bytes", "wire_bytes"):
            entry[key] += row[key]
    return out


def write_json(path: Path | None, payload: dict) -> None:
    """Rank 0 writes ``payload`` atomically (tmp file, then rename)."""
    if path is None or dist.get_rank() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def log0(*parts: Any) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)
