"""Attention backends and sparse (Skiparse) attention vs dense attention under the equivalent mask."""

import pytest
import torch

from policies.osp_next.attention import attention, flash_available, math_attention, resolve_backend
from policies.osp_next.skiparse import pad_grid, skiparse_rearrange, skiparse_restore, valid_mask, crop_grid


def _qkv(b=2, n=10, heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads, d, generator=g, requires_grad=True) for _ in range(3)]


def _grads(out, inputs, seed=1):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_matches_math_reference_forward_and_backward(masked):
    q, k, v = _qkv()
    mask = torch.rand(2, 10, generator=torch.Generator().manual_seed(3)) > 0.4 if masked else None
    ref = attention(q, k, v, key_mask=mask, backend="math")
    out = attention(q, k, v, key_mask=mask, backend="sdpa")
    # fp32 kernels differ only in summation order.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g_out, g_ref in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)


def test_masked_keys_are_ignored_and_equal_dropping_them():
    q, k, v = _qkv(b=1)
    mask = torch.tensor([[True, False, True, True, False, True, True, True, False, True]])
    out = attention(q, k, v, key_mask=mask, backend="sdpa")
    keep = mask[0]
    dropped = math_attention(q, k[:, keep], v[:, keep])
    torch.testing.assert_close(out, dropped, rtol=1e-5, atol=1e-6)
    changed_v = v.detach().clone()
    changed_v[:, ~keep] = 1e3
    torch.testing.assert_close(attention(q, k, changed_v, key_mask=mask, backend="sdpa"), out)


def test_all_padding_row_stays_finite():
    q, k, v = _qkv(b=2, n=4)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    for backend in ("math", "sdpa"):
        assert torch.isfinite(attention(q, k, v, key_mask=mask, backend=backend)).all()


def test_backend_selection_and_errors():
    q = torch.randn(1, 2, 1, 4)
    assert resolve_backend("auto", q) == "sdpa"  # CPU fp32 never picks flash
    assert resolve_backend("math", q) == "math"
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, q, q, backend="xformers")
    with pytest.raises(ValueError, match=r"key_mask must be bool \[B, Nk\]"):
        attention(q, q, q, key_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q, k, v must be \[B, N, H, D\]"):
        attention(q, q[:, :, :, :2], q)
    if not flash_available():
        with pytest.raises(ValueError, match="needs flash_attn_interface"):
            attention(q, q, q, backend="flash")


def _subsequence_id(grid, pattern, k):
    """[T*H*W] id of the subsequence each token belongs to (explicit formula, not the rearrangement)."""
    t, h, w = torch.meshgrid(*(torch.arange(s) for s in grid), indexing="ij")
    if pattern == "token":
        p, q = h % k, w % k
    else:
        p, q = (h // k) % k, (w // k) % k
    return (p * k + q).reshape(-1)


@pytest.mark.parametrize("pattern", ["token", "group"])
@pytest.mark.parametrize("grid", [(2, 4, 8), (2, 5, 6)], ids=["no_padding", "padded"])
def test_sparse_attention_equals_masked_dense_attention(grid, pattern):
    k_ratio, batch = 2, 2
    n = grid[0] * grid[1] * grid[2]
    q, k, v = _qkv(b=batch, n=n, heads=2, d=6)
    sub = _subsequence_id(grid, pattern, k_ratio)
    dense_mask = sub[:, None] == sub[None, :]
    dense = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=dense_mask).transpose(1, 2)

    def to_sparse(t):
        padded, pgrid = pad_grid(t.flatten(2), grid, k_ratio)
        return skiparse_rearrange(padded, pgrid, pattern, k_ratio).unflatten(2, t.shape[2:]), pgrid

    (qs, pgrid), (ks, _), (vs, _) = (to_sparse(t) for t in (q, k, v))
    mask = skiparse_rearrange(valid_mask(grid, k_ratio)[None].expand(batch, -1), pgrid, pattern, k_ratio)
    out = attention(qs, ks, vs, key_mask=mask, backend="sdpa")
    sparse = crop_grid(skiparse_restore(out.flatten(2), pgrid, pattern, k_ratio), pgrid, grid).unflatten(2, (2, 6))
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    for g_sparse, g_dense in zip(_grads(sparse, (q, k, v)), _grads(dense, (q, k, v))):
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-5, atol=1e-6)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """A varlen kernel written out: attention per packed segment (stands in for the CUDA flash kernels)."""
    outs = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        assert qi.shape[0] <= max_q and ki.shape[0] <= max_k
        outs.append(math_attention(qi[None], ki[None], vi[None])[0])
    return torch.cat(outs)


@pytest.mark.parametrize("masked", [False, True])
def test_packed_varlen_path_matches_masked_attention(masked):
    from policies.osp_next.attention import _packed_attention

    q, k, v = _qkv(b=3, n=7)
    mask = None
    if masked:
        mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(5)) > 0.5
        mask[2] = False  # an all-padding row must stay finite, as in the other backends
    out = _packed_attention(_reference_varlen, q, k, v, mask)
    ref = attention(q, k, v, key_mask=mask, backend="math")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g_out, g_ref in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)
    if masked:  # the packing is cached per mask tensor
        assert _packed_attention(_reference_varlen, q, k, v, mask).equal(out)
