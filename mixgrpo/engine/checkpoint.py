"""Atomic, verifiable training checkpoints.

A checkpoint is a folder ``checkpoints/iter_NNNNNN/`` with tensors in safetensors, the optimizer state and RNG states
in ``torch.save`` files (read back with ``weights_only=True``), a ``state.json`` and, written last, a
``manifest.json`` holding the SHA-256 of every other file. The folder is assembled under a temporary name and
renamed into place, so a crash leaves either a complete checkpoint or an ignored temporary folder. On load, a
checkpoint whose manifest is missing or does not match is skipped with a warning and the previous one is used.

A run whose learner is sharded (``learner.sharding=fsdp``) has no whole-model tensors anywhere: every rank writes
its shards of weights, Adam state and EMA into ``dcp/`` (``torch.distributed.checkpoint``) inside the temporary
folder, and the manifest covers those files too. :func:`read_model_weights` reassembles whole tensors from either
kind, in one process.

A rank's side of a checkpoint lives here too: :func:`learner_payload` (an unsharded learner's tensors and Adam
state, which the driver writes), :func:`save_learner_shards` (each sharded rank's ``dcp/`` files),
:func:`load_learner_state` (resume) and :func:`load_trained_weights` (a trained policy for sampling or export).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from mixgrpo.engine.learner import Learner

MANIFEST = "manifest.json"
PREFIX = "iter_"
SHARDED_DIR = "dcp"
"""Subfolder of a sharded run's checkpoint holding the torch.distributed.checkpoint files."""


@dataclass
class Checkpoint:
    path: Path
    iteration: int
    tensors: dict[str, dict[str, torch.Tensor]]
    """safetensors groups, e.g. ``{"model": {...}, "ema": {...}}``."""
    objects: dict[str, Any]
    """torch.save groups, e.g. ``{"optimizer": state_dict, "rng": {...}}``."""
    state: dict[str, Any]
    """JSON-serialisable trainer state (iteration, window scheduler, ...)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"{PREFIX}{iteration:06d}"


def save_checkpoint(
    root: str | Path,
    iteration: int,
    *,
    tensors: dict[str, dict[str, torch.Tensor]],
    objects: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    write_shards: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``iteration`` atomically under ``root`` and keep only the newest ``keep`` ones.

    ``write_shards(folder)``: called with the temporary ``dcp/`` folder before the manifest is written (every rank
    of a sharded learner saves its shards there; the folder must be on storage they all see).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, iteration)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = []
    for group, tensor_dict in tensors.items():
        name = f"{group}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensor_dict.items()}, str(tmp / name))
        files.append(name)
    for group, obj in objects.items():
        name = f"{group}.pt"
        torch.save(obj, tmp / name)
        files.append(name)
    if write_shards is not None:
        (tmp / SHARDED_DIR).mkdir()
        write_shards(tmp / SHARDED_DIR)
        files.extend(sorted(str(f.relative_to(tmp)) for f in (tmp / SHARDED_DIR).rglob("*") if f.is_file()))
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, **state}, indent=1))
    files.append("state.json")
    manifest = {"iteration": iteration, "files": {name: _sha256(tmp / name) for name in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _set_modes(tmp)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same iteration after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


FILE_MODE, DIR_MODE = 0o644, 0o755
"""Every checkpoint file gets the same mode (the writers' defaults differ: safetensors, torch.save, json): readable by
all, writable by the owner, like the models `save_pretrained` writes. A run directory holds no secrets."""


def _set_modes(folder: Path) -> None:
    for item in folder.rglob("*"):
        item.chmod(DIR_MODE if item.is_dir() else FILE_MODE)
    folder.chmod(DIR_MODE)


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir() if path.is_dir() else []:
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        elif child.is_dir():
            _fsync_dir(child)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        if tmp.is_dir() and not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "manifest.json is missing (the checkpoint was not finished)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        return f"manifest.json is unreadable ({error})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or "state.json" not in files:
        return "manifest.json lists no files (or not state.json): not a checkpoint this library wrote"
    if not any(name.endswith(".safetensors") or name.startswith(f"{SHARDED_DIR}/") for name in files):
        return "manifest.json lists no weights (no .safetensors file, no dcp/ shards)"
    for name, digest in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"manifest.json names a file outside the checkpoint ({name!r})"
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum (corrupt or half-written)"
    return None


def read_checkpoint(path: Path) -> Checkpoint:
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is not usable: {problem}")
    manifest = json.loads((path / MANIFEST).read_text())
    tensors, objects = {}, {}
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            tensors[name[: -len(".safetensors")]] = _load_tensors(path / name)
        elif name.endswith(".pt"):
            try:
                objects[name[: -len(".pt")]] = torch.load(path / name, weights_only=True, map_location="cpu")
            except Exception as error:  # noqa: BLE001 -- weights_only refuses anything but tensors and plain data
                raise ValueError(f"checkpoint {path}: {name} holds more than tensors and plain data, so it is not "
                                 f"loaded ({type(error).__name__}); restore it from a copy or resume an earlier "
                                 "checkpoint") from None
    state = json.loads((path / "state.json").read_text())
    return Checkpoint(path=path, iteration=int(state["iteration"]), tensors=tensors, objects=objects, state=state)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` names: a checkpoint itself, a ``checkpoints/`` folder, or a run directory
    (then the newest intact checkpoint in its ``checkpoints/``; broken newer ones are skipped with a warning).

    Raises ``ValueError`` saying what was looked for when there is none.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such checkpoint, checkpoints folder or run directory: {str(path)!r}")
    if (path / MANIFEST).is_file() or (path.name.startswith(PREFIX) and path.is_dir()):
        problem = verify_checkpoint(path)
        if problem is not None:
            raise ValueError(f"checkpoint {path} is not usable: {problem}; pass its run directory to use the newest "
                             "intact checkpoint instead")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for candidate in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        warnings.warn(f"skipping checkpoint {candidate.name}: {problem}; falling back to the previous one", stacklevel=2)
    raise ValueError(f"{str(path)!r} holds no intact checkpoint (looked for {PREFIX}NNNNNN folders with a "
                     f"{MANIFEST} in {str(root)!r}); train longer or pass another run")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 -- safetensors raises its own error type for a foreign file
        raise ValueError(f"{path} is not a safetensors file ({type(error).__name__}: {error}); nothing in it was "
                         "executed. Restore it from a copy or resume an earlier checkpoint") from None


def load_latest_checkpoint(root: str | Path) -> Checkpoint | None:
    """The newest intact checkpoint under ``root``; broken newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return read_checkpoint(path)
        warnings.warn(f"skipping checkpoint {path.name}: {problem}; falling back to the previous one", stacklevel=2)
    return None


def read_model_weights(path: Path, *, ema: bool = True) -> dict[str, torch.Tensor]:
    """The trained tensors of checkpoint ``path`` as whole CPU tensors: the EMA when ``ema`` and the run kept one,
    else the weights; from safetensors, or reassembled from a sharded run's ``dcp/`` shards."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is not usable: {problem}")
    name = "ema" if ema and has_ema(path) else "model"
    if (path / SHARDED_DIR).is_dir():
        return _read_sharded(path / SHARDED_DIR, name)
    return _load_tensors(path / f"{name}.safetensors")


def has_ema(path: Path) -> bool:
    """Whether checkpoint ``path`` holds an EMA of the trained tensors (a file, or a group of its dcp/ shards)."""
    path = Path(path)
    if (path / SHARDED_DIR).is_dir():
        return _has_group(path / SHARDED_DIR, "ema")
    return (path / "ema.safetensors").is_file()


def _has_group(folder: Path, group: str) -> bool:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return any(key.startswith(f"{group}.") for key in keys)


def _read_sharded(folder: Path, group: str) -> dict[str, torch.Tensor]:
    """Whole tensors of ``group`` ("model" or "ema") from torch.distributed.checkpoint files, in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    prefix = f"{group}."
    tensors = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.items()
               if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not tensors:
        raise ValueError(f"sharded checkpoint {folder} holds no {group!r} tensors")
    dcp.load({group: tensors}, checkpoint_id=str(folder), no_dist=True)
    return tensors


# ---- a rank's training state: what a worker writes into a checkpoint and reads back ----

def learner_payload(learner: Learner) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(safetensors groups, torch.save groups) of an unsharded learner: the trained tensors and Adam's state."""
    ema = learner.ema_state()
    tensors = {"model": {k: v.cpu() for k, v in learner.trainable_state().items()},
               **({"ema": {k: v.cpu() for k, v in ema.items()}} if ema is not None else {})}
    # On the CPU like the rest: the driver that unpickles it may have no GPU (and holds no model on one).
    optimizer = learner.optimizer.state_dict()
    optimizer["state"] = {key: {name: value.cpu() if torch.is_tensor(value) else value for name, value in state.items()}
                          for key, state in optimizer["state"].items()}
    return tensors, {"optimizer": optimizer}


def save_learner_shards(learner: Learner, folder: str | Path) -> None:
    """Write this rank's shards of weights, Adam state and EMA into ``folder`` (torch.distributed.checkpoint;
    every rank calls it with the same folder)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(learner), checkpoint_id=str(folder))


def load_learner_state(learner: Learner, path: str | Path, *, sharded: bool) -> None:
    """Restore weights, Adam state and EMA from a checkpoint folder written by this run's configuration
    (``sharded``: this learner is FSDP-sharded)."""
    path = Path(path)
    if (path / SHARDED_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _dcp_state(learner)
        dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
        set_state_dict(learner.transformer, learner.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        return
    if sharded:
        raise ValueError(f"checkpoint {path} was written without learner.sharding=fsdp; resume it with the "
                         "sharding it was trained with")
    ckpt = read_checkpoint(path)
    learner.load_trainable_state(ckpt.tensors["model"], ckpt.tensors.get("ema"))
    learner.optimizer.load_state_dict(ckpt.objects["optimizer"])


def _dcp_state(learner: Learner) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = get_state_dict(learner.transformer, learner.optimizer)
    state = {"model": model, "optimizer": optimizer}
    if learner.ema is not None:
        state["ema"] = learner.ema.shadow
    return state


def load_trained_weights(transformer: nn.Module, checkpoint: str | Path, *, ema: bool = True) -> None:
    """Copy a checkpoint's trained tensors (its EMA when ``ema`` and present) into ``transformer``, sharded or not."""
    from policies.parallel.fsdp import copy_full_

    weights = read_model_weights(Path(checkpoint), ema=ema)
    params = dict(transformer.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"checkpoint {checkpoint} holds tensors this policy lacks, e.g. {unknown[:3]}; was it "
                         "written with other policy or learner.lora settings?")
    with torch.no_grad():
        for name, value in weights.items():
            copy_full_(params[name], value)
