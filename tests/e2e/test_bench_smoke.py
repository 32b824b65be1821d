"""The Mix-GRPO benchmark scripts run end to end in their CPU smoke modes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_iteration_time_tiny_prints_every_requested_variant():
    out = subprocess.run(
        [sys.executable, "experiments/bench/iteration_time.py", "--device", "cpu", "--tiny",
         "--variants", "dance_grpo,flash_star"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("dance_grpo", "flash_star"))}
    assert set(rows) == {"dance_grpo", "flash_star"}
    # Flash* samples fewer post-window steps than DanceGRPO's all-SDE rollout: its NFE column is smaller.
    assert float(rows["flash_star"][3]) < float(rows["dance_grpo"][3])


def test_toy_variants_trains_each_variant_and_scores_them_on_common_samples(tmp_path):
    table = tmp_path / "toy_variants.md"
    subprocess.run(
        [sys.executable, "experiments/bench/toy_variants.py", "--iterations", "1", "--variants", "dance_grpo,flash_star",
         "--out", str(table), "rollout.prompts_per_iteration=2", "rollout.group_size=2"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    )
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line}
    assert {"base (no RL)", "dance_grpo", "flash_star"} <= set(rows)
    # columns: s/iter, NFE, trained steps, training reward, eval total, colour, shape, direction
    assert float(rows["flash_star"][1]) < float(rows["dance_grpo"][1])  # fewer model calls per video
    assert int(rows["dance_grpo"][2]) > int(rows["flash_star"][2])  # DanceGRPO trains 60% of all steps
    for name in ("base (no RL)", "dance_grpo", "flash_star"):
        assert 0.0 <= float(rows[name][4]) <= 1.0


def test_toy_eval_compares_base_and_last_checkpoint_per_colour(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "mixgrpo", "train", "train.iterations=1", "train.num_videos=0",
                    "rollout.prompts_per_iteration=2", "rollout.group_size=2", "--run-dir", str(run)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    out = subprocess.run([sys.executable, "experiments/bench/toy_eval.py", str(run), "--repeats", "1"],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=600).stdout
    heads = [line for line in out.splitlines() if not line.startswith("  ")]
    assert heads[0].startswith("base: total") and heads[1].startswith("after iter_000001: total")
    colour_rows = [line for line in out.splitlines() if line.startswith("  asked")]
    assert len(colour_rows) == 8  # 4 colours x 2 policies
    assert all(line.endswith("(of 12)") for line in colour_rows)  # 48 captions, 12 per colour

    bad = subprocess.run([sys.executable, "experiments/bench/toy_eval.py", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "config.yaml does not exist" in bad.stderr
