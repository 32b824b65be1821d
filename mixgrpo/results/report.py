"""`mixgrpo report RUN [RUN ...] [--out DIR]`: a summary table in the terminal and plots on disk.

Writes into DIR (default: RUN/report for one run, else report/ next to the first run):

    summary.csv                  one row per run (mixgrpo.results.analysis.summarize)
    reward_curves.png            reward per iteration, one line per run, one panel per reward
    diagnostics.png              loss, KL, clip fraction, ratio, advantage spread, time
    <run>_prompts.csv/.png       per-prompt improvement, first vs last quarter
    <run>_window.png             reward/loss by SDE window position (if the run logged it)
    <run>_samples.png            best and worst videos of the last iteration that saved videos (if any)
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mixgrpo.results import analysis, media, plots
from mixgrpo.results.outputs import check_output
from mixgrpo.results.runlog import atomic_path


def default_out_dir(paths: Sequence[Path]) -> Path:
    return paths[0] / "report" if len(paths) == 1 else paths[0].resolve().parent / "report"


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def summary_table(summary: pd.DataFrame, fraction: float) -> Table:
    pct = f"{fraction:.0%}"
    table = Table(title=f"reward/mean, first vs last {pct} of iterations", header_style="bold")
    for header in ("run", "iters", f"first {pct}", f"last {pct}", "gain", "NFE", "s/iter", "events"):
        table.add_column(header, justify="left" if header == "run" else "right")
    for row in summary.to_dict("records"):
        gain = row["improvement_pct"]
        colour = "green" if gain > 0 else "red" if gain < 0 else "white"
        table.add_row(
            escape(row["run"]), str(row["iterations"]),
            _fmt(row["reward_first"], ".4f"), _fmt(row["reward_last"], ".4f"),
            f"[{colour}]{_fmt(gain, '+.1f')}%[/{colour}]" if not math.isnan(gain) else "-",
            _fmt(row["nfe_per_iter"], ".0f"), _fmt(row["seconds_per_iter"], ".2f"), str(row["events"]),
        )
    return table


def sample_sheet(run: analysis.Run, path: Path, *, count: int = 3) -> Path | None:
    """Contact sheet of the best and worst `count` samples of the last iteration that saved videos."""
    with_video = run.samples[run.samples["video_path"] != ""]
    if with_video.empty:
        return None
    last = with_video[with_video["iteration"] == with_video["iteration"].max()].sort_values("reward")
    picked = pd.concat([last.tail(count), last.head(count)]).drop_duplicates(["video_path"])
    picked = picked.sort_values("reward", ascending=False)
    picked = picked[[run.video(p).is_file() for p in picked["video_path"]]]
    if picked.empty:
        return None
    videos = [media.read_mp4(run.video(p)) for p in picked["video_path"]]
    captions = [f"it {r.iteration} | reward {r.reward:.3f} | {r.prompt}" for r in picked.itertuples()]
    return media.contact_sheet(videos, captions, path)


def report_runs(
    paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None, *, fraction: float = 0.25,
    window: int | None = None, force: bool = False,
) -> dict[str, Any]:
    """Load runs and write the report files.

    Returns:
        {"summary": DataFrame (one row per run), "out_dir": Path, "files": [Path], "varying": config columns that
        differ between runs, "events": {run: {event kind: count}}}.

    Raises:
        ValueError: a path is not a run directory (the message names the missing file) or an argument is bad.
    """
    runset = analysis.load_runs(list(paths))
    out = Path(out_dir) if out_dir is not None else default_out_dir([Path(p) for p in paths])
    check_output(out, force=force, replaces=report_file_names(runset))  # never a run's files; old reports: --force
    out.mkdir(parents=True, exist_ok=True)
    summary = pd.DataFrame([analysis.summarize(r, fraction=fraction) for r in runset.runs])
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    files = [out / "summary.csv",
             plots.plot_reward_curves(runset, out / "reward_curves.png", window=window),
             plots.plot_diagnostics(runset, out / "diagnostics.png", window=window)]
    for run in runset.runs:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", run.name)
        prompts = analysis.per_prompt_improvement(run, first=fraction, last=fraction)
        with atomic_path(out / f"{stem}_prompts.csv") as tmp:
            prompts.to_csv(tmp, index=False)
        files += [out / f"{stem}_prompts.csv", plots.plot_per_prompt_improvement(prompts, out / f"{stem}_prompts.png")]
        if "window/start" in run.metrics.columns and len(run.metrics):
            files.append(plots.plot_window_breakdown(analysis.window_breakdown(run), out / f"{stem}_window.png"))
        sheet = sample_sheet(run, out / f"{stem}_samples.png")
        if sheet is not None:
            files.append(sheet)
    events = {r.name: r.events["kind"].value_counts().to_dict() for r in runset.runs if len(r.events)}
    return {"summary": summary, "out_dir": out, "files": files, "varying": runset.varying, "events": events}


def report_file_names(runset: analysis.RunSet) -> list[str]:
    """Every file name :func:`report_runs` may write for ``runset``."""
    names = ["summary.csv", "reward_curves.png", "diagnostics.png"]
    for run in runset.runs:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", run.name)
        names += [f"{stem}_{part}" for part in ("prompts.csv", "prompts.png", "window.png", "samples.png")]
    return names


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `mixgrpo report` (shared by this module's parser and the `mixgrpo` command line)."""
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (config.yaml, metrics.parquet, ...)")
    parser.add_argument("--out", default=None, help="folder for plots and tables (default: RUN/report)")
    parser.add_argument("--force", action="store_true", help="write over the files of an earlier report in --out")
    parser.add_argument("--fraction", type=float, default=0.25,
                        help="share of iterations averaged for the first/last reward (default 0.25)")
    parser.add_argument("--window", type=int, default=None, help="rolling-mean width in iterations (default n/10)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="mixgrpo report", description=__doc__.splitlines()[0]))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mixgrpo report`; returns the exit status (0 ok, 2 bad input)."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """`mixgrpo report` on parsed arguments."""
    console = Console()
    try:
        result = report_runs(args.runs, args.out, fraction=args.fraction, window=args.window,
                             force=getattr(args, "force", False))
    except (ValueError, OSError) as err:
        print(f"mixgrpo report: error: {err}", file=sys.stderr)
        return 2
    console.print(summary_table(result["summary"], args.fraction))
    from mixgrpo.results.summary import run_summary, summary_lines

    for path in args.runs:  # what each run did, as `mixgrpo train` said at its end
        lines = summary_lines(run_summary(path))
        if lines:
            console.print(f"{path}:", highlight=False, soft_wrap=True)
            for line in lines:
                console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    for name, counts in result["events"].items():
        console.print(f"events in {name}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()), highlight=False)
    if result["varying"]:
        console.print("settings that differ: " + ", ".join(result["varying"]), highlight=False)
    console.print(f"wrote {len(result['files'])} files to {result['out_dir']}", highlight=False)
    for path in result["files"]:
        console.print(f"  {path.name}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
