"""What `mixgrpo train --resume` continues, and what it tells the user.

A resume reads the run's own ``config.yaml`` (a CONFIG or overrides on the command line may change only
``train.iterations`` and ``tracking.*``: see ``check_resume_config``), so it never depends on which shipped config or
overrides happen to be typed again. A finished run is reported, not silently re-entered.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mixgrpo.config import ExperimentConfig, load_config
from mixgrpo.results.runlog import CONFIG_FILE


def resume_run_dir(run_dir: str | None, config: str | None) -> Path:
    """The run directory a command line names: ``--run-dir``, else ``runs/<name of CONFIG or quickstart>``."""
    if run_dir:
        return Path(run_dir)
    return Path("runs") / load_config(config or "quickstart").name


def resume_config(run_dir: Path, config: str | None, overrides: Sequence[str]) -> ExperimentConfig:
    """The config of a resumed run: CONFIG if one was typed (it is checked against the run's later), else the run's
    own config.yaml, with the overrides on top (a run without config.yaml yet starts from quickstart)."""
    written = run_dir / CONFIG_FILE
    if config is None and written.is_file():
        config = str(written)
    return load_config(config or "quickstart", list(overrides))


def finished_iterations(run_dir: Path) -> int | None:
    """Iterations done by the newest intact checkpoint of the run (None when there is none)."""
    from mixgrpo.engine.checkpoint import list_checkpoints, verify_checkpoint

    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        if verify_checkpoint(path) is None:
            return int(path.name.rsplit("_", 1)[1])
    return None


def finished_line(run_dir: Path, cfg: ExperimentConfig) -> str | None:
    """The one line for a resume of a run that already did ``train.iterations`` (None when there is work left)."""
    done = finished_iterations(run_dir)
    if done is None or done < cfg.train.iterations:
        return None
    return (f"run {run_dir} already finished {done} iterations; raise train.iterations to continue "
            f"(mixgrpo train --resume --run-dir {run_dir} train.iterations={done + max(done // 2, 1)})")


def resumed_line(checkpoint: Path, iteration: int, dropped: Sequence[int]) -> str:
    """What a resume did: the checkpoint it took and the logged iterations after it that were dropped."""
    line = f"resumed from {checkpoint} ({iteration} iterations done)"
    if not dropped:
        return line + "; no logged iteration was dropped"
    span = f"{dropped[0]}" if len(dropped) == 1 else f"{dropped[0]}-{dropped[-1]}"
    return line + f"; dropped {len(dropped)} logged iteration(s) after it ({span}), they are run again"


def no_checkpoint_line(run_dir: Path) -> str:
    return f"--resume: {run_dir / 'checkpoints'} holds no checkpoint yet; starting from iteration 0"
