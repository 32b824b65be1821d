"""What a run did, in a few lines: the held-out attributes before and after, the reward change, the files to open.

Read from the run directory alone (``eval.parquet``, ``metrics.parquet``, ``videos/``), so ``mixgrpo train`` prints
it at its end, writes it to ``<run-dir>/summary.json``, and ``mixgrpo report RUN`` prints it again.

An attribute is a reward component logged in ``eval.parquet`` as ``reward/<reward>/<component>`` (toy_fidelity:
colour, shape, direction). For each, over the held-out prompt x seed samples of the first evaluation (the base,
iteration -1) and of the last one: ``right`` is the fraction of samples whose component score is above
``RIGHT_ABOVE`` (judged right), ``mean`` the mean score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from mixgrpo.results.runlog import EVAL_FILE, METRICS_FILE, atomic_path, read_parquet

SUMMARY_FILE = "summary.json"
RIGHT_ABOVE = 0.5
"""A held-out sample's attribute counts as drawn right when its component score is above this."""
FILES = {"start sheet": "videos/start_sheet.png", "end sheet": "videos/end_sheet.png",
         "reward curve": "reward_curve.png"}


def _float(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """The summary of the run at ``run_dir`` (keys: attributes, eval_reward, train_reward, files)."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"attributes": {}, "eval_reward": None, "train_reward": None, "files": {}}
    if (run_dir / EVAL_FILE).exists():
        evaluation = read_parquet(run_dir / EVAL_FILE)
        if len(evaluation):
            first = evaluation[evaluation["iteration"] == evaluation["iteration"].min()]
            last = evaluation[evaluation["iteration"] == evaluation["iteration"].max()]
            out["eval_iterations"] = [int(first["iteration"].iloc[0]), int(last["iteration"].iloc[0])]
            out["eval_reward"] = {"before": _float(first["reward"].mean()), "after": _float(last["reward"].mean())}
            for column in evaluation.columns:
                parts = column.split("/")
                if len(parts) == 3 and parts[0] == "reward":
                    out["attributes"][parts[2]] = {
                        "right_before": _float((first[column] > RIGHT_ABOVE).mean()),
                        "right_after": _float((last[column] > RIGHT_ABOVE).mean()),
                        "mean_before": _float(first[column].mean()), "mean_after": _float(last[column].mean())}
    if (run_dir / METRICS_FILE).exists():
        metrics = read_parquet(run_dir / METRICS_FILE)
        if len(metrics) and "reward/mean" in metrics.columns:
            out["train_reward"] = {"first": _float(metrics["reward/mean"].iloc[0]),
                                   "last": _float(metrics["reward/mean"].iloc[-1])}
    out["files"] = {name: str(run_dir / rel) for name, rel in FILES.items() if (run_dir / rel).is_file()}
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as the lines printed at the end of a run."""
    lines = []
    if summary["attributes"]:
        first, last = summary.get("eval_iterations", [None, None])
        before = "the base" if first == -1 else f"iteration {first}"
        lines.append(f"held-out samples drawn right (component > {RIGHT_ABOVE}), {before} -> after {last + 1} "
                     "iterations:")
        for name, a in summary["attributes"].items():
            lines.append(f"  {name:<10} {_pct(a['right_before']):>5} -> {_pct(a['right_after']):<5} "
                         f"(mean score {_num(a['mean_before'])} -> {_num(a['mean_after'])})")
    if summary["eval_reward"]:
        r = summary["eval_reward"]
        lines.append(f"held-out reward {_num(r['before'])} -> {_num(r['after'])}")
    if summary["train_reward"]:
        r = summary["train_reward"]
        lines.append(f"training reward, first -> last iteration: {_num(r['first'])} -> {_num(r['last'])}")
    for name, path in summary["files"].items():
        lines.append(f"{name}: {path}")
    return lines


def write_summary(run_dir: str | Path) -> list[str]:
    """Write ``<run_dir>/summary.json`` and return the summary's lines."""
    summary = run_summary(run_dir)
    with atomic_path(Path(run_dir) / SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary_lines(summary)
