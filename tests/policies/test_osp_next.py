"""OSP-Next model: equals diffusers' Wan (full layout) and the masked dense reference (hybrid layouts)."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from tests.policies.osp_fixtures import pad_text, tiny_diffusers_wan, tiny_inputs

from policies.osp_next import OSPNext, OSPNextConfig, SequencePlan
from policies.osp_next.checkpoint import diffusers_to_wan_key


def _ours_from(reference, **overrides) -> OSPNext:
    config = OSPNextConfig.preset("tiny", num_layers=len(reference.blocks), **overrides)
    model = OSPNext(config)
    state = {diffusers_to_wan_key(key): value for key, value in reference.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


class _MaskedProcessor:
    """diffusers' own Wan attention processor with a fixed boolean [N, N] self-attention mask."""

    def __init__(self, mask):
        self.inner, self.mask = WanAttnProcessor(), mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def _subsequence_mask(grid, pattern, k):
    """[N, N] True where two tokens share a Skiparse subsequence; written from the definition."""
    t, h, w = torch.meshgrid(*(torch.arange(s) for s in grid), indexing="ij")
    p, q = (h % k, w % k) if pattern == "token" else ((h // k) % k, (w // k) % k)
    sub = (p * k + q).reshape(-1)
    return sub[:, None] == sub[None, :]


def _masked_dense_reference(reference, kinds, grid, k):
    for block, kind in zip(reference.blocks, kinds):
        if kind != "full":
            block.attn1.processor = _MaskedProcessor(_subsequence_mask(grid, kind, k))
    return reference


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _forward_backward(model, latents, timesteps, text, diffusers=False):
    latents = latents.clone().requires_grad_(True)
    out = model(latents, timesteps, pad_text(text), return_dict=False)[0] if diffusers else model(
        latents, timesteps, text)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * grad_out).sum().backward()
    return out.detach(), latents.grad


def test_full_layout_equals_diffusers_forward_and_backward():
    reference = tiny_diffusers_wan(num_layers=2)
    ours = _ours_from(reference)
    inputs = tiny_inputs(batch=2, text_tokens=5)
    out_ref, grad_ref = _forward_backward(reference, *inputs, diffusers=True)
    out, grad = _forward_backward(ours, *inputs)
    # Same fp32 maths in the same order; RoPE tables are float32 here vs float64 in diffusers.
    assert _rel(out, out_ref) <= 1e-5 and _rel(grad, grad_ref) <= 1e-5
    ref_params = dict(reference.named_parameters())
    for ours_name, ref_name in (("blocks.1.self_attn.q.weight", "blocks.1.attn1.to_q.weight"),
                                ("blocks.0.norm3.weight", "blocks.0.norm2.weight"),
                                ("time_embedding.0.weight", "condition_embedder.time_embedder.linear_1.weight")):
        ours_grad = dict(ours.named_parameters())[ours_name].grad
        assert _rel(ours_grad, ref_params[ref_name].grad) <= 1e-5, ours_name


@pytest.mark.parametrize("kinds,latent_hw", [
    (["full", "token", "group", "full"], (8, 8)),
    (["full", "token", "group", "full"], (10, 12)),
    (["token", "group", "token", "group"], (10, 12)),
    (["group", "full", "token", "token"], (8, 16)),
], ids=["dual_end", "dual_end_padded", "all_sparse_padded", "mixed"])
def test_hybrid_layout_equals_masked_dense_reference(kinds, latent_hw):
    reference = tiny_diffusers_wan(num_layers=4)
    ours = _ours_from(reference, layout=kinds, sparse_ratio=2)
    inputs = tiny_inputs(batch=2, height=latent_hw[0], width=latent_hw[1], text_tokens=6)
    grid = (2, latent_hw[0] // 2, latent_hw[1] // 2)
    _masked_dense_reference(reference, kinds, grid, 2)
    out_ref, grad_ref = _forward_backward(reference, *inputs, diffusers=True)
    out, grad = _forward_backward(ours, *inputs)
    assert _rel(out, out_ref) <= 1e-5 and _rel(grad, grad_ref) <= 1e-5
    ours_grad = ours.blocks[2].self_attn.k.weight.grad
    assert _rel(ours_grad, reference.blocks[2].attn1.to_k.weight.grad) <= 1e-5
    # The reference really is sparse: without the masks it differs.
    dense = _forward_backward(tiny_diffusers_wan(num_layers=4), *inputs, diffusers=True)[0]
    assert _rel(out, dense) > 1e-3


def test_k1_sparse_blocks_are_full_attention():
    reference = tiny_diffusers_wan(num_layers=2)
    full = _ours_from(reference)
    sparse = _ours_from(reference, layout=["token", "group"], sparse_ratio=1)
    inputs = tiny_inputs(batch=1, height=6, width=10)
    with torch.no_grad():
        assert _rel(sparse(*inputs), full(*inputs)) <= 1e-6


class _ReversedBatchPlan(SequencePlan):
    """A stand-in for sequence parallelism: 'shards' reverse the batch axis, so any per-subsequence tensor that
    bypasses shard_batch would be paired with the wrong subsequence."""

    def __init__(self):
        self.calls = []

    def shard_batch(self, x):
        return x.flip(0)

    def unshard_batch(self, x):
        return x.flip(0)

    def enter_sparse(self, x_BNC, geometry, pattern):
        self.calls.append(("enter", pattern))
        return super().enter_sparse(x_BNC, geometry, pattern)

    def switch(self, x, geometry, from_pattern, to_pattern):
        self.calls.append(("switch", from_pattern, to_pattern))
        # Switching must commute with the batch sharding: undo it, switch, redo it.
        return self.shard_batch(super().switch(self.unshard_batch(x), geometry, from_pattern, to_pattern))

    def leave_sparse(self, x, geometry, pattern):
        self.calls.append(("leave", pattern))
        return super().leave_sparse(x, geometry, pattern)


def test_sequence_plan_routes_every_layout_operation():
    model = OSPNext(OSPNextConfig.preset("tiny", num_layers=6, layout="dual_end", num_full_blocks=2)).eval()
    inputs = tiny_inputs(batch=2, height=10, width=8)
    with torch.no_grad():
        expected = model(*inputs)
        plan = _ReversedBatchPlan()
        model.sequence_plan = plan
        got = model(*inputs)
    assert [b.kind for b in model.blocks] == ["full", "token", "group", "token", "group", "full"]
    assert plan.calls == [("enter", "token"), ("switch", "token", "group"), ("switch", "group", "token"),
                          ("switch", "token", "group"), ("leave", "group")]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_qkv_hook_sees_every_attention_and_changes_output():
    model = OSPNext(OSPNextConfig.preset("tiny", num_layers=2, layout=["full", "token"])).eval()
    inputs = tiny_inputs(batch=1, height=8, width=8)
    seen = []

    def hook(q, k, v):
        seen.append(q.shape[0])
        return q, k, v * 2

    with torch.no_grad():
        plain = model(*inputs)
        for block in model.blocks:
            block.self_attn.qkv_hook = hook
            block.cross_attn.qkv_hook = hook
        hooked = model(*inputs)
    assert seen == [1, 1, 4, 4]  # sparse blocks see the k*k subsequences in the batch
    assert _rel(hooked, plain) > 1e-3


def test_gradient_checkpointing_gives_identical_gradients():
    model = OSPNext(OSPNextConfig.preset("tiny", num_layers=3, layout=["full", "token", "group"]))
    inputs = tiny_inputs(batch=1, height=10, width=8)

    def grads():
        model.zero_grad()
        model(*inputs).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    for a, b in zip(grads(), plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_input_errors():
    model = OSPNext(OSPNextConfig.preset("tiny", num_layers=1))
    latents, timesteps, text = tiny_inputs(batch=1, height=7, width=8)
    with pytest.raises(ValueError, match=r"divisible by patch_size"):
        model(latents, timesteps, text)
    latents, timesteps, text = tiny_inputs(batch=1, text_tokens=9)
    with pytest.raises(ValueError, match="more than text_len=8"):
        model(latents, timesteps, text)
    with pytest.raises(ValueError, match=r"timesteps must be \[B\]"):
        model(latents, timesteps[None], text[:, :4])


def test_config_layouts_and_presets():
    osp = OSPNextConfig.preset("osp-next-14b")
    kinds = osp.block_kinds()
    assert kinds[:4] == ["full"] * 4 and kinds[36:] == ["full"] * 4
    assert kinds[4:36] == ["token", "group"] * 16 and (osp.dim, osp.num_heads, osp.head_dim) == (5120, 40, 128)
    assert OSPNextConfig.preset("osp-next-14b", layout="full").block_kinds() == ["full"] * 40
    assert OSPNextConfig.preset("wan2.1-t2v-1.3b").block_kinds() == ["full"] * 30
    assert OSPNextConfig.preset("tiny", num_layers=4, layout="dual_end", num_full_blocks=0).block_kinds() == [
        "token", "group", "token", "group"]


@pytest.mark.parametrize("overrides,message", [
    (dict(dim=25), "dim \\(25\\) must be divisible by num_heads \\(2\\)"),
    (dict(dim=18, num_heads=6), "head_dim = dim / num_heads = 3 must be even"),
    (dict(sparse_ratio=0), "sparse_ratio \\(k\\) must be an integer >= 1"),
    (dict(layout=["full", "token"]), "layout lists 2 block kinds but num_layers is 4"),
    (dict(layout=["full", "token", "dense", "full"]), "unknown block kinds \\['dense'\\]"),
    (dict(layout="dual_end", num_full_blocks=3), "num_full_blocks must be even"),
    (dict(layout="dual_end", num_full_blocks=6), "exceeds num_layers"),
    (dict(layout="uniform"), "layout must be one of"),
    (dict(attention_backend="xformers"), "attention_backend must be one of"),
    (dict(num_experts=2), "unknown OSPNextConfig overrides \\['num_experts'\\]"),
])
def test_config_validation_messages(overrides, message):
    with pytest.raises(ValueError, match=message):
        OSPNextConfig.preset("tiny", **overrides)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid presets are \\['osp-next-14b', 'tiny'"):
        OSPNextConfig.preset("wan2.2")


def test_set_layout_switches_kinds_in_place():
    reference = tiny_diffusers_wan(num_layers=4)
    model = _ours_from(reference)
    inputs = tiny_inputs(batch=1, height=10, width=8)
    with torch.no_grad():
        full = model(*inputs)
        model.set_layout("dual_end", num_full_blocks=2)
        hybrid = model(*inputs)
        assert [b.kind for b in model.blocks] == ["full", "token", "group", "full"]
        fresh = _ours_from(reference, layout="dual_end", num_full_blocks=2)
        torch.testing.assert_close(hybrid, fresh(*inputs), rtol=0, atol=0)
        model.set_layout("full")
        torch.testing.assert_close(model(*inputs), full, rtol=0, atol=0)


def test_rope_tables_follow_tokens_through_skiparse():
    from policies.osp_next.layout import SparseGeometry, sparse_position_tables
    from policies.osp_next.rope import axis_pairs, rope_angles
    from policies.osp_next.skiparse import pad_grid, skiparse_rearrange

    assert axis_pairs(128) == (22, 21, 21) and axis_pairs(12) == (2, 2, 2)
    grid = (2, 3, 5)
    angles = rope_angles(grid, 12)
    # Token (t=1, h=2, w=4) has angles t*f_t | h*f_h | w*f_w with Wan's per-axis frequencies.
    inv = [1.0 / 10000 ** (torch.arange(0, 4, 2, dtype=torch.float64) / 4)] * 3
    expected = torch.cat([1 * inv[0], 2 * inv[1], 4 * inv[2]])
    torch.testing.assert_close(angles[1 * 15 + 2 * 5 + 4], expected)
    geometry = SparseGeometry(grid=grid, k=2)
    rope, masks = sparse_position_tables(SequencePlan(), geometry, {"group"}, angles_ND2=angles, batch=3,
                                         device=torch.device("cpu"))
    cos, sin = rope["group"]
    padded, pgrid = pad_grid(angles[None], grid, 2)
    want = skiparse_rearrange(padded, pgrid, "group", 2).repeat_interleave(3, dim=0)
    torch.testing.assert_close(cos, torch.cos(want).float())
    mask = masks["group"]
    assert mask.shape == cos.shape[:2] and int(mask.sum()) == 3 * 30
    assert (cos[~mask] == 1).all() and (sin[~mask] == 0).all()  # padding: angle 0


def test_rope_real_and_complex_forms_agree():
    from policies.osp_next.rope import rotate_pairs_complex, rotate_pairs_real

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g)
    angles = torch.randn(2, 5, 1, 4, generator=g)
    real = rotate_pairs_real(x, angles.cos(), angles.sin())
    torch.testing.assert_close(rotate_pairs_complex(x, angles.cos(), angles.sin()), real, rtol=1e-6, atol=1e-6)
    # Pair (0, 1) of token 0, head 0 rotated by hand.
    c, s = angles[0, 0, 0, 0].cos(), angles[0, 0, 0, 0].sin()
    x1, x2 = x[0, 0, 0, 0], x[0, 0, 0, 1]
    torch.testing.assert_close(real[0, 0, 0, :2], torch.stack([x1 * c - x2 * s, x1 * s + x2 * c]))
