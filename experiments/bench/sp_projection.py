"""Project SSP's saving over Ulysses to slower links, from measured bytes and compute times.

Model (per rank; the plans issue collectives synchronously on the compute stream, so nothing overlaps):

    time(bw) = compute_seconds + wire_bytes / bw

``compute_seconds`` = measured time - replayed collective time, ``wire_bytes`` = bytes each rank sends to other
ranks (``record_comm``), both from ``sp_blocks.py`` / ``sp_forward.py`` JSON. The first bandwidth column is the
measured one (all-to-all wire bytes / replayed all-to-all time on the benchmark machine, NVLink on H100 boxes);
the others are 50, 25 and 12.5 GB/s per rank (PCIe- and Ethernet-class links). For each comparison it also solves
``time_ulysses(bw) = 1.3 * time_ssp(bw)`` for the bandwidth below which SSP is at least 1.3x faster:

    bw* = (b_u - 1.3 b_s) / (1.3 a_s - a_u)     (a = compute seconds, b = wire bytes)

    python experiments/bench/sp_projection.py --blocks runs/bench/sp_blocks_4gpu.json \\
        --forward runs/bench/sp_forward_4gpu.json [--out runs/bench/sp_projection_4gpu.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

BANDWIDTHS_GBPS = (50.0, 25.0, 12.5)
TARGET = 1.3


def project(row: dict, bw_GBps: float) -> float:
    return row["compute_seconds"] + row["wire_bytes"] / (bw_GBps * 1e9)


def crossover_GBps(ssp: dict, ulysses: dict, target: float = TARGET) -> float:
    """Bandwidth (GB/s) below which ulysses/ssp time >= target; inf = at any bandwidth, 0 = never."""
    gain = ulysses["wire_bytes"] - target * ssp["wire_bytes"]
    deficit = target * ssp["compute_seconds"] - ulysses["compute_seconds"]
    if deficit <= 0:
        return math.inf if gain >= 0 else 0.0
    if gain <= 0:
        return 0.0
    return gain / deficit / 1e9


def comparison(title: str, ssp: dict, other: dict, measured_GBps: float | None) -> list[str]:
    bandwidths = ([measured_GBps] if measured_GBps else []) + list(BANDWIDTHS_GBPS)
    head = " | ".join(f"{bw:.3g} GB/s" + (" (measured)" if i == 0 and measured_GBps else "")
                      for i, bw in enumerate(bandwidths))
    lines = [f"### {title}", "",
             f"| | compute ms | wire MB/rank | measured ms | {head} |",
             "|---|---|---|---|" + "---|" * len(bandwidths)]
    for name, row in (("SSP", ssp), ("other", other)):
        cells = " | ".join(f"{project(row, bw) * 1e3:.1f} ms" for bw in bandwidths)
        lines.append(f"| {name} ({row['mode']}) | {row['compute_seconds'] * 1e3:.1f} | {row['wire_bytes'] / 1e6:.1f} | "
                     f"{row['seconds'] * 1e3:.1f} | {cells} |")
    cells = " | ".join(f"{project(other, bw) / project(ssp, bw):.2f}x" for bw in bandwidths)
    lines.append(f"| speedup of SSP | | {other['wire_bytes'] / max(ssp['wire_bytes'], 1):.2f}x fewer bytes | "
                 f"{other['seconds'] / ssp['seconds']:.2f}x | {cells} |")
    bw = crossover_GBps(ssp, other)
    verdict = ("at every bandwidth" if math.isinf(bw) else "at no bandwidth" if bw == 0
               else f"at {bw:.3g} GB/s per rank and below")
    lines += ["", f"SSP's saving reaches {TARGET}x {verdict}.", ""]
    return lines


def block_report(data: dict) -> list[str]:
    lines = [f"## Sparse block ({data['device']}, {data['world']} ranks, {data['dtype']}, "
             f"{'forward+backward' if data.get('backward') else 'forward'})", ""]
    for resolution in dict.fromkeys(r["resolution"] for r in data["rows"]):
        rows = {r["mode"]: r for r in data["rows"] if r["resolution"] == resolution}
        if {"ssp", "ulysses"} <= set(rows):
            measured = rows["ssp"].get("link_GBps") or rows["ulysses"].get("link_GBps")
            lines += comparison(f"{resolution}: SSP vs Ulysses sparse block", rows["ssp"], rows["ulysses"], measured)
    return lines


def forward_report(data: dict, measured: float | None) -> list[str]:
    lines = [f"## Whole forward ({data['device']}, {data['world']} ranks, {data['layers']} layers)", ""]
    for resolution in dict.fromkeys(r["resolution"] for r in data["rows"]):
        rows = {r["mode"]: r for r in data["rows"] if r["resolution"] == resolution and "wire_bytes" in r}
        if "hybrid-ssp" not in rows:
            continue
        for other in ("hybrid-ulysses", "dense-ulysses"):
            if other in rows:
                lines += comparison(f"{resolution}: hybrid-ssp vs {other}", rows["hybrid-ssp"], rows[other], measured)
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=Path, nargs="*", default=[], help="sp_blocks.py JSON files")
    parser.add_argument("--forward", type=Path, nargs="*", default=[], help="sp_forward.py JSON files")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    if not args.blocks and not args.forward:
        parser.error("give at least one --blocks or --forward JSON file")
    lines: list[str] = []
    measured = None
    for path in args.blocks:
        data = json.loads(path.read_text())
        lines += block_report(data)
        links = [r["link_GBps"] for r in data["rows"] if r.get("link_GBps")]
        measured = measured or (max(links) if links else None)
    for path in args.forward:
        lines += forward_report(json.loads(path.read_text()), measured)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out)
    return text


if __name__ == "__main__":
    main()
