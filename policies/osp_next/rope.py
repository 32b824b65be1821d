"""Wan2.1 3-D rotary position embedding as real per-token cos/sin tables.

Shapes legend: N tokens in (t, h, w) raster order, D head_dim, D2 = D/2 frequency pairs, H heads.

The head_dim/2 frequency pairs are split t : h : w as Wan does (``D2 - 2*(D2//3)``, ``D2//3``, ``D2//3``; for
D=128 that is 22 : 21 : 21), each axis with ``1 / theta**(2i/d_axis)``. Tables are per token (not per axis) so the
Skiparse rearrangement can be applied to them exactly as to the tokens: every token keeps its global position
inside a subsequence, and a padded token gets angle 0 (cos 1, sin 0).
"""

from __future__ import annotations

import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Number of frequency pairs for the (t, h, w) axes."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def rope_angles(grid: tuple[int, int, int], head_dim: int, *, theta: float = 10000.0,
                max_seq_len: int = 1024) -> torch.Tensor:
    """Rotation angle of every (token, frequency pair): ``[T*H*W, D/2]`` float64 (CPU).

    ``max_seq_len`` is Wan's table length (1024): a grid axis longer than it has no position.
    """
    if max(grid) > max_seq_len:
        raise ValueError(f"grid {grid} has an axis longer than rope_max_seq_len={max_seq_len}; raise it")
    per_axis = []
    for size, pairs, axis in zip(grid, axis_pairs(head_dim), range(3)):
        inv_freq = 1.0 / theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
        angles = torch.arange(size, dtype=torch.float64)[:, None] * inv_freq[None, :]
        shape = [1, 1, 1, pairs]
        shape[axis] = size
        per_axis.append(angles.view(shape).expand(*grid, pairs))
    return torch.cat(per_axis, dim=-1).reshape(-1, head_dim // 2)


def rope_tables(angles: torch.Tensor, *, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of an angle table, float32 on ``device``; same shape as ``angles``."""
    return torch.cos(angles).to(device, torch.float32), torch.sin(angles).to(device, torch.float32)


def rotate_pairs_real(x_BNHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos) on float32 channel pairs; cos/sin broadcast to pairs."""
    x = x_BNHD.float().unflatten(-1, (-1, 2))
    x1, x2 = x[..., 0], x[..., 1]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x_BNHD.dtype)


def rotate_pairs_complex(x_BNHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation as one complex multiply (three passes over the activations instead of about ten)."""
    pairs = torch.view_as_complex(x_BNHD.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x_BNHD.dtype)


def apply_rope(x_BNHD: torch.Tensor, cos_BND2: torch.Tensor, sin_BND2: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of every head by the token's angles (Wan's complex convention).

    Args:
        x_BNHD: ``[B, N, H, D]`` queries or keys.
        cos_BND2, sin_BND2: ``[B or 1, N, D/2]`` float32 tables.

    Returns:
        ``[B, N, H, D]`` in the dtype of ``x_BNHD``; the rotation runs in float32: complex form in eager mode,
        real form under torch.compile (inductor fuses it into one kernel; it does not lower complex tensors).
    """
    rotate = rotate_pairs_real if torch.compiler.is_compiling() else rotate_pairs_complex
    return rotate(x_BNHD, cos_BND2.unsqueeze(2), sin_BND2.unsqueeze(2))
