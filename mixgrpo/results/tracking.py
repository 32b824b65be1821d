"""Experiment trackers behind one small interface: TensorBoard, Weights & Biases, MLflow; and the console line.

``tracking.backends: [tensorboard, wandb, mlflow]`` (default: none). Every metrics row goes to every tracker as
scalars named like the ``metrics.parquet`` columns, with step = iteration; at each evaluation the captioned eval
sheet, a few eval videos and the reward curve go too. Each backend is an optional extra, imported only when named
(``pip install 'mixgrpo[tensorboard]'``, ``[wandb]``, ``[mlflow]`` or ``[trackers]``); a named backend that is not
installed is a config error before anything runs.

- tensorboard: event files under ``<run-dir>/tensorboard/``; a resumed run purges the steps after its checkpoint,
  so TensorBoard shows each iteration once, with the values of the run that went on. Videos are animated GIFs in the
  Images tab (TensorBoard's own video summary needs moviepy), their captions in the Text tab.
- wandb: ``tracking.wandb_mode=offline`` (default) writes under ``<run-dir>/wandb/`` with no network (``wandb sync``
  uploads it later); a resumed run continues the same wandb run (its id is kept in ``<run-dir>/wandb_id.txt``).
  W&B history is append-only: the iterations a resumed run redoes are sent again, and W&B keeps the values it
  already has for them (it ignores a step below the run's last one); ``metrics.parquet`` and TensorBoard hold the
  redone values.
- mlflow: a local file store under ``<run-dir>/mlruns`` unless ``tracking.mlflow_uri`` names a server; params are
  the flattened config; a resumed run continues the same MLflow run (``<run-dir>/mlflow_run_id.txt``), and a redone
  iteration is a second value at the same step, the later one being the run's (MLflow has no way to drop one).
  MLflow accepts only letters, digits, ``_ - . /`` and spaces in metric names, and no ``//``, ``./`` or ``..``
  parts: ``mlflow_metric_name`` maps any other name to a valid one deterministically (see there).

A tracker that fails (network, disk, a bad value) never stops training: the failure is reported through
``on_error`` (the trainer writes a ``tracker_failed`` event and a warning) and that tracker is switched off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import re
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""backend name -> the module it needs."""


@dataclass(kw_only=True)
class TrackingConfig:
    """Experiment trackers (TensorBoard, W&B, MLflow) and the console line."""

    backends: list[str] = field(default_factory=list)
    """Trackers that get every metrics row and the evaluation images: tensorboard, wandb, mlflow (default: none)."""
    project: str = "mixgrpo"
    """The wandb project / MLflow experiment the run is filed under."""
    run_name: str | None = None
    """The run's name in wandb / MLflow; None: the experiment's `name`."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: written under <run-dir>/wandb with no network (upload later with `wandb sync`); online: needs a login."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; None: a local file store in <run-dir>/mlruns."""
    console_every: int = 1
    """When stdout is not a terminal (Ray job logs, nohup): one compact line every N iterations; 0: none."""

    def __post_init__(self) -> None:
        from mixgrpo.config import ConfigError

        if isinstance(self.backends, str):  # tracking.backends=tensorboard: one tracker, as the user meant
            self.backends = [self.backends]
        if not isinstance(self.backends, (list, tuple)) or not all(isinstance(b, str) for b in self.backends):
            raise ConfigError(f"tracking.backends must be a list of tracker names, got {self.backends!r}; e.g. "
                              f"tracking.backends=[tensorboard], or [] for none")
        self.backends = list(self.backends)
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"tracking.backends: unknown {unknown}; choose from {sorted(BACKENDS)}")
        if len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"tracking.backends lists a tracker twice: {self.backends}")
        missing = [b for b in self.backends if importlib.util.find_spec(BACKENDS[b]) is None]
        if missing:
            raise ConfigError(f"tracking.backends={self.backends}: {', '.join(missing)} is not installed; "
                              f"pip install 'mixgrpo[{missing[0]}]' (or 'mixgrpo[trackers]'), or drop it")
        if self.console_every < 0:
            raise ConfigError(f"tracking.console_every must be >= 0 (0: no console lines), got {self.console_every}")
        if self.run_name is not None and not self.run_name.strip():
            raise ConfigError("tracking.run_name is empty; give a name, or leave it out to use the experiment's name")


class Tracker(Protocol):
    """What every backend implements. ``step`` is the iteration (0-based), as in ``metrics.parquet``."""

    name: str

    def log_scalars(self, row: Mapping[str, Any], step: int) -> None:
        """One ``metrics.parquet`` row: every finite number under its column name."""

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """A PNG (the evaluation sheet, the reward curve)."""

    def log_video(self, tag: str, path: Path, step: int, caption: str) -> None:
        """An mp4 written by ``mixgrpo.results.media.write_mp4``, with a caption (prompt and reward)."""

    def close(self) -> None:
        """Flush and end the run on the tracker's side."""


def _finite(row: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if key == "iteration" or isinstance(value, str) or value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, *, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at and after it: the iterations a resumed run is about to redo
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)

    def log_scalars(self, row: Mapping[str, Any], step: int) -> None:
        for key, value in _finite(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def log_video(self, tag: str, path: Path, step: int, caption: str) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        gif, height, width = animated_gif(path)
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
        # What SummaryWriter.add_video writes, minus its moviepy encoder: an image summary holding a GIF.
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        if caption:
            self.writer.add_text(f"{tag}/caption", caption, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


GIF_MAX_SIDE = 320
GIF_MAX_FRAMES = 48
"""Tracked videos as GIFs are cut to this size and frame count: a 480p 81-frame GIF would be tens of MB per video."""


def animated_gif(path: Path) -> tuple[bytes, int, int]:
    """An mp4 as an endlessly looping GIF at the mp4's speed, at most GIF_MAX_SIDE px and GIF_MAX_FRAMES frames.
    Returns (GIF bytes, height, width)."""
    import imageio.v3 as iio
    from PIL import Image

    from mixgrpo.results.media import read_mp4, sample_frames, to_uint8

    frames_THWC = read_mp4(path)
    seconds = len(frames_THWC) / float(iio.immeta(path, plugin="FFMPEG").get("fps") or 4.0)
    frames_THWC = sample_frames(frames_THWC, GIF_MAX_FRAMES)
    images = [Image.fromarray(frame) for frame in to_uint8(frames_THWC)]
    scale = min(1.0, GIF_MAX_SIDE / max(images[0].size))
    if scale < 1.0:
        size = (max(1, round(images[0].width * scale)), max(1, round(images[0].height * scale)))
        images = [image.resize(size, Image.Resampling.BILINEAR) for image in images]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, round(1000 * seconds / len(images))))  # ms per frame; browsers floor at 20
    return buffer.getvalue(), images[0].height, images[0].width


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, *, cfg: TrackingConfig, run_name: str, config: Mapping[str, Any]) -> None:
        import wandb

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                              mode=cfg.wandb_mode, config=dict(config), reinit="create_new")  # wandb>=0.19.10

    def log_scalars(self, row: Mapping[str, Any], step: int) -> None:
        self.run.log(_finite(row), step=step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def log_video(self, tag: str, path: Path, step: int, caption: str) -> None:
        self.run.log({tag: self.wandb.Video(str(path), caption=caption, format="mp4")}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, run_dir: Path, *, cfg: TrackingConfig, run_name: str, config: Mapping[str, Any]) -> None:
        import mlflow

        if cfg.mlflow_uri is None:
            # MLflow 3 keeps its plain-file store for local use only behind this switch; it needs no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=cfg.mlflow_uri or (run_dir / "mlruns").resolve().as_uri())
        id_file = run_dir / "mlflow_run_id.txt"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
        else:
            experiment = self.client.get_experiment_by_name(cfg.project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.project)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            id_file.write_text(self.run_id)
            from mlflow.entities import Param

            params = [Param(mlflow_metric_name(key), str(value)[:500])  # 500: the smallest cap of MLflow 2 and 3
                      for key, value in flatten(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log_scalars(self, row: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_metric_name(key), value, now, step) for key, value in _finite(row).items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=f"images/{tag}")

    def log_video(self, tag: str, path: Path, step: int, caption: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=f"videos/{tag}")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_MLFLOW_BAD_CHARACTER = re.compile(r"[^\w\-. /]")
"""MLflow's rule for metric and param names, without the colon it allows on POSIX only (a server may run Windows)."""


def mlflow_metric_name(name: str) -> str:
    """``name`` when MLflow accepts it, else a valid name made from it, the same every time.

    MLflow takes letters, digits, ``_``, ``-``, ``.``, spaces and ``/``, and a name must stay itself under path
    normalisation (no empty, ``.`` or ``..`` parts, no leading or trailing ``/``). Other characters become ``_``,
    such parts are dropped (``..`` becomes ``__``), and ``-`` plus 6 hex digits of the original name's SHA-1 is
    appended so that two names that differ only in such characters stay apart:
    ``reward/clip@336/mean`` -> ``reward/clip_336/mean-1a2b3c``. Names longer than MLflow's 250 characters are cut
    and tagged the same way.
    """
    parts = [p for p in _MLFLOW_BAD_CHARACTER.sub("_", name).split("/") if p not in ("", ".")]
    valid = "/".join("__" if p == ".." else p for p in parts)
    if valid == name and name and len(name) <= 250:
        return name
    return f"{valid[:243]}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``: MLflow params, the resume check, the analysis config columns."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Trackers:
    """Every configured tracker behind one object; a tracker that fails is reported once and switched off."""

    def __init__(self, trackers: list[Tracker], on_error: Callable[[str, BaseException], None]) -> None:
        self.trackers, self.on_error = trackers, on_error

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # noqa: BLE001 -- a tracker must never stop training
                self.trackers.remove(tracker)
                self.on_error(tracker.name, error)

    def log_scalars(self, row: Mapping[str, Any], step: int) -> None:
        self._each("log_scalars", row, step)

    def log_image(self, tag: str, path: Path | None, step: int) -> None:
        if path is not None and Path(path).is_file():
            self._each("log_image", tag, Path(path), step)

    def log_video(self, tag: str, path: Path | None, step: int, caption: str = "") -> None:
        if path is not None and Path(path).is_file():
            self._each("log_video", tag, Path(path), step, caption)

    def close(self) -> None:
        self._each("close")
        self.trackers = []


def build_trackers(cfg: TrackingConfig, run_dir: Path, *, run_name: str, config: Mapping[str, Any],
                   resume_step: int | None, on_error: Callable[[str, BaseException], None]) -> Trackers:
    """The configured trackers for ``run_dir``; one that cannot start is reported through ``on_error``.

    Args:
        run_name: the name used when ``cfg.run_name`` is None (the trainer passes the experiment's name).
        config: the resolved configuration (``ExperimentConfig.to_dict()``): wandb's config, MLflow's params.
        resume_step: the iteration a resumed run restarts at (TensorBoard drops what it holds from there on);
            None for a fresh run.
        on_error: called with (tracker name, error) when a tracker fails to start or to log; that tracker is then
            off for the rest of the run. It must not raise (the trainer warns and writes a ``tracker_failed`` event).
    """
    makers = {
        "tensorboard": lambda: TensorBoardTracker(run_dir, resume_step=resume_step),
        "wandb": lambda: WandbTracker(run_dir, cfg=cfg, run_name=run_name, config=config),
        "mlflow": lambda: MlflowTracker(run_dir, cfg=cfg, run_name=run_name, config=config),
    }
    run_name = cfg.run_name or run_name
    trackers = []
    for name in cfg.backends:
        try:
            trackers.append(makers[name]())
        except Exception as error:  # noqa: BLE001 -- e.g. no network for wandb online: train anyway, say so
            on_error(name, error)
    return Trackers(trackers, on_error)


def console_line(row: Mapping[str, Any], *, total: int) -> str:
    """One compact line for logs that are not a terminal: iteration, reward, loss, KL, clip fraction, s/it."""
    def get(key: str) -> float:
        value = row.get(key)
        return float("nan") if value is None else float(value)

    parts = [f"it {int(row['iteration']) + 1}/{total}", f"reward {get('reward/mean'):.4f}±{get('reward/std'):.4f}",
             f"loss {get('loss'):+.3e}", f"kl {get('kl'):.3e}", f"clip {get('clip_fraction'):.3f}",
             f"ratio0 {get('ratio/first_step'):.4f}", f"{get('time/total'):.1f} s/it"]
    if "eval/reward/mean" in row:
        parts.insert(2, f"eval {get('eval/reward/mean'):.4f}")
    return "  ".join(parts)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty() or bool(os.environ.get("MIXGRPO_FORCE_PROGRESS"))


def warn_tracker_failure(name: str, error: BaseException) -> str:
    message = f"tracker {name} failed and is switched off: {type(error).__name__}: {error}"
    warnings.warn(message, stacklevel=3)
    return message
