"""Smoke tests of the block speed benchmark in its CPU tiny mode (the real numbers come from the GPU)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_speed_tiny_prints_one_json_line_per_variant(capsys):
    bench = _load("block_speed")
    bench.main(["--device", "cpu", "--tiny", "--kinds", "full,token", "--quant", "bf16,hif8", "--compile", "false",
                "--warmup", "0", "--iters", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["kind"], r["quant"], r["compile"]) for r in rows] == [
        ("full", "bf16", False), ("token", "bf16", False), ("full", "hif8", False), ("token", "hif8", False)]
    for row in rows:
        assert "error" not in row, row
        assert row["ms_fwd_bwd"] > 0 and row["ms_fwd"] > 0
    # tiny grid 3x9x8: the sparse block pads H to 12 and attends within 4 subsequences of 72 tokens
    assert rows[0]["seq_per_attention"] == 216 and rows[1]["seq_per_attention"] == 72


def test_block_flops_at_14b_720p():
    bench = _load("block_speed")
    config = bench.block_config(tiny=False)
    n, d, L = 75_600, 5120, 512
    linear_per_token = 2 * (6 * d * d + 2 * d * 13824)
    assert linear_per_token / 1e9 == pytest.approx(0.598, abs=1e-3)  # the 0.60 GFLOP per token per block
    full = bench.block_flops(config, "full", bench.GRID_720P)
    assert full == pytest.approx(n * linear_per_token + 2 * L * 2 * d * d + 4 * n * n * d + 4 * n * L * d)
    n_pad = 21 * 48 * 80
    sparse = bench.block_flops(config, "token", bench.GRID_720P)
    assert sparse == bench.block_flops(config, "group", bench.GRID_720P)
    assert sparse == pytest.approx(n * linear_per_token + 2 * L * 2 * d * d + n_pad**2 * d + 4 * n_pad * L * d)


def test_block_speed_rejects_unknown_quant():
    bench = _load("block_speed")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--tiny", "--quant", "int4"])


def test_iteration_scaling_passes_compile_and_quantization_overrides_through(tmp_path, capsys):
    from mixgrpo.config import load_config

    bench = _load("iteration_scaling")
    import argparse

    args = argparse.Namespace(preset="tiny", layout="dual_end", full_blocks=2, frames=5, height=64, width=64,
                              device="cpu", checkpointing=True, steps=4, cfg=5.0, window=2, sp=1, prompts=4,
                              group=2, batch=2, micro_batch=2, optimizer_steps=1, warmup=0, iters=1,
                              extra=["policy.compile=true", "policy.quantization=hif8",
                                     "policy.gradient_checkpointing=false"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\nd\n")
    cfg = load_config("quickstart", bench.overrides(args, 2, prompts))
    assert cfg.policy.compile is True and cfg.policy.quantization == "hif8"
    assert cfg.policy.gradient_checkpointing in (False, "none")  # the positional override wins over the script's
    # MFU columns: taken from the trainer's metrics rows where present, '-' where not
    rows = [{"perf/mfu/rollout": 0.4, "perf/mfu/update": 0.3, "time/rollout": 1.0, "time/update": 1.0}]
    assert bench.phase_mfu(rows, cfg, 1) == {"perf/mfu/rollout": 0.4, "perf/mfu/update": 0.3}
    row = dict(gpus=1, workers=1, sp=1, seconds_per_iteration=2.0, rollout_s=1.0, reward_s=0.1, update_s=0.9,
               busy_share=None, peak_allocated_gib=1.0, mfu_rollout=0.4, mfu_update=None, compile=True,
               quantization="hif8", preset="tiny", video="5x64x64", steps=4, window=2, videos=8)
    bench.print_table([row])
    line = capsys.readouterr().out.splitlines()[-1]
    assert "40.0%" in line and line.rstrip().endswith("True/hif8") and " - " in line
