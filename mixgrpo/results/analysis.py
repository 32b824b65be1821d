"""Read run directories into pandas and answer the usual questions about an RL run.

    run = load_run("runs/quickstart")            # .metrics, .samples, .events (DataFrames), .config (dict)
    runs = load_runs(["runs/a", "runs/b"])       # concatenated, with a `run` column and config.* columns
    runs.metrics.groupby("config.learner.lr")["reward/mean"].mean()
    per_prompt_improvement(run)                  # reward per prompt, first vs last quarter of iterations
    window_breakdown(run)                        # reward/loss by SDE window position
    compare_runs(runs, "reward/mean")            # iteration x run

Everything reads through `mixgrpo.results.runlog.read_parquet`, so it works while the run is still being written.
Schemas: see `mixgrpo.results.runlog`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
from mixgrpo import yaml_load

from mixgrpo.results.runlog import CONFIG_FILE, EVENTS_FILE, METRICS_FILE, SAMPLES_FILE, read_parquet
from mixgrpo.results.tracking import flatten

PathLike = Union[str, os.PathLike]


@dataclass(kw_only=True)
class Run:
    """One run directory, loaded."""

    name: str
    path: Path
    config: dict[str, Any]
    metrics: pd.DataFrame
    samples: pd.DataFrame
    events: pd.DataFrame

    def video(self, relative: str) -> Path:
        """Path of a `samples.video_path` entry (stored relative to the run directory, or absolute)."""
        path = self.path / relative  # an absolute entry stays itself
        if not path.exists() and not Path(relative).is_absolute():
            # runs written before paths were made run-relative stored them relative to the working directory
            # ("runs/x/videos/it..mp4"); the file name still finds the video in this run's videos/
            moved = self.path / "videos" / Path(relative).name
            if moved.exists():
                return moved
        return path


@dataclass(kw_only=True)
class RunSet:
    """Several runs: per-run objects plus concatenated frames carrying `run` and `config.*` columns."""

    runs: list[Run]
    metrics: pd.DataFrame
    samples: pd.DataFrame
    configs: pd.DataFrame  # one row per run (index: run name), flattened config columns

    @property
    def varying(self) -> list[str]:
        """Config columns whose value differs between the runs: what the comparison is about."""
        return [c for c in self.configs.columns if self.configs[c].astype(str).nunique(dropna=False) > 1]

    def configurations(self) -> dict[str, list[Run]]:
        """The runs grouped by configuration: runs that differ only in ``train.seed`` (and in labels that do not change
        training: ``name``, the ``tracking`` section) are seeds of one configuration. Keys are labels made of the
        settings that tell the configurations apart."""
        settings = [c for c in self.varying if not is_seed_or_label(c)]
        groups: dict[str, list[Run]] = {}
        for run in self.runs:
            row = self.configs.loc[run.name]
            label = ", ".join(f"{c.removeprefix('config.')}={row[c]}" for c in settings) or run.config.get("name", "runs")
            groups.setdefault(label, []).append(run)
        return groups

    def aggregate_seeds(self) -> list[Run]:
        """One ``Run`` per configuration whose metrics are the mean over its seeds per iteration, with the spread
        across seeds as ``<metric>@seed_std`` columns (the plots draw it as a band) and ``seeds`` (how many)."""
        return [_mean_over_seeds(label, runs) for label, runs in self.configurations().items()]


SEED_COLUMNS = ("config.train.seed", "config.name")
LABEL_SECTIONS = ("config.tracking.",)
"""Config sections that name or watch a run without changing what it learns (run names, trackers)."""
SEED_STD = "@seed_std"


def is_seed_or_label(column: str) -> bool:
    """Whether a flattened config column may differ between seeds of one configuration."""
    return column in SEED_COLUMNS or column.startswith(LABEL_SECTIONS)


def _mean_over_seeds(label: str, runs: list[Run]) -> Run:
    frames = [r.metrics.set_index("iteration").select_dtypes("number") for r in runs]
    stacked = pd.concat(frames, keys=range(len(frames)), names=["seed_run", "iteration"])
    grouped = stacked.groupby(level="iteration")
    metrics = grouped.mean()
    spread = grouped.std(ddof=1 if len(runs) > 1 else 0).fillna(0.0).add_suffix(SEED_STD)
    metrics = pd.concat([metrics, spread], axis=1)
    metrics["seeds"] = grouped.size().astype(float)  # runs that reached each iteration
    samples = pd.concat([r.samples.assign(run=r.name) for r in runs], ignore_index=True)
    events = pd.concat([r.events for r in runs], ignore_index=True)
    return Run(name=f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})", path=runs[0].path,
               config=runs[0].config, metrics=metrics.reset_index(), samples=samples, events=events)


def read_events(path: PathLike) -> pd.DataFrame:
    """events.jsonl -> DataFrame (time parsed as UTC); a last line still being written is skipped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")[:-1] if path.exists() else []
    # The piece after the last newline is either empty or a line the writer has not finished.
    records = [json.loads(line) for line in lines if line.strip()]
    frame = pd.DataFrame(records) if records else pd.DataFrame({"time": [], "kind": pd.Series([], dtype="str")})
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    return frame


def load_run(path: PathLike, *, name: str | None = None) -> Run:
    """Load a run directory written by `mixgrpo.results.runlog.RunLog` (finished or still running).

    Raises:
        ValueError: `path` is not a run directory; the message names the missing file.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"no run directory at {path}: it does not exist or is not a folder")
    for required in (CONFIG_FILE, METRICS_FILE, SAMPLES_FILE):
        if not (path / required).is_file():
            raise ValueError(
                f"{path} is not a run directory: {required} is missing (a run written by mixgrpo train has "
                f"{CONFIG_FILE}, {METRICS_FILE} and {SAMPLES_FILE}; pass the folder that holds them)"
            )
    config = yaml_load.load_file(path / CONFIG_FILE) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_FILE} holds a {type(config).__name__}, expected a mapping of settings")
    return Run(
        name=name or path.resolve().name,
        path=path,
        config=config,
        metrics=read_parquet(path / METRICS_FILE),
        samples=read_parquet(path / SAMPLES_FILE),
        events=read_events(path / EVENTS_FILE),
    )


def flatten_config(config: Mapping[str, Any], prefix: str = "config") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"config.train.lr": 1e-4}; lists become JSON strings so they group."""
    return {f"{prefix}.{key}": json.dumps(value) if isinstance(value, list) else value
            for key, value in flatten(config).items()}


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def load_runs(paths: Sequence[PathLike | Run] | Mapping[str, PathLike]) -> RunSet:
    """Load several runs (paths, loaded `Run`s, or {name: path}) and concatenate their frames.

    `metrics` and `samples` gain a `run` column (first) and one `config.<section>.<key>` column per setting,
    so runs can be grouped by what differs between them (`RunSet.varying`).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(paths, Mapping):
        runs = [load_run(p, name=n) for n, p in paths.items()]
    else:
        items = list(paths)
        if not items:
            raise ValueError("load_runs needs at least one run directory")
        loose = [Path(p) for p in items if not isinstance(p, Run)]
        names = iter(_unique_names(loose))
        runs = [p if isinstance(p, Run) else load_run(p, name=next(names)) for p in items]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        raise ValueError(f"load_runs got duplicate run names {names}; pass a {{name: path}} mapping instead")
    configs = pd.DataFrame([flatten_config(r.config) for r in runs], index=pd.Index(names, name="run"))

    def stack(frames: list[pd.DataFrame]) -> pd.DataFrame:
        parts = [f.assign(run=r.name) for f, r in zip(frames, runs, strict=True)]
        merged = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        merged = merged[["run", *[c for c in merged.columns if c != "run"]]]
        return merged.join(configs, on="run")

    return RunSet(runs=runs, metrics=stack([r.metrics for r in runs]), samples=stack([r.samples for r in runs]),
                  configs=configs)


def as_runs(runs: Run | RunSet | PathLike | Sequence[Run | PathLike]) -> list[Run]:
    """Normalise what users pass (a run, a RunSet, a path, or a list of runs/paths) to a list of `Run`."""
    if isinstance(runs, RunSet):
        return runs.runs
    if isinstance(runs, Run):
        return [runs]
    if isinstance(runs, (str, os.PathLike)):
        return [load_run(runs)]
    return load_runs(list(runs)).runs


def _as_run(run: Run | PathLike) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def _check_fraction(value: float, name: str) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{name} is the fraction of iterations to average, in (0, 1]; got {value!r}")


def split_iterations(iterations: Sequence[int], first: float, last: float) -> tuple[list[int], list[int]]:
    """The first `first` and last `last` fraction (at least one each) of the sorted unique iterations."""
    _check_fraction(first, "first")
    _check_fraction(last, "last")
    unique = sorted(set(int(i) for i in iterations))
    if not unique:
        return [], []
    n = len(unique)
    return unique[: max(1, math.ceil(first * n))], unique[n - max(1, math.ceil(last * n)):]


def improvement_pct(before: float, after: float) -> float:
    """Relative change in percent of |before| (rewards can be negative); NaN when before is 0 or missing."""
    if not np.isfinite(before) or not np.isfinite(after) or before == 0:
        return float("nan")
    return 100.0 * (after - before) / abs(before)


def per_prompt_improvement(
    run: Run | PathLike, *, first: float = 0.25, last: float = 0.25, reward: str = "reward"
) -> pd.DataFrame:
    """Mean `reward` per prompt over the first vs the last fraction of iterations, best improvement first.

    Returns columns: prompt, n_first, n_last, first, last, delta, improvement_pct. A prompt not drawn in one
    of the two spans has NaN there (prompts are sampled per iteration).
    """
    samples = _as_run(run).samples
    if reward not in samples.columns:
        rewards = [c for c in samples.columns if c == "reward" or c.startswith("reward/")]
        raise ValueError(f"reward={reward!r} is not a samples column; choose one of {rewards}")
    early, late = split_iterations(samples["iteration"], first, last)
    spans = {}
    for span, iterations in (("first", early), ("last", late)):
        rows = samples[samples["iteration"].isin(iterations)]
        stats = rows.groupby("prompt")[reward].agg(["count", "mean"])
        spans[span] = stats.rename(columns={"count": f"n_{span}", "mean": span})
    table = spans["first"].join(spans["last"], how="outer")
    table[["n_first", "n_last"]] = table[["n_first", "n_last"]].fillna(0).astype("int64")
    table["delta"] = table["last"] - table["first"]
    table["improvement_pct"] = [improvement_pct(a, b) for a, b in zip(table["first"], table["last"])]
    table = table.reset_index()[["prompt", "n_first", "n_last", "first", "last", "delta", "improvement_pct"]]
    return table.sort_values("delta", ascending=False, na_position="last", ignore_index=True)


def window_breakdown(run: Run | PathLike) -> pd.DataFrame:
    """Per SDE window start: iterations there, mean reward, loss and update statistics.

    `reward/next_delta` is the mean change of `reward/mean` from that iteration to the next: how much the
    updates made at this window position moved the reward.
    """
    metrics = _as_run(run).metrics.sort_values("iteration")
    if "window/start" not in metrics.columns:
        raise ValueError("metrics.parquet has no 'window/start' column; the run did not log window positions")
    metrics = metrics.assign(**{"reward/next_delta": metrics["reward/mean"].shift(-1) - metrics["reward/mean"]})
    wanted = ["reward/mean", "reward/next_delta", "loss", "clip_fraction", "kl", "ratio/mean", "grad_norm"]
    wanted += [c for c in metrics.columns if c.startswith("reward/") and c.endswith("/mean") and c not in wanted]
    columns = [c for c in wanted if c in metrics.columns]
    table = metrics.groupby("window/start")[columns].mean()
    table.insert(0, "iterations", metrics.groupby("window/start").size())
    table.index = table.index.astype("int64")
    return table


def compare_runs(
    runs: RunSet | Sequence[Run | PathLike], metric: str, *, window: int | None = None
) -> pd.DataFrame:
    """One column per run, indexed by iteration; `window` > 1 applies a trailing rolling mean."""
    loaded = as_runs(runs)
    missing = [r.name for r in loaded if metric not in r.metrics.columns]
    if missing:
        raise ValueError(f"metric {metric!r} is not logged by run(s) {missing}; see mixgrpo.results.runlog for the names")
    if window is not None and window < 1:
        raise ValueError(f"window is a number of iterations >= 1, got {window}")
    table = pd.DataFrame({r.name: r.metrics.set_index("iteration")[metric] for r in loaded})
    table.index.name = "iteration"
    table.columns.name = "run"
    return table.rolling(window, min_periods=1).mean() if window else table


def summarize(run: Run | PathLike, *, fraction: float = 0.25) -> dict[str, Any]:
    """The numbers a report leads with: iterations, reward in the first/last `fraction`, NFE, seconds/iter."""
    run = _as_run(run)
    metrics = run.metrics
    early, late = split_iterations(metrics["iteration"], fraction, fraction)
    reward = metrics.set_index("iteration")["reward/mean"] if "reward/mean" in metrics else pd.Series(dtype=float)
    first = float(reward.loc[early].mean()) if len(reward) else float("nan")
    last = float(reward.loc[late].mean()) if len(reward) else float("nan")

    def mean_of(column: str) -> float:
        return float(metrics[column].mean()) if column in metrics.columns and len(metrics) else float("nan")

    return {
        "run": run.name,
        "iterations": int(len(metrics)),
        "last_iteration": int(metrics["iteration"].max()) if len(metrics) else -1,
        "reward_first": first,
        "reward_last": last,
        "improvement_pct": improvement_pct(first, last),
        "nfe_per_iter": mean_of("nfe"),
        "seconds_per_iter": mean_of("time/total"),
        "samples": int(len(run.samples)),
        "events": int(len(run.events)),
    }
