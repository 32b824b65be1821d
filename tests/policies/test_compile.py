"""Regional compile of the policy transformer: same values as eager, and no recompile after the first iteration."""

import logging

import pytest
import torch

from policies.compile import apply_compile, resolve_compile
from policies.toy import build_toy_policy


def _iteration(policy, x_roll, x_upd, text_roll, text_upd, sigma_roll, sigma_upd):
    with torch.no_grad():  # a rollout: CFG batch (cond + uncond) under no_grad
        v_roll = policy.velocity(x_roll, sigma_roll, text_roll)
    v_upd = policy.velocity(x_upd, sigma_upd, text_upd)  # an update micro-batch, with grad
    v_upd.square().mean().backward()
    return v_roll, v_upd


def _inputs(policy, gen):
    c, t, h, w = policy.latent_shape()
    text = policy.encode_text(["a red circle moving left", ""])
    x_roll = torch.randn(4, c, t, h, w, generator=gen)
    x_upd = torch.randn(2, c, t, h, w, generator=gen)
    return (x_roll, x_upd, text.repeat(2, 1, 1), text, torch.rand(4, generator=gen), torch.rand(2, generator=gen))


@pytest.mark.slow
def test_compiled_blocks_do_not_recompile_across_iterations_and_match_eager(caplog):
    torch._dynamo.reset()
    eager, compiled = build_toy_policy(), build_toy_policy()
    stats = apply_compile(compiled.transformer, backend="aot_eager", dynamic=None)
    assert stats.blocks == len(compiled.transformer.blocks)
    gen = torch.Generator().manual_seed(0)
    frames = []
    with caplog.at_level(logging.INFO, logger="policies.compile"):
        for it in range(3):
            inputs = _inputs(eager, gen)
            ref = _iteration(eager, *inputs)
            out = _iteration(compiled, *inputs)
            for a, b in zip(ref, out):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            for (name, p), q in zip(eager.transformer.named_parameters(), compiled.transformer.parameters()):
                if p.grad is not None:
                    torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
            frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert frames[0] > 0
    assert frames[1] == frames[2], f"recompiled in a steady iteration: graphs per iteration {frames}"
    assert stats.seconds > 0 and stats.calls_that_compiled >= 2
    assert any("torch.compile:" in r.message for r in caplog.records)
    # state dict names are untouched by regional compile (checkpoints stay loadable eager)
    assert list(compiled.transformer.state_dict()) == list(eager.transformer.state_dict())


def test_resolve_compile_setting():
    assert resolve_compile("auto", "cpu") is False and resolve_compile("auto", "cuda") is True
    assert resolve_compile(True, "cpu") is True
    with pytest.raises(ValueError, match="policy.compile"):
        resolve_compile("yes please", "cpu")
