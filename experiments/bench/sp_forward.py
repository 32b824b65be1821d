"""Whole DiT forward on N ranks: hybrid OSP-Next with SSP vs Ulysses vs full attention, Wan2.1-14B shapes.

Modes (one model, random bf16 weights identical on every rank; ``--layers`` keeps runs short, default 10 layers
with 2 full blocks: the release's 8 full / 32 sparse ratio):

- ``single-dense`` / ``single-hybrid``: one GPU (rank 0), full attention / hybrid layout;
- ``dense-ulysses``: full attention in every block, Ulysses over all N ranks;
- ``hybrid-ulysses``: hybrid layout, Ulysses in every block (sparse blocks: S = 1, U = N);
- ``hybrid-ssp``: hybrid layout, SSP in sparse blocks (S = min(N, k*k), U = N / S) + Ulysses in full blocks.

Per mode: median forward seconds (slowest rank), speedup vs the single-GPU run of the same layout, the bytes and
calls per collective from ``record_comm`` (per rank), the time of those collectives alone (replayed), and the
largest deviation of the output from the single-GPU output (bf16: expect ~1e-2 relative).

    torchrun --nproc-per-node 4 experiments/bench/sp_forward.py --out runs/bench/sp_forward_4gpu.json
    torchrun --nproc-per-node 2 experiments/bench/sp_forward.py --device cpu --tiny   # smoke test (gloo)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sp_common import (  # noqa: E402
    RESOLUTIONS, SPARSE_RATIO, TINY_RESOLUTIONS, add_common_args, build_model, comm_table, dtype_of, log0,
    model_config, replay_seconds, setup, timed, write_json,
)

from policies.parallel import apply_sequence_parallel, record_comm, remove_sequence_parallel  # noqa: E402

MODES = ["single-dense", "single-hybrid", "dense-ulysses", "hybrid-ulysses", "hybrid-ssp"]


def mode_setup(mode: str, world: int) -> tuple[str, tuple[int, int] | None]:
    """(layout, (ssp_size, ulysses_size) or None for one GPU)."""
    layout = "full" if "dense" in mode else "dual_end"
    if mode.startswith("single"):
        return layout, None
    if mode.endswith("ulysses"):
        return layout, (1, world)
    ssp = min(world, SPARSE_RATIO**2)
    return layout, (ssp, world // ssp)


def inputs(config, latent, batch: int, device, dtype):
    gen = torch.Generator(device=device).manual_seed(7)
    latents = torch.randn(batch, config.in_channels, *latent, device=device, dtype=dtype, generator=gen)
    timesteps = torch.full((batch,), 500.0, device=device)
    text = torch.randn(batch, config.text_len, config.text_dim, device=device, dtype=dtype, generator=gen)
    return latents, timesteps, text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--full-blocks", type=int, default=2, help="dual_end full blocks (half at each end)")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.set_defaults(warmup=1, iters=3)
    args = parser.parse_args(argv)
    rank, world, device = setup(args.device)
    dtype = dtype_of(args)
    solo = dist.new_group([0])  # the one-GPU runs (collective: every rank creates it)
    config = model_config(tiny=args.tiny, layout="dual_end", num_layers=args.layers, num_full_blocks=args.full_blocks)
    model = build_model(config, device, dtype)
    table = TINY_RESOLUTIONS if args.tiny else RESOLUTIONS
    results = {"world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype), "batch": args.batch, "layers": args.layers, "full_blocks": args.full_blocks,
               "block_kinds": config.block_kinds(), "rows": []}
    for name in args.resolutions:
        x = inputs(config, table[name], args.batch, device, dtype)
        reference: dict[str, torch.Tensor] = {}
        for mode in args.modes:
            layout, sizes = mode_setup(mode, world)
            model.set_layout(layout, num_full_blocks=args.full_blocks, sparse_ratio=SPARSE_RATIO)
            row = {"resolution": name, "latent": table[name], "mode": mode, "layout": layout}
            if sizes is None:
                if rank == 0:
                    with torch.no_grad():
                        reference[layout] = model(*x).float()
                        row["seconds"] = timed(lambda: model(*x), device, warmup=args.warmup, iters=args.iters,
                                               group=solo)
                dist.barrier()
            else:
                apply_sequence_parallel(model, ssp_size=sizes[0], ulysses_size=sizes[1])
                with torch.no_grad(), record_comm() as log:
                    out = model(*x).float()
                with torch.no_grad():
                    row["seconds"] = timed(lambda: model(*x), device, warmup=args.warmup, iters=args.iters)
                comm_seconds, by_kind = replay_seconds(log, device, dtype, warmup=1, iters=args.iters)
                remove_sequence_parallel(model)
                row.update(ssp_size=sizes[0], ulysses_size=sizes[1], comm_seconds=comm_seconds,
                           comm_seconds_by_kind=by_kind, compute_seconds=max(row["seconds"] - comm_seconds, 0.0),
                           collectives=comm_table(log, "forward"),
                           wire_bytes=sum(v["wire_bytes"] for v in comm_table(log, "forward").values()))
                if layout in reference:
                    ref = reference[layout]
                    row["max_rel_error_vs_single"] = float((out - ref).abs().max() / ref.abs().max())
            results["rows"].append(row)
            report(row, results["rows"])
        del x
    write_json(args.out, results)
    return results


def report(row: dict, rows: list[dict]) -> None:
    if "seconds" not in row:
        return
    single = next((r for r in rows if r["resolution"] == row["resolution"] and r["mode"].startswith("single")
                   and r["layout"] == row["layout"] and "seconds" in r), None)
    line = f"{row['resolution']:5s} {row['mode']:15s} {row['seconds'] * 1e3:10.1f} ms"
    if single is not None and single is not row:
        line += f"  ({single['seconds'] / row['seconds']:.2f}x vs one GPU)"
    if "collectives" in row:
        line += f"  comm {row['comm_seconds'] * 1e3:.1f} ms  " + "  ".join(
            f"{kind}: {v['calls']} calls {v['wire_bytes'] / 1e6:.1f} MB" for kind, v in row["collectives"].items())
    if "max_rel_error_vs_single" in row:
        line += f"  max rel err {row['max_rel_error_vs_single']:.1e}"
    log0(line)


if __name__ == "__main__":
    main()
