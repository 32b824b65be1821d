"""The real policy: an OSP-Next (Wan2.1) transformer, the UMT5 text encoder and the Wan VAE from local folders.

Weights come either from one diffusers-format Wan2.1 model folder (``transformer/``, ``text_encoder/``,
``tokenizer/``, ``vae/``) or from separate folders per component; a component's own path wins over
``model_dir``. Nothing is downloaded. Classifier-free guidance uses Wan's fixed negative prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from policies.base import Policy, PolicySpec
from policies.osp_next import OSPNext
from policies.text import WAN_NEGATIVE_PROMPT, WAN_TEXT_LENGTH, UMT5TextEncoder, resolve_component_dir
from policies.vae import WanVAE, check_video_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class WanPolicyConfig:
    """Where the Wan/OSP-Next weights live and how to run them."""

    model_dir: str | None = None
    """A diffusers-format Wan2.1 folder with transformer/, text_encoder/, tokenizer/, vae/."""
    transformer_path: str | None = None
    """The transformer's folder (diffusers Wan2.1 or ours) or an original Wan2.1 / OSP-Next weight file; overrides
    model_dir."""
    text_encoder_path: str | None = None
    """The UMT5 encoder's folder (config.json + weights); overrides model_dir."""
    tokenizer_path: str | None = None
    """The UMT5 tokenizer's folder; default: tokenizer/ inside the encoder's source folder, else that folder itself."""
    vae_path: str | None = None
    """The AutoencoderKLWan folder; overrides model_dir."""
    num_frames: int = 81
    """Frames per video (Wan: 4n + 1, e.g. 33 or 81)."""
    height: int = 720
    """Video height in pixels (a multiple of 16; 480 or 720 for Wan2.1)."""
    width: int = 1280
    """Video width in pixels (a multiple of 16; 832 or 1280 for Wan2.1)."""
    layout: str | list[str] | None = None
    """OSP-Next attention layout override ("full", "dual_end" or one kind per block); None keeps the checkpoint's."""
    num_full_blocks: int | None = None
    """Override for layout="dual_end" (OSP-Next: 8)."""
    sparse_ratio: int | None = None
    """Skiparse k override (OSP-Next: 2)."""
    dtype: str = "bfloat16"
    """The transformer's dtype: float32, bfloat16 or float16."""
    text_encoder_dtype: str | None = None
    """UMT5's dtype; None follows ``dtype``, except float16 -> bfloat16 (UMT5 overflows in float16, as Wan notes)."""
    vae_dtype: str = "float32"
    """Wan decodes in float32; float16/bfloat16 halve the VAE's memory at some cost in pixel accuracy."""
    vae_tiling: bool = False
    """Encode/decode in spatial tiles to bound the VAE's memory at 720p."""
    text_len: int | None = None
    """Tokens per prompt, the L of the text states [B, L, D]; None: the transformer's text_len (Wan: 512)."""

    _owner: ClassVar[str] = "WanPolicyConfig."
    """Prefix of field names in error messages (a config that embeds these fields names its own section)."""

    def __post_init__(self) -> None:
        self.check_fields()
        self.check_sources()

    def check_sources(self) -> None:
        """A local source for every component: ``model_dir``, or each component's own path."""
        if self.model_dir is None:
            missing = [f for f in ("transformer_path", "text_encoder_path", "vae_path") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"{self._owner}model_dir: set it to a local diffusers-format Wan2.1 folder, or set every "
                    f"component path; missing {', '.join(self._owner + m for m in missing)}"
                )

    def check_fields(self) -> None:
        owner = self._owner
        for name in ("dtype", "vae_dtype", "text_encoder_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{owner}{name} must be one of {sorted(DTYPES)}, got {value!r}")
        if self.text_encoder_dtype == "float16":
            raise ValueError(
                f"{owner}text_encoder_dtype='float16' overflows UMT5's activations; use 'bfloat16' or 'float32'"
            )
        if self.text_len is not None and self.text_len <= 0:
            raise ValueError(
                f"{owner}text_len must be positive or None (Wan uses {WAN_TEXT_LENGTH}), got {self.text_len}"
            )
        # Wan2.1's VAE and 2x2 patches fix these multiples; checked here so that a bad size fails before loading.
        check_video_size(self.num_frames, self.height, self.width, latent_patch=2, owner=owner)

    def component_dir(self, component: str) -> tuple[str, str]:
        """(path, config field to blame in errors) for "transformer", "text_encoder" or "vae"."""
        own = getattr(self, f"{component}_path")
        return (own, f"{component}_path") if own is not None else (self.model_dir, "model_dir")

    def transformer_overrides(self) -> dict[str, Any]:
        overrides = dict(layout=self.layout, num_full_blocks=self.num_full_blocks, sparse_ratio=self.sparse_ratio)
        return {key: value for key, value in overrides.items() if value is not None}

    def resolved_text_encoder_dtype(self) -> torch.dtype:
        name = self.text_encoder_dtype or ("bfloat16" if self.dtype == "float16" else self.dtype)
        return DTYPES[name]


def load_transformer(config: WanPolicyConfig, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    path, field = config.component_dir("transformer")
    if Path(path).is_file():  # an original Wan2.1 / OSP-Next weight file (e.g. the released EMA state dict)
        source = Path(path)
    else:
        source = resolve_component_dir(path, "transformer", what="Wan/OSP-Next transformer", field=field)
    model = OSPNext.from_pretrained(source, **config.transformer_overrides())
    return model.to(device=device, dtype=DTYPES[config.dtype])


def load_text_encoder(config: WanPolicyConfig, *, text_len: int, device: str | torch.device = "cpu") -> UMT5TextEncoder:
    path, field = config.component_dir("text_encoder")
    return UMT5TextEncoder.from_pretrained(
        path, tokenizer_path=config.tokenizer_path, max_length=text_len,
        dtype=config.resolved_text_encoder_dtype(), device=device, field=field,
    )


def load_vae(config: WanPolicyConfig, *, latent_patch: int, device: str | torch.device = "cpu") -> WanVAE:
    path, field = config.component_dir("vae")
    return WanVAE.from_pretrained(
        path, latent_patch=latent_patch, tiling=config.vae_tiling, dtype=DTYPES[config.vae_dtype],
        device=device, field=field,
    )


def build_wan_policy(config: WanPolicyConfig | None = None, /, *, device: str | torch.device = "cpu",
                     **fields: Any) -> Policy:
    """The Wan/OSP-Next policy on ``device`` from ``config``, or from ``WanPolicyConfig(**fields)``.

    The transformer is loaded first (the component most likely to be misconfigured), then the encoders; their
    widths and patch geometry are checked against it so that a mismatched folder fails here, not mid-rollout.
    """
    if config is None:
        config = WanPolicyConfig(**fields)
    elif fields:
        raise ValueError(f"build_wan_policy: pass a WanPolicyConfig or keyword fields, not both (got {sorted(fields)})")
    config.check_sources()
    transformer = load_transformer(config, device=device)
    model_config = transformer.config
    _, patch_h, patch_w = model_config.patch_size
    if patch_h != patch_w:
        raise ValueError(f"transformer patch_size {model_config.patch_size} has unequal h/w; Wan uses (1, 2, 2)")
    text_len = config.text_len if config.text_len is not None else model_config.text_len
    if text_len > model_config.text_len:
        raise ValueError(
            f"{config._owner}text_len={text_len} exceeds the transformer's text_len={model_config.text_len}; "
            "lower text_len or leave it None"
        )
    text_encoder = load_text_encoder(config, text_len=text_len, device=device)
    if text_encoder.dim != model_config.text_dim:
        raise ValueError(
            f"text encoder states are {text_encoder.dim}-d but the transformer's text_dim is {model_config.text_dim}; "
            "text_encoder_path and transformer_path must come from the same Wan2.1 model"
        )
    vae = load_vae(config, latent_patch=patch_h, device=device)
    if vae.latent_channels != model_config.in_channels:
        raise ValueError(
            f"the VAE makes {vae.latent_channels}-channel latents but the transformer takes "
            f"{model_config.in_channels}; vae_path and transformer_path must come from the same Wan2.1 model"
        )
    spec = PolicySpec(num_frames=config.num_frames, height=config.height, width=config.width)
    vae.latent_shape(spec.num_frames, spec.height, spec.width)
    return Policy(
        transformer=transformer, text_encoder=text_encoder, vae=vae, spec=spec, negative_prompt=WAN_NEGATIVE_PROMPT
    )
