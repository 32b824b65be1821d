"""Time per sparse block: SSP vs Ulysses, Wan2.1-14B shapes (dim 5120, 40 heads, ffn 13824), 720P and 768P.

One sparse OSP-Next block (group pattern, fed from the token pattern, i.e. a block in the middle of the sparse
stack) on N ranks, two ways:

- ``ssp``: S = min(N, k*k) ranks hold whole subsequences (U = N / S for the rest): the pattern switch is ONE
  all-to-all of the hidden state, attention is local (or Ulysses over U when N > k*k);
- ``ulysses``: S = 1, U = N: every rank holds all subsequences for 1/N of the rows; the switch is local and
  attention does Ulysses' four all-to-alls (q, k, v, o).

Per mode it reports the block time (switch + block, the slowest rank's median), the collectives' calls and bytes
from ``record_comm`` (per rank: payload handed to the collective, and wire bytes actually sent to other ranks),
the time of those collectives alone (replayed with the same sizes), and the derived compute time. The all-to-all
replay also gives the measured link bandwidth, which ``sp_projection.py`` starts from.

    torchrun --nproc-per-node 4 experiments/bench/sp_blocks.py --out runs/bench/sp_blocks_4gpu.json
    torchrun --nproc-per-node 2 experiments/bench/sp_blocks.py --device cpu --tiny      # smoke test (gloo)

``--backward`` times forward + backward (activation gradients and parameter gradients of the block).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sp_common import (  # noqa: E402
    RESOLUTIONS, SPARSE_RATIO, TINY_RESOLUTIONS, add_common_args, build_model, comm_table, dtype_of, log0,
    model_config, replay_seconds, setup, timed, write_json,
)

from policies.osp_next.layout import SparseGeometry, repeat_per_subsequence, sparse_position_tables  # noqa: E402
from policies.osp_next.rope import rope_angles  # noqa: E402
from policies.parallel import apply_sequence_parallel  # noqa: E402
from policies.parallel.comm import record_comm  # noqa: E402


def mode_sizes(mode: str, world: int) -> tuple[int, int]:
    """(ssp_size, ulysses_size) of a mode on ``world`` ranks."""
    if mode == "ulysses":
        return 1, world
    ssp = min(world, SPARSE_RATIO**2)
    if world % ssp:
        raise ValueError(f"ssp mode needs the number of ranks ({world}) to be a multiple of {ssp}")
    return ssp, world // ssp


def bench_mode(mode: str, latent: tuple[int, int, int], args, world: int, device, dtype) -> dict:
    ssp, ulysses = mode_sizes(mode, world)
    config = model_config(tiny=args.tiny, layout=["group"], num_layers=1)
    model = build_model(config, device, dtype)
    groups = apply_sequence_parallel(model, ssp_size=ssp, ulysses_size=ulysses)
    plan, block, k = model.sequence_plan, model.blocks[0], config.sparse_ratio
    grid = (latent[0], latent[1] // 2, latent[2] // 2)
    geometry = SparseGeometry(grid=grid, k=k)
    plan.begin(grid)
    gen = torch.Generator(device=device).manual_seed(1)
    x_full = torch.randn(args.batch, grid[0] * grid[1] * grid[2], config.dim, device=device, dtype=dtype,
                         generator=gen)
    x_token = plan.enter_sparse(x_full, geometry, "token").contiguous()
    del x_full
    rope, mask = sparse_position_tables(plan, geometry, {"group"}, batch=args.batch, device=device,
                                        angles_ND2=rope_angles(grid, config.head_dim,
                                                               max_seq_len=config.rope_max_seq_len))
    context = plan.shard_batch(repeat_per_subsequence(
        torch.randn(args.batch, config.text_len, config.dim, device=device, dtype=dtype, generator=gen), k))
    e = plan.shard_batch(repeat_per_subsequence(
        torch.randn(args.batch, 6, config.dim, device=device, dtype=dtype, generator=gen), k))
    if args.backward:
        block.requires_grad_(True)
        x_token.requires_grad_(True)

    def step() -> None:
        plan.begin(grid)  # restart the per-block accounting labels
        with torch.set_grad_enabled(args.backward):
            y = plan.switch(x_token, geometry, "token", "group")
            y = block(y, context, e, *rope["group"], mask["group"], plan.sparse_attention)
            if args.backward:
                y.float().sum().backward()

    with record_comm() as log:
        step()
    seconds = timed(step, device, warmup=args.warmup, iters=args.iters)
    comm_seconds, comm_by_kind = replay_seconds(log, device, dtype, warmup=1, iters=args.iters)
    a2a = comm_table(log, direction=None).get("all_to_all", {"wire_bytes": 0})
    del model, block, plan
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "ssp_size": ssp, "ulysses_size": ulysses, "groups_sp_size": groups.sizes.sp_size,
        "seconds": seconds, "comm_seconds": comm_seconds, "compute_seconds": max(seconds - comm_seconds, 0.0),
        "comm_seconds_by_kind": comm_by_kind,
        "forward": comm_table(log, "forward"), "backward": comm_table(log, "backward"),
        "wire_bytes": sum(r["wire_bytes"] for r in log.rows()),
        "link_GBps": (a2a["wire_bytes"] / comm_by_kind["all_to_all"] / 1e9) if comm_by_kind.get("all_to_all") else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--modes", nargs="+", default=["ssp", "ulysses"], choices=["ssp", "ulysses"])
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    args = parser.parse_args(argv)
    rank, world, device = setup(args.device)
    dtype = dtype_of(args)
    table = TINY_RESOLUTIONS if args.tiny else RESOLUTIONS
    results = {"world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype), "batch": args.batch, "backward": args.backward, "rows": []}
    for name in args.resolutions:
        for mode in args.modes:
            row = {"resolution": name, "latent": table[name], "mode": mode,
                   **bench_mode(mode, table[name], args, world, device, dtype)}
            results["rows"].append(row)
            fwd = row["forward"]
            collectives = "  ".join(f"{kind}: {v['calls']} calls {v['wire_bytes'] / 1e6:.2f} MB wire"
                                    for kind, v in fwd.items())
            log0(f"{name:5s} {mode:8s} S={row['ssp_size']} U={row['ulysses_size']}  "
                 f"block {row['seconds'] * 1e3:9.2f} ms  comm {row['comm_seconds'] * 1e3:8.2f} ms  "
                 f"compute {row['compute_seconds'] * 1e3:9.2f} ms  {collectives}")
        by_mode = {r["mode"]: r for r in results["rows"] if r["resolution"] == name}
        if {"ssp", "ulysses"} <= set(by_mode):
            s, u = by_mode["ssp"], by_mode["ulysses"]
            log0(f"{name:5s} ssp/ulysses wire bytes {s['wire_bytes'] / max(u['wire_bytes'], 1):.3f}, "
                 f"block speedup {u['seconds'] / s['seconds']:.3f}x")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
