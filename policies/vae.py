"""Wan's video VAE (diffusers ``AutoencoderKLWan``) from a local folder, speaking the policy's conventions.

The policy side works in *normalised* latents, ``(z - latents_mean) / latents_std`` per channel, with the
statistics stored in the VAE's config (Wan2.1: 16 channels). That is the space the transformer was trained in
and the one diffusers' Wan pipelines sample in; ``decode`` undoes it before calling the VAE. Pixels are
``[0, 1]`` on the policy side and ``[-1, 1]`` inside the VAE.

Wan2.1 compresses 4x in time (the first frame alone, then groups of 4: T' = (T - 1) / 4 + 1) and 8x in space.

Shapes: B batch, T frames, C channels (3 for pixels, 16 for latents), H, W height and width.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKLWan
from torch import nn

from policies.text import require_any_file, resolve_component_dir


def normalize_latents(z_BCTHW: torch.Tensor, mean_C: torch.Tensor, std_C: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the per-channel standardised latents the transformer works in."""
    return (z_BCTHW - mean_C.view(1, -1, 1, 1, 1)) / std_C.view(1, -1, 1, 1, 1)


def denormalize_latents(latents_BCTHW: torch.Tensor, mean_C: torch.Tensor, std_C: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize_latents``."""
    return latents_BCTHW * std_C.view(1, -1, 1, 1, 1) + mean_C.view(1, -1, 1, 1, 1)


def check_video_size(
    num_frames: int,
    height: int,
    width: int,
    *,
    temporal_factor: int = 4,
    spatial_factor: int = 8,
    latent_patch: int = 1,
    owner: str = "",
) -> None:
    """Raise ValueError with the nearest valid sizes unless the video maps onto whole latents and patches.

    Frames must be ``temporal_factor * n + 1``; height and width multiples of ``spatial_factor * latent_patch``.
    ``owner`` prefixes the field names in messages (e.g. ``"WanPolicyConfig."``).
    """
    ft = temporal_factor
    if num_frames < 1 or (num_frames - 1) % ft != 0:
        n = max((num_frames - 1) // ft, 0)
        raise ValueError(
            f"{owner}num_frames must be {ft}n+1 for the Wan VAE ({ft}x temporal compression after the first "
            f"frame), got {num_frames}; use {ft * n + 1} or {ft * (n + 1) + 1}"
        )
    multiple = spatial_factor * latent_patch
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % multiple != 0:
            lower = max(size // multiple, 1) * multiple
            raise ValueError(
                f"{owner}{name} must be a positive multiple of {multiple} (VAE {spatial_factor}x spatial "
                f"compression times the transformer's {latent_patch}x patch), got {size}; "
                f"use {lower} or {lower + multiple}"
            )


class WanVAE(nn.Module):
    """``encode(videos_BTCHW in [0, 1]) -> latents_BCTHW`` and back, normalised as described above (frozen).

    Args:
        vae: the diffusers model.
        latent_patch: the transformer's spatial patch size; ``latent_shape`` then also checks that the latent
            height and width split into whole patches (Wan2.1: 2, so pixel sizes must be multiples of 16).
        tiling: decode/encode in overlapping spatial tiles (diffusers' ``enable_tiling``) to bound memory at
            720p; results differ slightly at tile seams.
    """

    def __init__(self, *, vae: AutoencoderKLWan, latent_patch: int = 1, tiling: bool = False) -> None:
        super().__init__()
        if latent_patch <= 0:
            raise ValueError(f"latent_patch must be a positive int (Wan2.1's patch is 2), got {latent_patch}")
        self.vae = vae.requires_grad_(False).eval()
        if tiling:
            self.vae.enable_tiling()
        self.latent_patch = latent_patch
        config = vae.config
        if len(config.latents_mean) != config.z_dim or len(config.latents_std) != config.z_dim:
            raise ValueError(
                f"VAE config has z_dim={config.z_dim} but {len(config.latents_mean)} latents_mean and "
                f"{len(config.latents_std)} latents_std values; fix the VAE's config.json so all three agree"
            )
        # Buffers so that .to(device) moves them; fp32 so normalisation is exact whatever the VAE's dtype.
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std, dtype=torch.float32), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        latent_patch: int = 1,
        tiling: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        field: str = "vae_path",
    ) -> "WanVAE":
        """Load from a local diffusers-format Wan model folder (``vae/`` inside) or the VAE's own folder.

        ``field`` is the config field named in error messages.
        """
        vae_dir = resolve_component_dir(path, "vae", what="Wan VAE", field=field)
        require_any_file(vae_dir, ("config.json",), what="AutoencoderKLWan config.json", field=field)
        vae = AutoencoderKLWan.from_pretrained(vae_dir, torch_dtype=dtype, local_files_only=True)
        return cls(vae=vae.to(device), latent_patch=latent_patch, tiling=tiling)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.scale_factor_temporal

    @property
    def spatial_factor(self) -> int:
        return self.vae.config.scale_factor_spatial

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latents of one ``num_frames x height x width`` video; validates the sizes."""
        ft, fs = self.temporal_factor, self.spatial_factor
        check_video_size(
            num_frames, height, width, temporal_factor=ft, spatial_factor=fs, latent_patch=self.latent_patch
        )
        return (self.latent_channels, (num_frames - 1) // ft + 1, height // fs, width // fs)

    def _check_videos(self, videos_BTCHW: torch.Tensor) -> None:
        if videos_BTCHW.ndim != 5 or videos_BTCHW.shape[2] != self.vae.config.in_channels:
            raise ValueError(
                f"videos must be [B, T, C={self.vae.config.in_channels}, H, W] in [0, 1], "
                f"got shape {tuple(videos_BTCHW.shape)}; permute a [B, C, T, H, W] tensor with .permute(0, 2, 1, 3, 4)"
            )
        self.latent_shape(videos_BTCHW.shape[1], videos_BTCHW.shape[3], videos_BTCHW.shape[4])

    @torch.no_grad()
    def encode(self, videos_BTCHW: torch.Tensor) -> torch.Tensor:
        """Videos in [0, 1] -> normalised fp32 latents [B, C, T', H', W'] (the posterior mode: deterministic)."""
        self._check_videos(videos_BTCHW)
        pixels_BCTHW = (videos_BTCHW.permute(0, 2, 1, 3, 4) * 2.0 - 1.0).to(self.vae.dtype)
        z_BCTHW = self.vae.encode(pixels_BCTHW).latent_dist.mode().float()
        return normalize_latents(z_BCTHW, self.latents_mean, self.latents_std)

    @torch.no_grad()
    def decode(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, T', H', W'] -> fp32 videos [B, T, 3, H, W] in [0, 1]."""
        if latents_BCTHW.ndim != 5 or latents_BCTHW.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must be [B, C={self.latent_channels}, T, H, W], got shape {tuple(latents_BCTHW.shape)}"
            )
        z_BCTHW = denormalize_latents(latents_BCTHW.float(), self.latents_mean, self.latents_std)
        pixels_BCTHW = self.vae.decode(z_BCTHW.to(self.vae.dtype)).sample.float()
        # diffusers already clamps to [-1, 1]; the clamp here keeps [0, 1] exact after the affine map.
        return ((pixels_BCTHW + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 1, 3, 4)
