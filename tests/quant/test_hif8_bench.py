"""Smoke test of the GPU benchmark script in its CPU tiny mode: every row runs and the numbers are sane."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "hif8_overhead.py"


def test_hif8_overhead_tiny_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("hif8_overhead", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out_json = tmp_path / "hif8.json"
    rc = bench.main(["--device", "cpu", "--tiny", "--iters", "1", "--warmup", "0", "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    results = json.loads(out_json.read_text())
    assert set(results["timing"]) == {"bf16", "hif8_torch", "fp8_scaled_mm"}
    assert all(r["ms"] > 0 for r in results["timing"].values())
    assert len(results["snr_db"]) == 30  # weight, input and grad_output of the ten linears
    for key, snr in results["snr_db"].items():
        # 3 mantissa bits with per-tensor scaling give ~25-32 dB on Gaussian data; a broken quantizer does not.
        assert 15 < snr["hif8"] < 45 and 15 < snr["fp8"] < 45, (key, snr)
    assert "hif8_torch" in printed and "W ffn.2" in printed
