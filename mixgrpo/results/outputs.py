"""Where ``export``, ``sample`` and ``report`` may write: never over a run's own files, ``--force`` included.

A run directory (``runlog.is_run_directory``) owns itself, its ``checkpoints/`` and ``videos/``; an output there
would replace a checkpoint or a video the run still links to (``samples.parquet``'s ``video_path``). An output
folder may sit inside a run directory only in a folder of its own (``RUN/report``, ``RUN/exports/peft``). A folder
that holds a run directory or a checkpoint anywhere below it is never replaced. Everything else that exists is
replaced or written over only with ``--force``. Every refusal is one ``ValueError`` line naming the path and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from mixgrpo.results.runlog import is_run_directory

RUN_OWN_FOLDERS = ("checkpoints", "videos")
"""Folders of a run directory that the run writes and reads back."""
CHECKPOINT_MANIFEST = "manifest.json"
SCAN_LIMIT = 20_000
"""Entries looked at under an existing output folder before it is refused as too large to check."""


def enclosing_run(path: Path) -> Path | None:
    """The run directory ``path`` is or lies in (None when none)."""
    for candidate in (path, *path.parents):
        if candidate.is_dir() and is_run_directory(candidate):
            return candidate
    return None


def check_output(out: str | os.PathLike, *, force: bool, kind: str = "folder", flag: str = "--out",
                 replaces: Iterable[str] | None = None) -> Path:
    """Raise ValueError when writing ``out`` (a ``folder`` to fill or replace, or one ``file``) could harm a run or
    overwrite something without ``force``. ``replaces``: for a folder written into (not replaced), the names of the
    files it would write; only those count as overwritten. Returns ``out`` as a Path."""
    out = Path(out)
    target = Path(os.path.abspath(out))
    run = enclosing_run(target)
    if run is not None:
        inside = target.relative_to(run).parts
        if not inside:
            raise ValueError(f"{flag} {out} is a run directory; write outside it or into a new folder of its own, "
                             f"e.g. {flag} {out / 'report'}")
        if inside[0] in RUN_OWN_FOLDERS or (kind == "file" and len(inside) == 1):
            raise ValueError(f"{flag} {out} is inside run directory {run}'s own files ({inside[0]}); --force never "
                             f"writes there: give a folder outside the run, or a new one such as {run / 'exports'}")
    if kind == "file":
        if target.is_dir():
            raise ValueError(f"{flag} {out} is a folder; give the path of a file to write")
        if target.exists() and not force:
            raise ValueError(f"{flag} {out} exists; pick another name or pass --force to replace it")
        return out
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {out} is a file; give the path of a folder to write")
    if not target.is_dir():
        return out
    held = _run_files_below(target)
    if held is not None:
        raise ValueError(f"{flag} {out} holds a run's files ({held}); --force never replaces those: give a new folder")
    if force:
        return out
    if replaces is None and any(target.iterdir()):
        raise ValueError(f"{flag} {out} exists and is not empty; pick another folder or pass --force to replace it")
    clash = next((name for name in replaces or () if (target / name).exists()), None)
    if clash is not None:
        raise ValueError(f"{flag} {out} already holds {clash}; pick another folder or pass --force to write over "
                         "its files")
    return out


def _run_files_below(folder: Path) -> str | None:
    """The first run directory or checkpoint under ``folder`` (a relative path), or None."""
    seen = 0
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        if is_run_directory(here):
            return str(here.relative_to(folder)) if here != folder else "it is a run directory"
        if CHECKPOINT_MANIFEST in files and here.name.startswith("iter_"):
            return f"checkpoint {here.relative_to(folder)}"
        seen += len(dirs) + len(files)
        if seen > SCAN_LIMIT:
            return f"more than {SCAN_LIMIT:,} entries, too many to check"
    return None
