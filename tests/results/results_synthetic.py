"""A tiny synthetic run directory, written with RunLog itself, for the analysis/report/notebook tests."""

import numpy as np
import torch

from mixgrpo.results.media import contact_sheet, write_mp4
from mixgrpo.results.runlog import RunLog

PROMPTS = ("a red ball bouncing", "a blue cube sliding", "a green bar rotating")
# Per-prompt reward trend per iteration: the third prompt gets worse, so improvement signs are testable.
TRENDS = (0.05, 0.02, -0.03)


def write_synthetic_run(path, *, iterations=12, lr=1e-4, videos=True, seed=0, tracking=None):
    rng = np.random.default_rng(seed)
    log = RunLog(path)
    log.write_config({"name": "synthetic", "train": {"lr": lr, "iterations": iterations, "seed": seed},
                      "window": {"size": 2, "kind": "progressive"}, "rewards": [{"name": "toy"}, {"name": "motion"}],
                      **({"tracking": tracking} if tracking else {})})
    for it in range(iterations):
        rows = []
        for g, (prompt, trend) in enumerate(zip(PROMPTS, TRENDS)):
            for s in range(2):
                toy = 0.5 + trend * it + 0.001 * rng.standard_normal() + 0.01 * seed
                row = {"iteration": it, "prompt": prompt, "group": g, "seed": 1000 * it + g, "sample": s,
                       "reward/toy": toy, "reward/motion": 0.2, "reward": toy + 0.2, "advantage": s - 0.5}
                if videos and it == iterations - 1:
                    video = torch.full((4, 3, 8, 8), 0.1 + 0.4 * s)
                    video[:, g, 2:6, 2:6] = 1.0
                    row["video_path"] = write_mp4(log.video_path(it, prompt, s), video, fps=4)
                rows.append(row)
        log.log_samples(rows)
        rewards = np.array([r["reward"] for r in rows])
        log.log_metrics({
            "iteration": it, "reward/mean": rewards.mean(), "reward/std": rewards.std(),
            "reward/toy/mean": rewards.mean() - 0.2, "reward/motion/mean": 0.2, "loss": 1.0 / (1 + it),
            "kl": 0.01 * it, "clip_fraction": 0.1, "ratio/first_step": 1.0, "window/start": it % 4,
            "window/size": 2, "nfe": 20, "time/total": 1.5, "advantage/std": 0.5,
        })
    if videos:  # evaluation videos as the trainer writes them: outside samples.parquet
        evals = [torch.full((3, 3, 8, 8), 0.2 * (i + 1)) for i in range(2)]
        write_mp4(path / "videos" / "end_00_eval.mp4", evals[0], fps=4)
        contact_sheet(evals, ["eval 0", "eval 1"], path / "videos" / "end_sheet.png")
    log.event("warning", message="synthetic run")
    log.close()
    return path
