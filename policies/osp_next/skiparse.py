"""Skiparse-2D rearrangements: sparse attention by moving tokens into the batch.

Pure tensor functions (view / permute / reshape only), no parameters.

Shapes legend: B batch, N = T*H*W tokens in (t, h, w) raster order on the patch grid ``grid = (T, H, W)``,
k the sparse ratio, P = k*k subsequences per sample. Trailing dims after N (channels, or nothing extra)
are carried along untouched, so the same functions serve hidden states ``[B, N, C]``, RoPE tables
``[1, N, D/2]`` and masks ``[B, N]``.

Index semantics (a fixed contract: other code and the tests rely on this exact order). Write ``h = a*k*k + p1*k + p2`` and ``w = c*k*k + q1*k + q2``:

- token subsequence (p, q) = tokens with ``h % k == p`` and ``w % k == q`` (p = p2, q = q2), in raster order of
  ``(t, h//k, w//k)``;
- group subsequence (p, q) = tokens with ``(h//k) % k == p`` and ``(w//k) % k == q`` (p = p1, q = q1), in raster
  order of ``(t, a, p2, c, q2)``;
- output batch index of subsequence (p, q) of sample b is ``(p*k + q)*B + b``.

Both layouts are the same 9-d view ``[k, k, B, T, a, k, c, k, rest]`` of the data with the roles of (p1, q1)
and (p2, q2) exchanged, which is why the token <-> group switch is a single permutation and an involution.
"""

from __future__ import annotations

from typing import Literal

import torch

Pattern = Literal["token", "group"]
PATTERNS: tuple[str, ...] = ("token", "group")

# Raster view of a full sequence: [B, T, a, p1, p2, c, q1, q2, R] (R = flattened trailing dims).
_DIM_B, _DIM_T, _DIM_A, _DIM_P1, _DIM_P2, _DIM_C, _DIM_Q1, _DIM_Q2, _DIM_R = range(9)
# Which raster dims go into the batch (outer first) and the sequence, per pattern.
_BATCH_DIMS = {"token": (_DIM_P2, _DIM_Q2), "group": (_DIM_P1, _DIM_Q1)}
_SEQ_DIMS = {
    "token": (_DIM_T, _DIM_A, _DIM_P1, _DIM_C, _DIM_Q1),
    "group": (_DIM_T, _DIM_A, _DIM_P2, _DIM_C, _DIM_Q2),
}


def _check_pattern(pattern: str, argument: str = "pattern") -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"{argument} must be one of {PATTERNS}, got {pattern!r}")


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the sparse ratio) must be an integer >= 1, got {k!r}")


def padded_grid(grid: tuple[int, int, int], k: int) -> tuple[int, int, int]:
    """The grid with H and W rounded up to multiples of k*k (T is never padded)."""
    _check_k(k)
    t, h, w = grid
    block = k * k
    return (t, -(-h // block) * block, -(-w // block) * block)


def _check_grid(grid: tuple[int, int, int], k: int) -> None:
    _check_k(k)
    t, h, w = grid
    if min(t, h, w) < 1:
        raise ValueError(f"grid must be (T, H, W) with positive sizes, got {grid}")
    if h % (k * k) or w % (k * k):
        _, hp, wp = padded_grid(grid, k)
        raise ValueError(
            f"grid {grid}: H and W must be multiples of k*k = {k * k} for Skiparse-2D with k={k}; "
            f"pad H by {hp - h} and W by {wp - w} (to {hp}x{wp}) first, e.g. with pad_grid(x, grid, k)"
        )


def _raster_view(x: torch.Tensor, grid: tuple[int, int, int], k: int) -> torch.Tensor:
    """[B, T*H*W, ...] -> [B, T, a, p1, p2, c, q1, q2, R]."""
    t, h, w = grid
    if x.dim() < 2 or x.shape[1] != t * h * w:
        raise ValueError(f"x must be [B, T*H*W, ...] with T*H*W = {t * h * w} for grid {grid}, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], t, h // (k * k), k, k, w // (k * k), k, k, -1)


def skiparse_rearrange(x: torch.Tensor, grid: tuple[int, int, int], pattern: Pattern, k: int) -> torch.Tensor:
    """Full sequence -> subsequences in the batch.

    Args:
        x: ``[B, T*H*W, ...]`` in (t, h, w) raster order.
        grid: patch grid (T, H, W); H and W multiples of k*k.
        pattern: "token" or "group".
        k: sparse ratio.

    Returns:
        ``[k*k*B, T*H*W/(k*k), ...]``; batch index ``(p*k + q)*B + b``.
    """
    _check_pattern(pattern)
    _check_grid(grid, k)
    view = _raster_view(x, grid, k)
    order = _BATCH_DIMS[pattern] + (_DIM_B,) + _SEQ_DIMS[pattern] + (_DIM_R,)
    out = view.permute(order)
    return out.reshape(k * k * x.shape[0], x.shape[1] // (k * k), *x.shape[2:])


def skiparse_restore(y: torch.Tensor, grid: tuple[int, int, int], pattern: Pattern, k: int) -> torch.Tensor:
    """Exact inverse of :func:`skiparse_rearrange`: ``[k*k*B, N/(k*k), ...] -> [B, N, ...]``."""
    _check_pattern(pattern)
    _check_grid(grid, k)
    t, h, w = grid
    p = k * k
    if y.dim() < 2 or y.shape[0] % p or y.shape[1] * p != t * h * w:
        raise ValueError(
            f"y must be [k*k*B, T*H*W/(k*k), ...] = [{p}*B, {t * h * w // p}, ...] for grid {grid} and k={k}, "
            f"got {tuple(y.shape)}"
        )
    b = y.shape[0] // p
    # Sequence dims of the pattern, sized; then undo the permutation of skiparse_rearrange.
    order = _BATCH_DIMS[pattern] + (_DIM_B,) + _SEQ_DIMS[pattern] + (_DIM_R,)
    sizes = {_DIM_B: b, _DIM_T: t, _DIM_A: h // p, _DIM_C: w // p, _DIM_R: -1}
    for dim in (_DIM_P1, _DIM_P2, _DIM_Q1, _DIM_Q2):
        sizes[dim] = k
    permuted = y.reshape(*(sizes[d] for d in order))
    inverse = [order.index(d) for d in range(9)]
    return permuted.permute(inverse).reshape(b, t * h * w, *y.shape[2:])


def skiparse_switch(
    x: torch.Tensor, grid: tuple[int, int, int], from_pattern: Pattern, to_pattern: Pattern, k: int
) -> torch.Tensor:
    """Token <-> group layout in one permutation; equals restore(from) then rearrange(to).

    Args:
        x: ``[k*k*B, T*H*W/(k*k), ...]`` in ``from_pattern`` layout.

    Returns:
        the same data in ``to_pattern`` layout (``x`` itself when the patterns are equal).
    """
    _check_pattern(from_pattern, "from_pattern")
    _check_pattern(to_pattern, "to_pattern")
    _check_grid(grid, k)
    if from_pattern == to_pattern:
        return x
    t, h, w = grid
    p = k * k
    if x.dim() < 2 or x.shape[0] % p or x.shape[1] * p != t * h * w:
        raise ValueError(
            f"x must be [k*k*B, T*H*W/(k*k), ...] = [{p}*B, {t * h * w // p}, ...] for grid {grid} and k={k}, "
            f"got {tuple(x.shape)}"
        )
    b = x.shape[0] // p
    # Both layouts view as [u, v, B, T, a, u', c, v', R]; the switch swaps (u, v) with (u', v').
    view = x.reshape(k, k, b, t, h // p, k, w // p, k, -1)
    return view.permute(5, 7, 2, 3, 4, 0, 6, 1, 8).reshape(x.shape)


def pad_grid(
    x_BNC: torch.Tensor, grid: tuple[int, int, int], k: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad H and W (at the bottom / right) to multiples of k*k.

    Args:
        x_BNC: ``[B, T*H*W, ...]``.

    Returns:
        (``[B, T*H'*W', ...]``, padded grid ``(T, H', W')``); ``x_BNC`` itself when no padding is needed.
    """
    target = padded_grid(grid, k)
    t, h, w = grid
    if x_BNC.dim() < 2 or x_BNC.shape[1] != t * h * w:
        raise ValueError(f"x_BNC must be [B, T*H*W, ...] with T*H*W = {t * h * w}, got {tuple(x_BNC.shape)}")
    if target == tuple(grid):
        return x_BNC, target
    _, hp, wp = target
    x = x_BNC.reshape(x_BNC.shape[0], t, h, w, -1)
    x = torch.nn.functional.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    return x.reshape(x_BNC.shape[0], t * hp * wp, *x_BNC.shape[2:]), target


def crop_grid(
    x_BNC: torch.Tensor, padded: tuple[int, int, int], grid: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`pad_grid`: keep the top-left ``grid`` of a ``padded`` sequence."""
    t, hp, wp = padded
    _, h, w = grid
    if x_BNC.dim() < 2 or x_BNC.shape[1] != t * hp * wp or h > hp or w > wp or grid[0] != t:
        raise ValueError(f"cannot crop {tuple(x_BNC.shape)} on padded grid {padded} to grid {grid}")
    if (h, w) == (hp, wp):
        return x_BNC
    x = x_BNC.reshape(x_BNC.shape[0], t, hp, wp, -1)[:, :, :h, :w]
    return x.reshape(x_BNC.shape[0], t * h * w, *x_BNC.shape[2:])


def valid_mask(grid: tuple[int, int, int], k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[T*H'*W']`` bool on the padded grid: True for real tokens, False for padding."""
    t, h, w = grid
    _, hp, wp = padded_grid(grid, k)
    mask = torch.zeros(t, hp, wp, dtype=torch.bool, device=device)
    mask[:, :h, :w] = True
    return mask.reshape(-1)
