"""Toy-world reward reached by each iteration-time variant after the same number of iterations (CPU).

``iteration_time.py`` times DanceGRPO, MixGRPO, Flash and Flash* on a large policy; this script checks that the
faster variants do not buy their speed by learning less. Each variant post-trains the shipped toy base from the
quickstart config for ``--iterations`` iterations (same prompts, seeds, group size, learning rate), with its
sampler and window mapped onto the toy's ``sampler.num_steps`` steps:

  dance_grpo   SDE on every step, train a random 60% of them
  mixgrpo      the quickstart's window (progressive), Euler elsewhere (the quickstart itself runs Flash)
  flash        the quickstart's window, DPM-Solver++ 2M after it on 40% of the steps
  flash_star   the quickstart's window size frozen at step 0, DPM-Solver++ 2M after it on 20% of the steps

Then every final policy, and the base, is scored on the same deterministic ODE samples (``mixgrpo sample``'s
sampler): the 36 training captions x 2 seeds and the 12 held-out captions x 4 seeds. Columns: seconds per
iteration on this machine, rollout NFE per video, trained steps, training reward (first -> last quarter, from
the SDE rollouts, so not comparable across variants), and the common evaluation (total and per attribute).

    python experiments/bench/toy_variants.py                       # 36 iterations each, about 15 min on 2 cores
    python experiments/bench/toy_variants.py --iterations 2 --variants mixgrpo,flash_star  # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixgrpo.results.analysis import load_run
from mixgrpo.cli import quickstart_path
from mixgrpo.config import ExperimentConfig, load_config
from mixgrpo.driver.trainer import Trainer, generate
from policies.toy.world import eval_prompts, train_prompts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_eval import score_samples  # noqa: E402

VARIANTS = ("dance_grpo", "mixgrpo", "flash", "flash_star")


def variant_overrides(name: str, base: ExperimentConfig) -> list[str]:
    """Config overrides that turn the quickstart into ``name`` (window sizes relative to the toy's steps)."""
    sde_steps = base.sampler.num_steps - 1  # the last step lands on sigma = 0 and is never stochastic
    euler = ["sampler.post_window=euler", "sampler.post_window_ratio=1.0"]
    if name == "dance_grpo":
        return ["window.kind=frozen", "window.start=0", f"window.size={sde_steps}", "window.train_fraction=0.6", *euler]
    if name == "mixgrpo":
        return euler
    if name == "flash":
        return ["sampler.post_window=dpm2m", "sampler.post_window_ratio=0.4"]
    if name == "flash_star":
        return ["window.kind=frozen", "window.start=0", "sampler.post_window=dpm2m", "sampler.post_window_ratio=0.2"]
    raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")


def evaluate(policy, cfg: ExperimentConfig) -> dict[str, float]:
    """Mean toy_fidelity (total and per attribute) of deterministic ODE samples on fixed prompts and seeds."""
    prompts = train_prompts() * 2 + eval_prompts() * 4
    scores = score_samples(policy, cfg, prompts, seed=10_000)
    return {k: float(scores[k].mean()) for k in ("total", "colour", "shape", "direction")}


def quarter_means(run_dir: Path) -> tuple[float, float]:
    reward = load_run(run_dir).metrics["reward/mean"].to_numpy()
    q = max(1, len(reward) // 4)
    return float(reward[:q].mean()), float(reward[-q:].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=36)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("overrides", nargs="*", help="quickstart overrides applied to every variant")
    args = parser.parse_args()
    names = args.variants.split(",")
    common = [*args.overrides, f"train.iterations={args.iterations}", "train.num_videos=0", "train.device=cpu"]
    try:  # every variant's config is built before the first run, so a typo fails in seconds
        for name in names:
            load_config(quickstart_path(), [*common, *variant_overrides(name, load_config(quickstart_path(), common))])
    except ValueError as exc:
        parser.error(str(exc))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_cfg = load_config(quickstart_path(), common)
        base_trainer = Trainer(base_cfg, run_dir=Path(tmp) / "base")
        rows.append({"variant": "base (no RL)", **evaluate(base_trainer.workers.worker.policy, base_cfg)})
        for name in names:
            cfg = load_config(quickstart_path(), [*common, *variant_overrides(name, base_cfg)])
            trainer = Trainer(cfg, run_dir=Path(tmp) / name)
            start = time.perf_counter()
            trainer.run()
            seconds = (time.perf_counter() - start) / args.iterations
            metrics = load_run(trainer.run_dir).metrics
            first, last = quarter_means(trainer.run_dir)
            rows.append({"variant": name, "s_per_iter": seconds, "nfe": float(metrics["nfe"].mean()),
                         "trained": int(trainer.window.train_mask(1).sum()), "train_first": first, "train_last": last,
                         **evaluate(trainer.workers.worker.policy, cfg)})
            print(f"{name}: done, {seconds:.2f} s/iteration", flush=True)
    lines = [f"toy world, {args.iterations} iterations per variant, {torch.get_num_threads()} CPU threads",
             "",
             "| variant | s / iteration | NFE / video | trained steps | training reward, first -> last quarter "
             "| eval total | colour | shape | direction |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        timing = (f"{r['s_per_iter']:.2f} | {r['nfe']:.1f} | {r['trained']} | "
                  f"{r['train_first']:.3f} -> {r['train_last']:.3f}") if "s_per_iter" in r else " | | | "
        lines.append(f"| {r['variant']} | {timing} | {r['total']:.3f} | {r['colour']:.3f} | {r['shape']:.3f} "
                     f"| {r['direction']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
