"""Videos people can look at: mp4 files and contact sheets (PNG grids, frames along x, one row per video).

Videos come in as float arrays or tensors in [0, 1], either `[T, C, H, W]` (what the VAE decodes, per sample of
`[B, T, C, H, W]`) or `[T, H, W, C]`. Toy videos are a few pixels wide, so they are upscaled with
nearest-neighbour (no blur: every model pixel stays a visible square) until the short side is >= 128 px.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mixgrpo.results.runlog import atomic_path

MIN_SIDE_PX = 128
# Decoders overshoot [0, 1] by a little; anything beyond this is a wrong scale, not overshoot.
RANGE_TOLERANCE = 0.05
_CHANNELS = (1, 3)


def to_thwc(video: Any, *, layout: str | None = None) -> np.ndarray:
    """Float video `[T, C, H, W]` or `[T, H, W, C]` in [0, 1] -> float32 `[T, H, W, 3]` clipped to [0, 1].

    Args:
        video: numpy array or torch tensor (any device; detached here), 1 or 3 channels.
        layout: "TCHW" or "THWC"; needed only when both dim 1 and dim 3 could be channels (e.g. [T, 3, H, 3]).
    """
    if isinstance(video, torch.Tensor):
        video = video.detach().float().cpu().numpy()
    array = np.asarray(video, dtype=np.float32)
    if array.ndim != 4:
        raise ValueError(f"video must be 4-D [T, C, H, W] or [T, H, W, C]; got shape {tuple(array.shape)}")
    if layout is None:
        tchw, thwc = array.shape[1] in _CHANNELS, array.shape[3] in _CHANNELS
        if tchw == thwc:
            raise ValueError(
                f"cannot tell the channel axis of a video shaped {tuple(array.shape)}; pass layout='TCHW' or "
                "layout='THWC' (channels must be 1 or 3)"
            )
        layout = "TCHW" if tchw else "THWC"
    if layout == "TCHW":
        array = array.transpose(0, 2, 3, 1)
    elif layout != "THWC":
        raise ValueError(f"layout must be 'TCHW' or 'THWC', got {layout!r}")
    if array.shape[3] not in _CHANNELS:
        raise ValueError(f"video must have 1 or 3 channels; shape {tuple(array.shape)} as {layout}")
    if not np.isfinite(array).all():
        raise ValueError("video holds NaN or inf values; check the decoder output before writing it")
    lo, hi = float(array.min()), float(array.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"video values span [{lo:.3g}, {hi:.3g}] but must be in [0, 1]; divide uint8-scale videos by 255 "
            "and map [-1, 1] videos with (x + 1) / 2"
        )
    if array.shape[3] == 1:
        array = np.repeat(array, 3, axis=3)
    return np.clip(array, 0.0, 1.0)


def upscale_nearest(frames_THWC: np.ndarray, *, min_side: int = MIN_SIDE_PX) -> np.ndarray:
    """Repeat pixels by the smallest integer factor that makes min(H, W) >= `min_side`."""
    factor = max(1, math.ceil(min_side / min(frames_THWC.shape[1:3])))
    return frames_THWC.repeat(factor, axis=1).repeat(factor, axis=2)


def to_uint8(frames_THWC: np.ndarray) -> np.ndarray:
    return np.round(frames_THWC * 255.0).astype(np.uint8)


def mp4_writer_missing() -> str | None:
    """None when mp4s can be written here, else why not (imageio's ffmpeg plugin, imageio-ffmpeg, is absent)."""
    import importlib.util

    if importlib.util.find_spec("imageio_ffmpeg") is None:
        return "imageio's ffmpeg plugin is not installed (pip install imageio-ffmpeg)"
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as error:  # noqa: BLE001 -- any failure to find the binary means no mp4s
        return f"imageio-ffmpeg finds no ffmpeg binary ({error})"
    return None


def write_mp4(path: str | os.PathLike, video: Any, fps: float, *, layout: str | None = None) -> Path:
    """Write a float [0, 1] video as an H.264 mp4 that browsers play (yuv420p), atomically. Returns the path.

    Args:
        path: destination, must end in .mp4.
        video: `[T, C, H, W]` or `[T, H, W, C]` float array/tensor in [0, 1]; see `to_thwc`.
        fps: frames per second, > 0.
        layout: see `to_thwc`.
    """
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"write_mp4 path must end in .mp4, got {path.name!r}")
    if not fps > 0:
        raise ValueError(f"write_mp4 fps must be > 0, got {fps!r}")
    frames = to_uint8(upscale_nearest(to_thwc(video, layout=layout)))
    # yuv420p halves chroma resolution, so H.264 needs even sides: pad by repeating the last row/column.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with atomic_path(path) as tmp:
        iio.imwrite(
            tmp, frames, plugin="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=2
        )
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Read an mp4 back as float32 `[T, H, W, 3]` in [0, 1] (at the upscaled size it was written with)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"read_mp4: no video file at {path}")
    return iio.imread(path, plugin="FFMPEG").astype(np.float32) / 255.0


def sample_frames(frames_THWC: np.ndarray, max_frames: int) -> np.ndarray:
    """At most `max_frames` frames, evenly spaced, first and last included."""
    count = frames_THWC.shape[0]
    if count <= max_frames:
        return frames_THWC
    return frames_THWC[np.linspace(0, count - 1, max_frames).round().astype(int)]


def contact_sheet(
    videos: Sequence[Any],
    captions: Sequence[str],
    path: str | os.PathLike,
    *,
    max_frames: int = 8,
    layout: str | None = None,
) -> Path:
    """Save a PNG grid: one row per video (frames along x), its caption above the row. Atomic; returns the path.

    Args:
        videos: videos as accepted by `to_thwc` (tensors, arrays, or frames read back with `read_mp4`);
            sizes and lengths may differ between rows.
        captions: one per video (the prompt, reward, ...).
        path: destination PNG.
        max_frames: frames shown per row, evenly spaced.
        layout: see `to_thwc`.
    """
    if len(videos) == 0:
        raise ValueError("contact_sheet needs at least one video")
    if len(videos) != len(captions):
        raise ValueError(f"contact_sheet got {len(videos)} videos but {len(captions)} captions; pass one per video")
    if max_frames < 1:
        raise ValueError(f"contact_sheet max_frames must be >= 1, got {max_frames}")
    strips = []
    for video in videos:
        frames = sample_frames(upscale_nearest(to_thwc(video, layout=layout), min_side=64), max_frames)
        gap = np.ones((frames.shape[1], 2, 3), dtype=np.float32)  # white 2 px line between frames
        strips.append(np.concatenate([part for f in frames for part in (f, gap)][:-1], axis=1))
    # Same frame height on every row (rows left-aligned); shrink everything if the widest row is too wide.
    row_in = min(1.5, 16.0 / max(s.shape[1] / s.shape[0] for s in strips))
    width_in = max(row_in * s.shape[1] / s.shape[0] for s in strips)
    fig = Figure(figsize=(max(width_in, 3.0), len(strips) * (row_in + 0.3)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(strips), 1, squeeze=False)[:, 0]
    for ax, strip, caption in zip(axes, strips, captions, strict=True):
        ax.imshow(strip, interpolation="nearest", aspect="equal")
        ax.set_title(caption, fontsize=9, loc="left")
        ax.set_anchor("W")
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
