"""What a toy-world run changed: the base against the run's last checkpoint, per attribute and per colour.

Both policies draw deterministic ODE samples (the sampler of ``mixgrpo sample``) for the same captions and seeds:
the 36 training captions and the 12 held-out ones, ``--repeats`` seeds each. Printed per policy: the mean
``toy_fidelity`` total and attribute scores, then per asked colour the colour score and how many videos came out
in each palette colour (the palette colour nearest the object's fitted colour).

    mixgrpo train --run-dir runs/quickstart
    python experiments/bench/toy_eval.py runs/quickstart
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mixgrpo.engine.checkpoint import list_checkpoints, verify_checkpoint
from mixgrpo.config import ExperimentConfig, load_config
from mixgrpo.engine.policy_factory import build_policy
from mixgrpo.engine.rollout import generate
from policies.toy.world import COLOURS, eval_prompts, parse_caption, train_prompts
from rewards.toy_fidelity import ToyFidelityReward, background_checkerboard, foreground_alpha


def score_samples(policy, cfg: ExperimentConfig, prompts: list[str], *, seed: int) -> dict[str, torch.Tensor]:
    """Per-video ``toy_fidelity`` breakdown of ODE samples, plus ``drawn_colour`` (index into ``COLOURS``)."""
    videos = generate(policy, cfg, prompts, seed=seed, device=torch.device("cpu"))
    scores = ToyFidelityReward().breakdown(videos, prompts)
    colour_BC, _ = foreground_alpha(videos)
    scores["drawn_colour"] = torch.cdist(colour_BC, torch.tensor(list(COLOURS.values()))).argmin(dim=1)
    scores["checkerboard"] = background_checkerboard(videos)
    return scores


def colour_table(scores: dict[str, torch.Tensor], prompts: list[str]) -> list[str]:
    names = list(COLOURS)
    asked = torch.tensor([names.index(parse_caption(p).colour) for p in prompts])
    lines = []
    for index, name in enumerate(names):
        rows = asked == index
        drawn = scores["drawn_colour"][rows]
        counts = ", ".join(f"{other} {int((drawn == j).sum())}" for j, other in enumerate(names))
        lines.append(f"  asked {name:<7} colour score {float(scores['colour'][rows].mean()):.2f}  drawn: {counts}"
                     f"  (of {int(rows.sum())})")
    return lines


def last_intact_checkpoint(run_dir: Path) -> Path:
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        if verify_checkpoint(path) is None:
            return path
    raise ValueError(f"{run_dir} has no intact checkpoint under checkpoints/; pass a finished run of mixgrpo train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a toy-world run directory written by mixgrpo train")
    parser.add_argument("--repeats", type=int, default=3, help="seeds per caption")
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    config_file = args.run_dir / "config.yaml"
    if not config_file.is_file():
        parser.error(f"{config_file} does not exist; pass a run directory written by mixgrpo train")
    cfg = load_config(config_file)
    if cfg.policy.kind != "toy":
        parser.error(f"{args.run_dir} trained policy.kind={cfg.policy.kind!r}; this script evaluates toy-world runs")
    checkpoint = last_intact_checkpoint(args.run_dir)
    prompts = train_prompts() * args.repeats + eval_prompts() * args.repeats
    results = {}
    for label, ckpt in (("base", None), (f"after {checkpoint.name}", checkpoint)):
        policy = build_policy(cfg, device="cpu", checkpoint=ckpt)
        scores = results[label] = score_samples(policy, cfg, prompts, seed=args.seed)
        means = "  ".join(f"{k} {float(scores[k].mean()):.3f}" for k in ("total", "colour", "shape", "direction"))
        print(f"{label}: {means}  background checkerboard {float(scores['checkerboard'].mean()):.4f}")
        print("\n".join(colour_table(scores, prompts)), flush=True)
    base, after = results.values()
    problems = verdict(base, after, prompts)
    print("verdict: " + ("no colour worse than the base, no artefact" if not problems else "; ".join(problems)))


ARTEFACT_TOLERANCE = 0.002
"""Checkerboard strength (mean |coefficient| on background blocks, pixel units) the trained policy may add to the
base's: a visible 2x2 pattern is ~0.01 and up; sampling noise moves the mean by ~0.0005."""


def verdict(base: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prompts: list[str]) -> list[str]:
    """What the run made worse: a colour drawn right less often than by the base (and with a lower colour score),
    or a background checkerboard stronger than the base's by more than ``ARTEFACT_TOLERANCE``."""
    names = list(COLOURS)
    asked = torch.tensor([names.index(parse_caption(p).colour) for p in prompts])
    problems = []
    for index, name in enumerate(names):
        rows = asked == index
        right_base = int((base["drawn_colour"][rows] == index).sum())
        right_after = int((after["drawn_colour"][rows] == index).sum())
        if right_after < right_base and float(after["colour"][rows].mean()) < float(base["colour"][rows].mean()):
            problems.append(f"{name} worse than the base ({right_after} right, base {right_base})")
    added = float(after["checkerboard"].mean() - base["checkerboard"].mean())
    if added > ARTEFACT_TOLERANCE:
        problems.append(f"background checkerboard +{added:.4f} over the base's")
    return problems


if __name__ == "__main__":
    main()
