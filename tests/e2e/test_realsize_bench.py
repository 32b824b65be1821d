import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "realsize_iteration.py"


@pytest.mark.slow
def test_realsize_iteration_tiny_runs_every_phase_on_cpu():
    spec = importlib.util.spec_from_file_location("realsize_iteration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--tiny", "--steps", "2"])
    assert set(out["time"]) == {"text", "rollout", "decode", "reward", "update"}
    assert all(seconds > 0 for seconds in out["time"].values())
    assert out["flops"]["rollout"] > 0 and out["flops"]["update"] > 0
    assert out["mfu"] == {} and out["peak_memory_gib"] is None  # no MFU on CPU
    # Scores of 2 videos plus one uint8 5 x 3 x 32 x 32 sample video, pickled: the sample dominates.
    assert 5 * 3 * 32 * 32 < out["driver_bytes"] < 5 * 3 * 32 * 32 + 4096
