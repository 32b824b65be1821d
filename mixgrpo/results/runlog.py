"""The run directory: a self-describing dataset written while the run goes.

Layout (DESIGN.md section 3)::

    RUN/
      config.yaml        resolved config, written once (atomic)
      metrics.parquet    one row per iteration
      samples.parquet    one row per rollout sample
      eval.parquet       one row per evaluation prompt x seed (when eval.every > 0)
      events.jsonl       faults, warnings, resumes: {"time": UTC ISO-8601, "kind": ..., **fields}
      checkpoints/       owned by mixgrpo.engine.checkpoint
      videos/            mp4s named by `RunLog.video_path`

Readers never see a half-written file: every parquet write is a full rewrite to a hidden temporary file in the
same folder followed by `os.replace`, which is atomic on POSIX and Windows. Rows are kept in memory, so one
rewrite costs O(rows so far); at video-RL iteration times (seconds to minutes) that is negligible up to ~10^5
sample rows. One process (rank 0) writes a run directory; any number may read it.

metrics.parquet schema. `iteration` is int64; every other column is float64 (ints such as `nfe` included, so a
column keeps its dtype when a key first appears mid-run and earlier rows read NaN). Names the trainer emits:

    iteration            int64, strictly increasing
    reward/mean, reward/std                      aggregate (weighted) reward over the batch
    reward/<name>/mean, reward/<name>/std        raw score of each reward plugin
    reward/<name>/<component>/mean               component score of a reward that reports them
                                                 (Reward.score_with_details), over kept samples
    advantage/mean, advantage/std, advantage/abs_max
    loss, clip_fraction, kl, grad_norm, lr
    ratio/mean, ratio/min, ratio/max             importance ratio over all update steps
    ratio/first_step                             mean ratio at the first inner step (1.0 up to numerics)
    zero_std_fraction                            fraction of groups whose rewards are all equal
    window/start, window/size                    SDE window position (sampler step index) and length
    nfe                                          transformer forward passes per rollout
    time/rollout, time/reward, time/update, time/total   seconds

samples.parquet schema, one row per rollout sample:

    iteration, group, seed, sample   int64 (`group` indexes the prompt group, `sample` the member in it)
    prompt                           string
    reward                           float64, aggregate reward
    reward/<name>                    float64, raw score of each reward plugin
    reward/<name>/<component>        float64, component score (rewards that report them)
    advantage                        float64
    video_path                       string, relative to the run directory, "" when no video was saved

eval.parquet schema, one row per evaluation prompt x seed (iteration -1: the policy before training):

    iteration, seed                  int64
    prompt                           string
    reward, reward/<name>, reward/<name>/<component>   float64, as in samples.parquet

Extra keys are allowed in all three files: numbers (bool included) become float64 columns, strings string columns.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import hashlib
import io
import json
import operator
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.parquet"
SAMPLES_FILE = "samples.parquet"
EVAL_FILE = "eval.parquet"
EVENTS_FILE = "events.jsonl"

MARKER_FILE = ".mixgrpo-run"
"""Written into every run directory: a folder without it (and without metrics.parquet) is never written into."""
LOCK_FILE = ".lock"
CONFIG_SUM_FILE = "config.sha256"


class RunDirectoryInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


def is_run_directory(path: Path) -> bool:
    return (path / MARKER_FILE).is_file() or (path / METRICS_FILE).is_file()


def _acquire_lock(run_dir: Path) -> int:
    """An exclusive lock on ``run_dir/.lock`` held until the returned descriptor is closed (or the process dies:
    the kernel releases a dead process's lock, so a stale lock file is simply taken over)."""
    import fcntl
    import socket

    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirectoryInUse(f"run directory {run_dir} is in use by {holder}; wait for that run to end, or pick "
                                "another --run-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                  f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}\n".encode(), 0)
    return fd


def config_checksum(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_config_unchanged(run_dir: Path) -> None:
    """Raise ValueError when ``run_dir/config.yaml`` no longer matches the checksum written when the run started."""
    config, stored = run_dir / CONFIG_FILE, run_dir / CONFIG_SUM_FILE
    if config.is_file() and stored.is_file() and config_checksum(config.read_text("utf-8")) != stored.read_text().strip():
        raise ValueError(f"{config} was edited after the run started (it no longer matches {CONFIG_SUM_FILE}); a "
                         "resumed run keeps its configuration: undo the edit, or start a new --run-dir with it")


SAMPLE_INT_COLUMNS = ("iteration", "group", "seed", "sample")
SAMPLE_REQUIRED = (*SAMPLE_INT_COLUMNS, "prompt", "reward", "advantage")
SAMPLE_STR_DEFAULTS = {"video_path": ""}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary path next to `path`; on success move it onto `path` atomically.

    The temporary keeps `path`'s suffix so writers that pick a format from it (ffmpeg, matplotlib) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_parquet(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a parquet file that a writer may replace at any moment.

    pyarrow given a path looks the file up more than once (size, then contents), so a concurrent `os.replace`
    can pair the old size with the new file. Reading the bytes through one open handle pins a single version.
    """
    with open(path, "rb") as f:
        data = f.read()
    return pd.read_parquet(io.BytesIO(data), columns=columns)


def slugify(text: str, *, max_len: int = 48) -> str:
    """Filesystem-safe lowercase slug; a short hash keeps prompts that share a prefix apart."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]
    return f"{slug or 'prompt'}-{digest}"


def plain_config(value: Any, where: str = "config") -> Any:
    """Convert a config tree to YAML-safe builtins (dicts, lists, str, int, float, bool, None)."""
    if isinstance(value, Mapping):
        return {str(k): plain_config(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, enum.Enum):
        return plain_config(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, bool):
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    raise ValueError(
        f"{where} has type {type(value).__name__}, which a config.yaml cannot hold; convert it to a str, "
        "number, bool, list or dict before write_config (e.g. dataclasses.asdict for a config dataclass)"
    )


def _metric_value(key: str, value: Any) -> float:
    if isinstance(value, str):
        raise ValueError(
            f"metric {key!r} is a string ({value!r}); metrics.parquet holds numbers only, log text with "
            "RunLog.event(...) instead"
        )
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metric {key!r} = {value!r} is not a number; pass a float (e.g. tensor.item())") from err


def _iteration(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int, got a bool")
    try:
        return operator.index(value)
    except TypeError as err:
        raise ValueError(f"{what} must be an int, got {type(value).__name__} {value!r}") from err


def metrics_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows -> DataFrame with the metrics schema (iteration int64, everything else float64)."""
    columns = ["iteration"] + list(dict.fromkeys(k for row in rows for k in row if k != "iteration"))
    frame = pd.DataFrame.from_records(list(rows), columns=columns)
    return frame.astype({c: ("int64" if c == "iteration" else "float64") for c in columns})


def samples_frame(rows: Sequence[Mapping[str, Any]], str_columns: set[str]) -> pd.DataFrame:
    """Rows -> DataFrame with the samples schema; `str_columns` names the string-typed columns."""
    columns = list(dict.fromkeys([*SAMPLE_REQUIRED, "video_path", *(k for row in rows for k in row)]))
    frame = pd.DataFrame.from_records(list(rows), columns=columns)
    dtypes = {}
    for c in columns:
        if c in SAMPLE_INT_COLUMNS:
            dtypes[c] = "int64"
        elif c in str_columns:
            frame[c] = frame[c].fillna(SAMPLE_STR_DEFAULTS.get(c, ""))
            dtypes[c] = "str"
        else:
            dtypes[c] = "float64"
    return frame.astype(dtypes)


class RunLog:
    """Writer of one run directory. See the module docstring for the files and their schemas.

    Args:
        run_dir: the run directory; created if missing.
        resume: False refuses a directory that already holds logged rows (pick a new run dir, or resume);
            True loads the rows already there so logging continues; call `truncate_after(checkpoint_iteration)`
            next so iterations redone after the checkpoint are not duplicated.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run directory {self.run_dir} is a file; give --run-dir a folder (new or a run's)")
        if self.run_dir.is_dir() and any(self.run_dir.iterdir()) and not is_run_directory(self.run_dir):
            raise ValueError(f"{self.run_dir} is not empty and is not a mixgrpo run directory (no {MARKER_FILE}); "
                             "nothing in it is touched: pick a new or empty --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_lock(self.run_dir)
        (self.run_dir / MARKER_FILE).touch()
        (self.run_dir / "videos").mkdir(exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        self._metric_rows: list[dict[str, Any]] = []
        self._sample_rows: list[dict[str, Any]] = []
        self._eval_rows: list[dict[str, Any]] = []
        self._str_columns: set[str] = {"prompt", "video_path"}
        self._num_columns: set[str] = {"reward", "advantage"}
        self._closed = False
        if resume:
            self._load_existing()
        elif self._existing_rows():
            self.close()
            raise ValueError(f"run directory {self.run_dir} already holds a run's iterations; continue it with "
                             "--resume, or pick another --run-dir")
        # samples first: a reader that found metrics.parquet then finds samples.parquet too.
        self._write_samples()
        self._write_metrics()

    def _existing_rows(self) -> int:
        return sum(
            len(read_parquet(self.run_dir / name, columns=["iteration"]))
            for name in (METRICS_FILE, SAMPLES_FILE)
            if (self.run_dir / name).exists()
        )

    def _load_existing(self) -> None:
        if (self.run_dir / METRICS_FILE).exists():
            metrics = read_parquet(self.run_dir / METRICS_FILE)
            self._metric_rows = [_drop_nan(r) for r in metrics.to_dict("records")]
        if (self.run_dir / SAMPLES_FILE).exists():
            samples = read_parquet(self.run_dir / SAMPLES_FILE)
            for c in samples.columns:
                if c not in SAMPLE_INT_COLUMNS:
                    is_str = pd.api.types.is_string_dtype(samples[c])
                    (self._str_columns if is_str else self._num_columns).add(c)
            self._sample_rows = [_drop_nan(r) for r in samples.to_dict("records")]
        if (self.run_dir / EVAL_FILE).exists():
            self._eval_rows = [_drop_nan(r) for r in read_parquet(self.run_dir / EVAL_FILE).to_dict("records")]

    @property
    def last_iteration(self) -> int | None:
        """Iteration of the last metrics row, None before the first."""
        return int(self._metric_rows[-1]["iteration"]) if self._metric_rows else None

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write the resolved config as config.yaml (atomic; overwrites, so a resume may record its config)."""
        self._check_open()
        text = yaml.safe_dump(plain_config(config), sort_keys=False, allow_unicode=True)
        with atomic_path(self.run_dir / CONFIG_FILE) as tmp:
            tmp.write_text(text, encoding="utf-8")
        with atomic_path(self.run_dir / CONFIG_SUM_FILE) as tmp:  # --resume refuses a config.yaml edited later
            tmp.write_text(config_checksum(text) + "\n")

    def log_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one iteration's metrics and rewrite metrics.parquet. `row["iteration"]` is required."""
        self._check_open()
        if "iteration" not in row:
            raise ValueError(f"log_metrics row needs an 'iteration' key; got keys {sorted(row)}")
        iteration = _iteration(row["iteration"], "log_metrics row['iteration']")
        last = self.last_iteration
        if last is not None and iteration <= last:
            raise ValueError(
                f"log_metrics iteration {iteration} is not after the last logged iteration {last}; "
                "after resuming from a checkpoint call RunLog.truncate_after(checkpoint_iteration) first"
            )
        clean = {k: _metric_value(k, v) for k, v in row.items() if k != "iteration"}
        self._metric_rows.append({"iteration": iteration, **clean})
        self._write_metrics()

    def log_samples(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append per-sample rows (see the module docstring) and rewrite samples.parquet.

        A `video_path` inside the run directory is stored relative to it, so the directory can be moved.
        """
        self._check_open()
        clean_rows = [self._clean_sample(dict(r), i) for i, r in enumerate(rows)]
        self._sample_rows.extend(clean_rows)
        self._write_samples()

    def _clean_sample(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        missing = [k for k in SAMPLE_REQUIRED if k not in row]
        if missing:
            raise ValueError(
                f"log_samples row {index} lacks required keys {missing}; every row needs {list(SAMPLE_REQUIRED)}"
            )
        for key in SAMPLE_INT_COLUMNS:
            row[key] = _iteration(row[key], f"log_samples row {index} {key!r}")
        row["video_path"] = self._relative_video(row.get("video_path") or "")
        for key, value in row.items():
            if key in SAMPLE_INT_COLUMNS:
                continue
            is_str = isinstance(value, (str, os.PathLike))
            if (is_str and key in self._num_columns) or (not is_str and key in self._str_columns):
                want = "a number" if is_str else "a string"
                raise ValueError(f"log_samples row {index} {key!r} = {value!r}; that column holds {want}")
            if is_str:
                row[key] = os.fspath(value)
                self._str_columns.add(key)
            else:
                row[key] = _metric_value(f"log_samples row {index} {key!r}", value)
                self._num_columns.add(key)
        return row

    def log_eval(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append evaluation rows (``iteration``, ``prompt``, ``seed``, scores) and rewrite eval.parquet."""
        self._check_open()
        for index, row in enumerate(rows):
            missing = [k for k in ("iteration", "prompt", "seed", "reward") if k not in row]
            if missing:
                raise ValueError(f"log_eval row {index} lacks {missing}")
            self._eval_rows.append({k: (v if isinstance(v, str) or k in ("iteration", "seed") else float(v))
                                    for k, v in row.items()})
        self._write_eval()

    def _relative_video(self, path: str | os.PathLike) -> str:
        # A relative path is relative to the working directory (as every path the caller holds, e.g. one from
        # `video_path` under a relative --run-dir); it is stored relative to the run directory when inside it,
        # else absolute, so a reader never depends on where the run was started from.
        path = os.fspath(path)
        if not path:
            return path
        resolved = Path(path).resolve()
        try:
            return resolved.relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            return str(resolved)

    def event(self, kind: str, **fields: Any) -> None:
        """Append `{"time", "kind", **fields}` to events.jsonl (faults, warnings, resumes); one write per line."""
        self._check_open()
        if not kind or not isinstance(kind, str):
            raise ValueError(f"event kind must be a non-empty string such as 'fault' or 'warning', got {kind!r}")
        record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(), "kind": kind, **fields}
        line = json.dumps(record, default=str) + "\n"
        with open(self.run_dir / EVENTS_FILE, "a", encoding="utf-8") as f:
            f.write(line)

    def video_path(self, iteration: int, prompt: str, index: int) -> Path:
        """Where the video of sample `index` of `prompt` at `iteration` goes: videos/it000012_<slug>_03.mp4."""
        iteration = _iteration(iteration, "video_path iteration")
        index = _iteration(index, "video_path index")
        return self.run_dir / "videos" / f"it{iteration:06d}_{slugify(prompt)}_{index:02d}.mp4"

    def logged_iterations_after(self, iteration: int) -> list[int]:
        """The metrics rows' iterations after `iteration` (what `truncate_after(iteration)` would drop)."""
        return [int(r["iteration"]) for r in self._metric_rows if r["iteration"] > iteration]

    def truncate_after(self, iteration: int) -> None:
        """Drop metric and sample rows with iteration > `iteration` (the resumed checkpoint's), and their videos."""
        self._check_open()
        iteration = _iteration(iteration, "truncate_after iteration")
        n_metrics, n_samples = len(self._metric_rows), len(self._sample_rows)
        dropped = [r for r in self._sample_rows if r["iteration"] > iteration]
        self._metric_rows = [r for r in self._metric_rows if r["iteration"] <= iteration]
        self._sample_rows = [r for r in self._sample_rows if r["iteration"] <= iteration]
        self._eval_rows = [r for r in self._eval_rows if r["iteration"] <= iteration]
        self._write_metrics()
        self._write_samples()
        if (self.run_dir / EVAL_FILE).exists():
            self._write_eval()
        root = self.run_dir.resolve()
        for row in dropped:
            target = (self.run_dir / row["video_path"]).resolve() if row.get("video_path") else None
            if target is not None and target.is_relative_to(root):  # never delete outside the run directory
                target.unlink(missing_ok=True)
        self.event(
            "truncate",
            after_iteration=iteration,
            dropped_metric_rows=n_metrics - len(self._metric_rows),
            dropped_sample_rows=n_samples - len(self._sample_rows),
        )

    def close(self) -> None:
        """Mark the log closed and release the run directory; files are already complete on disk after every call."""
        self._closed = True
        if getattr(self, "_lock", None) is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"RunLog for {self.run_dir} is closed; open a new RunLog(run_dir, resume=True)")

    def _write_metrics(self) -> None:
        with atomic_path(self.run_dir / METRICS_FILE) as tmp:
            metrics_frame(self._metric_rows).to_parquet(tmp, index=False)

    def _write_eval(self) -> None:
        with atomic_path(self.run_dir / EVAL_FILE) as tmp:
            frame = pd.DataFrame(self._eval_rows)
            for column in ("iteration", "seed"):
                if column in frame:
                    frame[column] = frame[column].astype("int64")
            frame.to_parquet(tmp, index=False)

    def _write_samples(self) -> None:
        with atomic_path(self.run_dir / SAMPLES_FILE) as tmp:
            samples_frame(self._sample_rows, self._str_columns).to_parquet(tmp, index=False)


def _drop_nan(row: dict[str, Any]) -> dict[str, Any]:
    # NaN in a loaded row means "not logged at that iteration"; dropping it restores the original sparse row.
    return {k: v for k, v in row.items() if not (isinstance(v, float) and v != v)}
