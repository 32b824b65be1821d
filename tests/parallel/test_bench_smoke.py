"""The sequence-parallel benchmarks run end to end in their CPU --tiny mode (2 gloo ranks) and report sane numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.parallel.sp_harness import run_ranks

pytestmark = pytest.mark.dist

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_benches(rank: int, world: int, out: str) -> None:
    common = ["--device", "cpu", "--tiny", "--warmup", "0", "--iters", "1"]
    _script("sp_blocks").main(common + ["--backward", "--out", f"{out}/blocks.json"])
    _script("sp_forward").main(common + ["--out", f"{out}/forward.json"])


def test_sp_benches_tiny_cpu(tmp_path):
    run_ranks(_run_benches, 2, str(tmp_path))
    blocks = json.loads((tmp_path / "blocks.json").read_text())
    rows = {(r["resolution"], r["mode"]): r for r in blocks["rows"]}
    # 768p-like grid is native with an even row split: SSP moves exactly a quarter of Ulysses' bytes, both ways.
    ssp, uly = rows[("768p", "ssp")], rows[("768p", "ulysses")]
    for direction in ("forward", "backward"):
        assert ssp[direction]["all_to_all"]["calls"] == 1 and uly[direction]["all_to_all"]["calls"] == 4
        assert 4 * ssp[direction]["all_to_all"]["wire_bytes"] == uly[direction]["all_to_all"]["wire_bytes"] > 0
    assert all(r["seconds"] > 0 and r["compute_seconds"] >= 0 for r in blocks["rows"])

    forward = json.loads((tmp_path / "forward.json").read_text())
    kinds = forward["block_kinds"]
    num_full, num_sparse = kinds.count("full"), len(kinds) - kinds.count("full")
    for row in forward["rows"]:
        if row["mode"].startswith("single"):
            continue
        # fp32 on CPU: the sharded forward reproduces the one-device output.
        assert row["max_rel_error_vs_single"] < 1e-5, row
        a2a = row["collectives"]["all_to_all"]["calls"]
        expected = {"hybrid-ssp": 4 * num_full + num_sparse - 1, "hybrid-ulysses": 4 * len(kinds),
                    "dense-ulysses": 4 * len(kinds)}[row["mode"]]
        assert a2a == expected, (row["mode"], a2a, expected)

    text = _script("sp_projection").main(["--blocks", str(tmp_path / "blocks.json"),
                                          "--forward", str(tmp_path / "forward.json"),
                                          "--out", str(tmp_path / "projection.md")])
    assert text.count("SSP's saving reaches 1.3x") == 2 + 2 * 2  # 2 block + 2x2 forward comparisons
    assert (tmp_path / "projection.md").read_text().strip() == text.strip()
