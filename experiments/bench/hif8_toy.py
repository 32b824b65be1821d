"""Toy-world Mix-GRPO with and without HiF8 fake quantization: does an 8-bit run learn as much?

Runs the quickstart twice from the same base and seeds, once as is and once with ``policy.quantization=hif8``
(the ten linears of every block and Q/K/V quantized in rollouts and updates alike), then prints each run's reward
gain (mean of the last quarter of iterations over the first quarter) and the ratio of the gains, and plots both
reward curves. Goal of issue 06: the HiF8 run reaches at least 90% of the full-precision run's gain.

    python experiments/bench/hif8_toy.py --out runs/hif8_toy [key=value ...]   # extra overrides go to both runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixgrpo.results.analysis import load_run
from mixgrpo.cli import quickstart_path
from mixgrpo.config import load_config
from mixgrpo.results.plots import plot_reward_curves
from mixgrpo.driver.trainer import train


def quarter_gain(run_dir: Path) -> tuple[float, float, float]:
    rewards = load_run(run_dir).metrics["reward/mean"]
    quarter = max(1, len(rewards) // 4)
    first, last = float(rewards[:quarter].mean()), float(rewards[-quarter:].mean())
    return first, last, last - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/hif8_toy")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to both runs")
    args = parser.parse_args()
    out = Path(args.out)
    rows = {}
    for name, quant in (("full_precision", "none"), ("hif8", "hif8")):
        cfg = load_config(quickstart_path(), [*args.overrides, f"policy.quantization={quant}", f"name={name}"])
        run_dir = out / name
        train(cfg, run_dir=run_dir)
        rows[name] = quarter_gain(run_dir)
    plot_reward_curves([out / "full_precision", out / "hif8"], out / "reward_curves.png")
    print(f"{'run':<16} {'first 25%':>10} {'last 25%':>10} {'gain':>8}")
    for name, (first, last, gain) in rows.items():
        print(f"{name:<16} {first:10.4f} {last:10.4f} {gain:+8.4f}")
    base_gain = rows["full_precision"][2]
    if base_gain > 0:
        print(f"HiF8 gain / full-precision gain = {rows['hif8'][2] / base_gain:.2f} (goal >= 0.90)")
    else:
        print("the full-precision run did not gain reward; the ratio is undefined")
    print(f"curves: {out / 'reward_curves.png'}")


if __name__ == "__main__":
    main()
