"""The toy policy: a tiny hybrid OSP-Next in pixel space, with the toy text encoder and identity VAE.

``build_toy_policy()`` loads the base model shipped in ``policies/toy/assets/``. If that file is missing or
was made for another architecture (a config or tensor-shape mismatch after a code change), the base is
pretrained again once, with a warning, and cached under ``~/.cache/mixgrpo/`` (``$XDG_CACHE_HOME`` is honoured).

A toy weights file is a safetensors file holding ``transformer.*`` and ``text_encoder.*`` tensors next to a
JSON file of the same stem with ``{"config": ToyPolicyConfig fields, "pretrain": how it was made}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from policies.base import Policy, PolicySpec
from policies.files import atomic_write
from policies.osp_next import OSPNext, OSPNextConfig
from policies.toy.text import ToyTextEncoder, ToyTextEncoderConfig
from policies.toy.vae import ToyPixelVAE

ASSET_PATH = Path(__file__).parent / "assets" / "toy_policy.safetensors"


@dataclass(kw_only=True)
class ToyPolicyConfig:
    """Video size and model size of the toy policy, chosen so a Mix-GRPO iteration takes seconds on 2 CPU cores."""

    num_frames: int = 4
    height: int = 16
    width: int = 16
    dim: int = 64
    ffn_dim: int = 128
    num_heads: int = 2
    num_layers: int = 4
    freq_dim: int = 32
    layout: str | list[str] = "dual_end"
    """An OSP-Next layout: "dual_end" puts ``num_full_blocks // 2`` full blocks at each end, token/group between."""
    num_full_blocks: int = 2
    sparse_ratio: int = 2
    text_dim: int = 32
    text_max_words: int = 6
    text_layers: int = 1
    text_heads: int = 2

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"ToyPolicyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.height, self.width) < 12 or self.height % 2 or self.width % 2:
            raise ValueError(
                f"ToyPolicyConfig height x width = {self.height} x {self.width}: both must be even (patch 2) and "
                ">= 12 (the renderer's smallest frame); use e.g. 16 x 16"
            )
        # Building the sub-configs validates the remaining fields with their owners' messages.
        self.transformer_config()
        self.text_config()

    def transformer_config(self) -> OSPNextConfig:
        return OSPNextConfig(
            in_channels=ToyPixelVAE.channels,
            out_channels=ToyPixelVAE.channels,
            patch_size=(1, 2, 2),
            dim=self.dim,
            ffn_dim=self.ffn_dim,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            freq_dim=self.freq_dim,
            text_dim=self.text_dim,
            text_len=self.text_max_words,
            rope_max_seq_len=64,
            layout=self.layout,
            num_full_blocks=self.num_full_blocks,
            sparse_ratio=self.sparse_ratio,
        )

    def text_config(self) -> ToyTextEncoderConfig:
        return ToyTextEncoderConfig(
            dim=self.text_dim, max_words=self.text_max_words, num_layers=self.text_layers, num_heads=self.text_heads
        )

    def spec(self) -> PolicySpec:
        return PolicySpec(num_frames=self.num_frames, height=self.height, width=self.width)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ToyPolicyConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ToyPolicyConfig fields {unknown}; valid fields are {sorted(names)}")
        return cls(**data)


class ToyWeightsMismatch(ValueError):
    """A toy weights file does not fit the current code (other config or tensor shapes)."""


def make_toy_policy(config: ToyPolicyConfig | None = None, *, seed: int = 0) -> Policy:
    """A randomly initialised toy policy (deterministic for a given ``seed``)."""
    config = config or ToyPolicyConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = OSPNext(config.transformer_config())
        text_encoder = ToyTextEncoder(config.text_config())
    policy = Policy(transformer=transformer, text_encoder=text_encoder, vae=ToyPixelVAE(), spec=config.spec())
    policy.config = config
    return policy


def metadata_path(weights_path: str | Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def save_toy_policy(policy: Policy, path: str | Path, *, pretrain: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (safetensors: transformer + text encoder) and its JSON, each atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"toy weights path {str(path)!r} must end in .safetensors")
    tensors = {f"transformer.{k}": v for k, v in policy.transformer.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in policy.text_encoder.state_dict().items()})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    meta = {"config": policy.config.to_dict(), "pretrain": pretrain or {}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "mixgrpo-toy"}))
    atomic_write(metadata_path(path), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def read_toy_metadata(path: str | Path) -> dict[str, Any]:
    meta = metadata_path(path)
    if not meta.is_file():
        raise ToyWeightsMismatch(f"toy weights {str(path)!r} have no {meta.name} next to them; re-save them")
    return json.loads(meta.read_text())


def load_toy_policy(path: str | Path, *, expected: ToyPolicyConfig | None = None) -> Policy:
    """The toy policy stored at ``path``.

    Raises:
        FileNotFoundError: no such file.
        ToyWeightsMismatch: the file's config differs from ``expected`` or its tensors do not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no toy weights at {str(path)!r}; make them with `mixgrpo toy-pretrain --out FILE`")
    meta = read_toy_metadata(path)
    try:
        config = ToyPolicyConfig.from_dict(meta["config"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ToyWeightsMismatch(f"toy weights {str(path)!r} carry an unusable config: {exc}") from exc
    if expected is not None and config != expected:
        diff = sorted(k for k, v in expected.to_dict().items() if config.to_dict()[k] != v)
        raise ToyWeightsMismatch(f"toy weights {str(path)!r} were made for another architecture (fields {diff})")
    policy = make_toy_policy(config)
    tensors = load_file(str(path))
    for prefix, module in (("transformer.", policy.transformer), ("text_encoder.", policy.text_encoder)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # missing / unexpected keys or size mismatch
            raise ToyWeightsMismatch(f"toy weights {str(path)!r} do not fit the current {prefix[:-1]}: {exc}") from exc
    policy.pretrain_info = meta.get("pretrain", {})
    return policy


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixgrpo"


def build_toy_policy(weights: str | Path | None = None) -> Policy:
    """The pretrained toy base policy.

    Args:
        weights: a toy weights file; None = the shipped asset (or, if that no longer fits the code, a cached
            re-pretrained base, made once).
    """
    if weights is not None:
        return load_toy_policy(weights)
    expected = ToyPolicyConfig()
    try:
        return load_toy_policy(ASSET_PATH, expected=expected)
    except (FileNotFoundError, ToyWeightsMismatch) as exc:
        reason = str(exc)
    cached = cache_dir() / "toy_policy.safetensors"
    try:
        return load_toy_policy(cached, expected=expected)
    except (FileNotFoundError, ToyWeightsMismatch):
        pass
    warnings.warn(
        f"the shipped toy base model cannot be used ({reason}); pretraining a new one into {cached} "
        "(a few minutes, once)",
        stacklevel=2,
    )
    from policies.toy.pretrain import pretrain_toy

    pretrain_toy(out_path=cached)
    return load_toy_policy(cached, expected=expected)
