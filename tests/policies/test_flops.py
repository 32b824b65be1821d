"""The DiT FLOPs formula against torch's FLOP counter on the tiny OSP-Next and the toy transformer.

Attention runs on the "math" backend here: torch's counter has no formula for the CPU SDPA kernel, while the
math backend's two einsums are batched matmuls it counts. With that, forward and backward agree exactly.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from policies.osp_next import OSPNext, OSPNextConfig
from policies.osp_next.flops import backward_flops, forward_flops, rollout_flops, update_flops
from policies.toy import ToyPolicyConfig


def _count(fn) -> int:
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return mode.get_total_flops()


def _inputs(config: OSPNextConfig, batch: int, latent: tuple[int, int, int], tokens: int, *, grad: bool):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, config.in_channels, *latent, generator=g).requires_grad_(grad)
    timesteps = (torch.rand(batch, generator=g) * 1000).requires_grad_(grad)
    text = torch.randn(batch, tokens, config.text_dim, generator=g).requires_grad_(grad)
    return latents, timesteps, text


CASES = {
    "full": dict(layout="full"),
    "dual_end": dict(layout="dual_end", num_full_blocks=2),
    "all_sparse_k2": dict(layout=["token", "group", "token", "group"]),
}


@pytest.mark.parametrize("layout", sorted(CASES))
@pytest.mark.parametrize("latent", [(2, 8, 8), (2, 6, 10)], ids=["no_pad", "skiparse_pad"])
def test_forward_and_full_backward_match_flop_counter(layout, latent):
    config = OSPNextConfig.preset("tiny", attention_backend="math", **CASES[layout])
    model = OSPNext(config)
    latents, timesteps, text = _inputs(config, 2, latent, 5, grad=True)
    grid = tuple(s // p for s, p in zip(latent, config.patch_size))
    with torch.no_grad():
        assert _count(lambda: model(latents, timesteps, text)) == forward_flops(config, grid, batch=2)
    # Every input carries a gradient, so every matmul computes both of its gradients: exactly 2x forward.
    total = _count(lambda: model(latents, timesteps, text).square().sum().backward())
    assert total == forward_flops(config, grid, batch=2) + backward_flops(config, grid, batch=2, lora=False)


@pytest.mark.parametrize("layout", ["full", "dual_end"])
def test_lora_backward_is_the_input_gradient_pass(layout):
    """Frozen weights, a gradient entering at the first block (where LoRA's first trained layer sits): the
    counter sees the forward plus input gradients of the blocks' linears and head, and dq/dk/dv of attention."""
    config = OSPNextConfig.preset("tiny", attention_backend="math", **CASES[layout])
    model = OSPNext(config).requires_grad_(False)
    model.blocks[0].register_forward_pre_hook(lambda _m, args: (args[0].detach().requires_grad_(True), *args[1:]))
    # LoRA on cross_attn.k / .v (the default targets): their outputs carry a gradient (the adapter's), the frozen
    # projection's input (the text) does not, so attention computes dk and dv but nothing flows into the text.
    for block in model.blocks:
        for proj in (block.cross_attn.k, block.cross_attn.v):
            proj.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))
    latents, timesteps, text = _inputs(config, 2, (2, 8, 8), 5, grad=False)
    grid = (2, 4, 4)
    total = _count(lambda: model(latents, timesteps, text).square().sum().backward())
    assert total == forward_flops(config, grid, batch=2) + backward_flops(config, grid, batch=2, lora=True)


def test_toy_transformer_forward_matches_flop_counter():
    toy = ToyPolicyConfig()
    config = OSPNextConfig.from_dict(toy.transformer_config().to_dict(), attention_backend="math")
    model = OSPNext(config)
    latent = (toy.num_frames, toy.height, toy.width)  # the toy VAE is the identity on pixels
    latents, timesteps, text = _inputs(config, 3, latent, toy.text_max_words, grad=False)
    grid = (toy.num_frames, toy.height // 2, toy.width // 2)
    with torch.no_grad():
        assert _count(lambda: model(latents, timesteps, text)) == forward_flops(config, grid, batch=3)


def test_rollout_and_update_totals():
    config = OSPNextConfig.preset("tiny")
    per = forward_flops(config, (2, 4, 4))
    assert rollout_flops(config, (2, 8, 8), num_videos=3, num_steps=5, cfg=True) == 2 * 3 * 5 * per
    assert rollout_flops(config, (2, 8, 8), num_videos=3, num_steps=5, cfg=False) == 3 * 5 * per
    full = update_flops(config, (2, 8, 8), num_samples=4, trained_steps=2, cfg=False, lora=False,
                        reference_forward=False)
    assert full == 4 * 2 * 3 * per
    lora_kl = update_flops(config, (2, 8, 8), num_samples=4, trained_steps=2, cfg=True, lora=True,
                           reference_forward=True)
    assert lora_kl == 4 * 2 * 2 * (2 * per + backward_flops(config, (2, 4, 4), lora=True))
    assert 2 * per < per + backward_flops(config, (2, 4, 4), lora=True) < 3 * per


def test_sparse_blocks_cost_less_attention_and_14b_magnitude():
    full = OSPNextConfig.preset("wan2.1-t2v-14b")
    sparse = OSPNextConfig.preset("osp-next-14b")
    grid = (21, 45, 80)  # 720P, 81 frames
    assert forward_flops(sparse, grid) < forward_flops(full, grid)
    # Wan2.1-14B at 720P/81f: ~ 2 * 14e9 params * 75600 tokens for the linears + 40 * 4 * N^2 * d attention.
    n = 21 * 45 * 80
    rough = 2 * 14e9 * n + 40 * 4 * n * n * 5120
    assert 0.9 < forward_flops(full, grid) / rough < 1.1
    with pytest.raises(ValueError, match="divisible by patch_size"):
        rollout_flops(full, (21, 45, 80), num_videos=1, num_steps=1, cfg=False)
