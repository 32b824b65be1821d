"""Per-block activation checkpointing: every choice gives the same loss and gradients as none; settings validated."""

import pytest
import torch

from mixgrpo.config import ConfigError, PolicyConfig
from policies.checkpointing import apply_checkpointing, checkpointed_blocks, parse_checkpointing
from policies.toy import build_toy_policy


def _loss_and_grads(policy, x, sigma, text):
    policy.transformer.zero_grad()
    loss = policy.velocity(x, sigma, text).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in policy.transformer.parameters() if p.grad is not None]


def test_every_checkpointing_choice_matches_no_checkpointing():
    policy = build_toy_policy()
    c, t, h, w = policy.latent_shape()
    gen = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, c, t, h, w, generator=gen), torch.rand(2, generator=gen)
    text = policy.encode_text(["a red circle moving left", ""])
    apply_checkpointing(policy.transformer, False)
    ref_loss, ref_grads = _loss_and_grads(policy, x, sigma, text)
    for setting in (True, "full_blocks", "sparse_blocks", 1, 3):
        chosen = apply_checkpointing(policy.transformer, setting)
        assert chosen
        loss, grads = _loss_and_grads(policy, x, sigma, text)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_block_choice_and_parsing():
    kinds = ["full", "token", "group", "full"]
    assert checkpointed_blocks(kinds, "full_blocks") == {0, 3}
    assert checkpointed_blocks(kinds, "sparse_blocks") == {1, 2}
    assert checkpointed_blocks(kinds, 2) == {0, 1} and checkpointed_blocks(kinds, "9") == {0, 1, 2, 3}
    assert parse_checkpointing("none") is False and parse_checkpointing("all") is True
    assert PolicyConfig(gradient_checkpointing="3").gradient_checkpointing == 3
    assert PolicyConfig(gradient_checkpointing=True).gradient_checkpointing is True
    with pytest.raises(ConfigError, match="policy.gradient_checkpointing"):
        PolicyConfig(gradient_checkpointing="half")
    with pytest.raises(ConfigError, match="policy.compile"):
        PolicyConfig(compile="maybe")
    assert PolicyConfig(quantization="fp8").quantization == "fp8"
