"""Skiparse-2D rearrangements: exact index semantics, inverses, switch, padding, errors."""

import itertools

import pytest
import torch

from policies.osp_next.skiparse import (
    crop_grid,
    pad_grid,
    padded_grid,
    skiparse_rearrange,
    skiparse_restore,
    skiparse_switch,
    valid_mask,
)

GRIDS_K = [((2, 4, 8), 2), ((1, 8, 4), 2), ((3, 9, 9), 3), ((2, 3, 5), 1)]


def _positions(grid):
    """[1, N, 3] integer (t, h, w) of every token, in raster order."""
    t, h, w = grid
    pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    return pos.reshape(1, -1, 3)


def _expected_subsequences(grid, pattern, k):
    """Explicit python loop: list over (p, q) of the (t, h, w) tuples of that subsequence, in order."""
    t_, h_, w_ = grid
    out = []
    for p, q in itertools.product(range(k), range(k)):
        members = []
        for t, h, w in itertools.product(range(t_), range(h_), range(w_)):
            if pattern == "token" and h % k == p and w % k == q:
                members.append(((t, h // k, w // k), (t, h, w)))
            if pattern == "group" and (h // k) % k == p and (w // k) % k == q:
                members.append(((t, h // (k * k), h % k, w // (k * k), w % k), (t, h, w)))
        out.append([pos for _, pos in sorted(members)])
    return out


@pytest.mark.parametrize("pattern", ["token", "group"])
@pytest.mark.parametrize("grid,k", GRIDS_K[:3])
def test_index_semantics_match_python_loop(grid, k, pattern):
    batch = 2
    pos = _positions(grid).repeat(batch, 1, 1)
    pos = torch.cat([pos, torch.arange(batch).view(batch, 1, 1).expand(-1, pos.shape[1], 1)], -1)
    y = skiparse_rearrange(pos, grid, pattern, k)
    assert y.shape == (k * k * batch, pos.shape[1] // (k * k), 4)
    expected = _expected_subsequences(grid, pattern, k)
    for (p, q), b in itertools.product(itertools.product(range(k), range(k)), range(batch)):
        row = y[(p * k + q) * batch + b]
        assert (row[:, 3] == b).all()
        assert [tuple(r) for r in row[:, :3].tolist()] == expected[p * k + q]


@pytest.mark.parametrize("pattern", ["token", "group"])
@pytest.mark.parametrize("grid,k", GRIDS_K)
def test_restore_is_exact_inverse(grid, k, pattern):
    x = torch.randn(3, grid[0] * grid[1] * grid[2], 5)
    y = skiparse_rearrange(x, grid, pattern, k)
    assert torch.equal(skiparse_restore(y, grid, pattern, k), x)
    assert torch.equal(skiparse_rearrange(skiparse_restore(y, grid, pattern, k), grid, pattern, k), y)


def test_trailing_dims_and_masks_are_carried():
    grid, k = (2, 4, 4), 2
    table = torch.randn(1, 32, 3, 2)
    mask = torch.rand(2, 32) > 0.5
    assert torch.equal(skiparse_restore(skiparse_rearrange(table, grid, "group", k), grid, "group", k), table)
    y = skiparse_rearrange(mask, grid, "token", k)
    assert y.shape == (8, 8) and y.dtype == torch.bool
    assert torch.equal(skiparse_restore(y, grid, "token", k), mask)


@pytest.mark.parametrize("grid,k", GRIDS_K)
def test_switch_equals_restore_then_rearrange_and_is_involution(grid, k):
    x = torch.randn(2, grid[0] * grid[1] * grid[2], 3)
    tok = skiparse_rearrange(x, grid, "token", k)
    grp = skiparse_rearrange(x, grid, "group", k)
    assert torch.equal(skiparse_switch(tok, grid, "token", "group", k), grp)
    assert torch.equal(skiparse_switch(grp, grid, "group", "token", k), tok)
    assert torch.equal(skiparse_switch(skiparse_switch(tok, grid, "token", "group", k), grid, "group", "token", k), tok)
    assert skiparse_switch(tok, grid, "token", "token", k) is tok


def test_switch_backward_is_the_inverse_permutation():
    grid, k = (1, 4, 8), 2
    tok = torch.randn(4, 8, 2, requires_grad=True)
    grad_out = torch.randn(4, 8, 2)
    skiparse_switch(tok, grid, "token", "group", k).backward(grad_out)
    assert torch.equal(tok.grad, skiparse_switch(grad_out, grid, "group", "token", k))


def test_pad_crop_and_valid_mask():
    grid, k = (2, 5, 7), 2
    assert padded_grid(grid, k) == (2, 8, 8)
    x = torch.randn(2, 70, 3)
    xp, pgrid = pad_grid(x, grid, k)
    assert pgrid == (2, 8, 8) and xp.shape == (2, 128, 3)
    mask = valid_mask(grid, k)
    assert mask.shape == (128,) and int(mask.sum()) == 70
    assert torch.equal(xp[:, mask], x)
    assert (xp[:, ~mask] == 0).all()
    assert torch.equal(crop_grid(xp, pgrid, grid), x)
    same, sgrid = pad_grid(x[:, :64], (1, 8, 8), k)
    assert sgrid == (1, 8, 8) and same.shape == (2, 64, 3)


def test_errors_name_the_fix():
    x = torch.randn(1, 2 * 6 * 8, 4)
    with pytest.raises(ValueError, match=r"pad H by 2 and W by 0 \(to 8x8\)"):
        skiparse_rearrange(x, (2, 6, 8), "token", 2)
    with pytest.raises(ValueError, match="pattern must be one of"):
        skiparse_rearrange(x, (2, 6, 8), "tokens", 1)
    with pytest.raises(ValueError, match="sparse ratio"):
        skiparse_rearrange(x, (2, 6, 8), "token", 0)
    with pytest.raises(ValueError, match=r"T\*H\*W = 128"):
        skiparse_rearrange(x, (2, 8, 8), "token", 2)
    with pytest.raises(ValueError, match="y must be"):
        skiparse_restore(torch.randn(3, 24, 4), (2, 4, 12), "group", 2)
