"""Experiment trackers behind one small interface: TensorBoard, Weights & Biases, MLflow; and the console line.

``tracking.backends: [tensorboard, wandb, mlflow]`` (default: none). Every metrics row goes to every tracker as
scalars named like the ``metrics.parquet`` columns, with step = iteration; at each evaluation the captioned eval
sheet, a few eval videos and the reward curve go too. Each backend is an optional extra, imported only when named
(``pip install 'mixgrpo[tensorboard]'``, ``[wandb]``, ``[mlflow]`` or ``[trackers]``); a named backend that is not
installed is a config error before anything runs.

- tensorboard: event files under ``<run-dir>/tensorboard/``; a resumed run purges the steps after its checkpoint,
  so TensorBoard shows each iteration once.
- wandb: ``tracking.wandb_mode=offline`` (default) writes under ``<run-dir>/wandb/`` with no network (``wandb sync``
  uploads it later); a resumed run continues the same wandb run (its id is kept in the run directory).
- mlflow: a local file store under ``<run-dir>/mlruns`` unless ``tracking.mlflow_uri`` names a server; params are
  the flattened config; a resumed run continues the same MLflow run.

A tracker that fails (network, disk, a bad value) never stops training: the failure is reported through
``on_error`` (the trainer writes a ``tracker_failed`` event and a warning) and that tracker is switched off.
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""backend name -> the module it needs."""


@dataclass(kw_only=True)
class TrackingConfig:
    """Experiment trackers (TensorBoard, W&B, MLflow) and the console line."""

    backends: list[str] = field(default_factory=list)
    """Trackers that get every metrics row and the evaluation images: tensorboard, wandb, mlflow (default: none)."""
    project: str = "mixgrpo"
    """The wandb project / MLflow experiment the run is filed under."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: written under <run-dir>/wandb with no network (upload later with `wandb sync`); online: needs a login."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; None: a local file store in <run-dir>/mlruns."""
    console_every: int = 1
    """When stdout is not a terminal (Ray job logs, nohup): one compact line every N iterations; 0: none."""

    def __post_init__(self) -> None:
        from mixgrpo.config import ConfigError

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
        pass  # TensorBoard's video panel needs moviepy; the eval sheet (an image) shows the same frames

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, *, cfg: TrackingConfig, run_name: str, config: Mapping[str, Any]) -> None:
        import wandb

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                              mode=cfg.wandb_mode, config=dict(config), reinit="create_new")

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
            for key, value in _flatten(config).items():
                self.client.log_param(self.run_id, key, str(value)[:500])  # MLflow caps param values

    def log_scalars(self, row: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        import time

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in _finite(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=f"images/{tag}")

    def log_video(self, tag: str, path: Path, step: int, caption: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=f"videos/{tag}")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Trackers:
    """Every configured tracker behind one object; a tracker that fails is reported once and switched off."""

    def __init__(self, trackers: list[Any], on_error: Callable[[str, BaseException], None]) -> None:
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
    """The configured trackers for ``run_dir``; one that cannot start is reported through ``on_error``."""
    makers = {
        "tensorboard": lambda: TensorBoardTracker(run_dir, resume_step=resume_step),
        "wandb": lambda: WandbTracker(run_dir, cfg=cfg, run_name=run_name, config=config),
        "mlflow": lambda: MlflowTracker(run_dir, cfg=cfg, run_name=run_name, config=config),
    }
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
