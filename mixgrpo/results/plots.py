"""PNG plots of runs. Each helper draws on its own Agg figure (no pyplot state, safe in notebooks and
workers), writes the file atomically and returns its path.

    plot_reward_curves([run_a, run_b], "rewards.png")     # one line per run, one panel per reward (+ components)
    plot_per_prompt_improvement(per_prompt_improvement(run), "prompts.png")
    plot_window_breakdown(window_breakdown(run), "window.png")
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mixgrpo.results.analysis import SEED_STD, Run, RunSet, as_runs
from mixgrpo.results.runlog import atomic_path

Panel = Union[str, tuple[str, Sequence[str]]]
"""One panel of `plot_curves`: a metric name, or (title, metric names) drawn together in one panel."""

LINESTYLES = ("-", "--", ":", "-.")

DIAGNOSTICS = ("loss", "kl", "clip_fraction", "ratio/first_step", "advantage/std", "zero_std_fraction",
               "grad_norm", "time/total")


def default_window(num_iterations: int) -> int:
    """Rolling-mean width: a tenth of the run, so the trend shows without hiding the last iterations, and at
    least 2 whenever the run has 2 iterations (a mean of one point is no mean: short runs get one too)."""
    return min(num_iterations, max(2, num_iterations // 10)) if num_iterations >= 2 else 1


def reward_metrics(runs: Sequence[Run]) -> list[str]:
    """`reward/mean` then each `reward/<name>/mean` logged by any of the runs (components: `reward_components`)."""
    components = {c for columns in reward_components(runs).values() for c in columns}
    names = {c for r in runs for c in r.metrics.columns if c.startswith("reward/") and c.endswith("/mean")}
    return ["reward/mean", *sorted(names - components - {"reward/mean"})]


def reward_components(runs: Sequence[Run]) -> dict[str, list[str]]:
    """`reward/<name>/mean` -> its component columns `reward/<name>/<component>/mean`, for rewards that
    logged components (`Reward.score_with_details`); sorted by reward, then component."""
    columns = {c for r in runs for c in r.metrics.columns}
    groups: dict[str, list[str]] = {}
    for column in sorted(columns):
        if not (column.startswith("reward/") and column.endswith("/mean")):
            continue
        parent, _, component = column.removesuffix("/mean").rpartition("/")
        # The parent must be a logged reward: this tells a component from a reward whose name holds a '/'.
        if parent != "reward" and component.isidentifier() and f"{parent}/mean" in columns:
            groups.setdefault(f"{parent}/mean", []).append(column)
    return groups


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _new_figure(width: float, height: float) -> Figure:
    # Fixed margins (set by the callers) instead of a layout engine: constrained/tight layout draws every
    # figure twice, which doubles report time for no visible gain on these regular grids.
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _series(run: Run, metric: str) -> pd.Series | None:
    """The metric per iteration without NaN, or None when the run did not log it."""
    if metric not in run.metrics.columns:
        return None
    series = run.metrics.set_index("iteration")[metric].dropna()
    return None if series.empty else series


def _spread(run: Run, metric: str) -> pd.Series | None:
    """The band around ``metric``: its spread across seeds (an aggregated run), else the batch std the run logged
    next to a ``.../mean`` column (``reward/std`` for ``reward/mean``)."""
    for column in (f"{metric}{SEED_STD}", f"{metric.removesuffix('/mean')}/std" if metric.endswith("/mean") else ""):
        if column and column in run.metrics.columns:
            return run.metrics.set_index("iteration")[column]
    return None


def _draw(ax, series: pd.Series, *, colour: str, style: str, label: str, window: int | None,
          spread: pd.Series | None = None) -> None:
    """Raw values faint with a mean +- std band when the spread is known, trailing rolling mean bold."""
    width = window or default_window(len(series))
    if spread is not None:
        band = spread.reindex(series.index).fillna(0.0)
        ax.fill_between(series.index, series - band, series + band, color=colour, alpha=0.12, linewidth=0)
    ax.plot(series.index, series.values, color=colour, alpha=0.3, linewidth=1, linestyle=style)
    smooth = series.rolling(width, min_periods=1).mean()
    ax.plot(smooth.index, smooth.values, color=colour, linewidth=2, linestyle=style, label=label)


def _short_metric(metric: str) -> str:
    """Legend label of a metric in a shared panel: its last name part ('reward/toy/colour/mean' -> 'colour')."""
    return metric.removesuffix("/mean").rpartition("/")[2]


def plot_curves(
    runs: Run | RunSet | Sequence[Run | str | os.PathLike],
    metrics: Sequence[Panel],
    path: str | os.PathLike,
    *,
    window: int | None = None,
    title: str | None = None,
) -> Path:
    """One panel per metric, one colour per run: raw values faint, trailing rolling mean bold.

    A `(title, [metric, ...])` entry draws several metrics in one panel, one colour per metric and one line
    style per run, with a legend. Metrics a run did not log are skipped for that run; a panel nobody logged
    says so.
    """
    loaded = as_runs(runs)
    if not metrics:
        raise ValueError("plot_curves needs at least one metric name")
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig = _new_figure(4.2 * cols, 2.8 * rows + 0.4)
    fig.subplots_adjust(left=0.8 / (4.2 * cols), right=1 - 0.2 / (4.2 * cols), bottom=0.55 / (2.8 * rows + 0.4),
                        top=1 - 0.75 / (2.8 * rows + 0.4), wspace=0.3, hspace=0.55)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(loaded))]
    for ax, panel in zip(axes, metrics):
        shared = not isinstance(panel, str)
        panel_title, names = panel if shared else (panel, [panel])
        drawn = False
        for run_index, (run, run_colour) in enumerate(zip(loaded, colours)):
            for metric_index, metric in enumerate(names):
                series = _series(run, metric)
                if series is None:
                    continue
                if shared:  # colour tells the metrics apart; line style the runs
                    label = _short_metric(metric) + (f" ({run.name})" if len(loaded) > 1 else "")
                    _draw(ax, series, colour=f"C{metric_index % 10}", style=LINESTYLES[run_index % len(LINESTYLES)],
                          label=label, window=window, spread=_spread(run, metric))
                else:
                    _draw(ax, series, colour=run_colour, style="-", label=run.name, window=window,
                          spread=_spread(run, metric))
                drawn = True
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")
        elif shared:
            ax.legend(fontsize=7)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if len(loaded) > 1:
        axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_reward_curves(
    runs: Run | RunSet | Sequence[Run | str | os.PathLike], path: str | os.PathLike, *, window: int | None = None
) -> Path:
    """Aggregate reward and each reward plugin's mean per iteration, with a rolling mean; one line per run.

    Rewards that logged component scores get one more panel each, after the per-reward panels, with their
    components drawn together (one panel per component would multiply the panels for little gain).
    """
    loaded = as_runs(runs)
    panels: list[Panel] = [*reward_metrics(loaded)]
    panels += [(f"{parent.removesuffix('/mean')} components", columns)
               for parent, columns in reward_components(loaded).items()]
    return plot_curves(loaded, panels, path, window=window,
                       title="reward (bold: rolling mean; band: std over the batch, or over seeds)")


def plot_diagnostics(
    runs: Run | RunSet | Sequence[Run | str | os.PathLike], path: str | os.PathLike, *, window: int | None = None
) -> Path:
    """Update health: loss, KL, clip fraction, first-step ratio, advantage spread, zero-std groups, time."""
    loaded = as_runs(runs)
    present = [m for m in DIAGNOSTICS if any(m in r.metrics.columns for r in loaded)]
    return plot_curves(loaded, present or ["loss"], path, window=window, title="update diagnostics")


def _short(text: str, width: int = 48) -> str:
    return textwrap.shorten(str(text), width=width, placeholder="...")


def plot_per_prompt_improvement(table: pd.DataFrame, path: str | os.PathLike, *, top: int = 30) -> Path:
    """Horizontal bars of `delta` (last - first mean reward) per prompt, from `per_prompt_improvement`.

    With more than `top` prompts, the best and worst `top // 2` are shown.
    """
    missing = {"prompt", "delta"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks columns {sorted(missing)}; pass the output of per_prompt_improvement(run)")
    rows = table.dropna(subset=["delta"]).sort_values("delta", ascending=False)
    if len(rows) > top:
        rows = pd.concat([rows.head(top // 2), rows.tail(top - top // 2)])
    labels = [_short(p) for p in rows["prompt"]]
    label_in = 0.3 + 0.065 * max((len(label) for label in labels), default=0)  # ~8 pt characters
    height = 1.1 + 0.3 * max(len(rows), 1)
    fig = _new_figure(6.0 + label_in, height)
    fig.subplots_adjust(left=label_in / (6.0 + label_in), right=0.97, bottom=0.6 / height, top=1 - 0.35 / height)
    ax = fig.subplots()
    if rows.empty:
        ax.text(0.5, 0.5, "no prompt appears in both the first and the last iterations", ha="center",
                transform=ax.transAxes, color="grey")
    positions = np.arange(len(rows))[::-1]
    colours = ["tab:green" if d >= 0 else "tab:red" for d in rows["delta"]]
    ax.barh(positions, rows["delta"], color=colours)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("reward change, last vs first iterations")
    ax.set_title("per-prompt improvement")
    return _save(fig, path)


def plot_window_breakdown(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Bars per SDE window start: mean reward, reward change after the update, and loss (if logged)."""
    if "reward/mean" not in table.columns:
        raise ValueError("table lacks 'reward/mean'; pass the output of window_breakdown(run)")
    panels = [c for c in ("reward/mean", "reward/next_delta", "loss", "clip_fraction") if c in table.columns]
    fig = _new_figure(3.6 * len(panels), 3.0)
    fig.subplots_adjust(left=0.8 / (3.6 * len(panels)), right=0.98, bottom=0.18, top=0.88, wspace=0.35)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, column in zip(axes, panels):
        ax.bar(table.index.astype(str), table[column], color="tab:blue")
        ax.set_title(column, fontsize=10)
        ax.set_xlabel("window start (sampler step)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean over iterations")
    return _save(fig, path)
