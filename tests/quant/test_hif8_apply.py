"""apply_hif8 on a stand-in with OSP-Next's module names, under peft LoRA, and on the real tiny OSPNext."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from policies.quant import (
    HiF8Linear,
    HiF8QKVHook,
    apply_hif8,
    hif8_round,
    hif8_scaling_state_dict,
    load_hif8_scaling_state_dict,
    remove_hif8,
)

DIM, FFN = 16, 32


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.qkv_hook = None

    def forward(self, x, context=None):
        src = x if context is None else context
        q, k, v = self.q(x), self.k(src), self.v(src)
        if self.qkv_hook is not None:
            q, k, v = self.qkv_hook(q, k, v)
        return self.o(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM), -1) @ v)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(), Attention()
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN), nn.GELU(approximate="tanh"), nn.Linear(FFN, DIM))

    def forward(self, x, context):
        x = x + self.self_attn(x)
        x = x + self.cross_attn(x, context)
        return x + self.ffn(x)


class StandIn(nn.Module):
    def __init__(self, num_blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(num_blocks))
        self.head = nn.Linear(DIM, 4)

    def forward(self, x, context):
        for block in self.blocks:
            x = block(x, context)
        return self.head(x)


def _model(seed=0):
    torch.manual_seed(seed)
    return StandIn()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, DIM, generator=g), torch.randn(2, 3, DIM, generator=g)


def _qdq(t, target):
    s = torch.tensor(target) / t.abs().max().float().clamp_min(1e-8)
    return hif8_round(t.float() * s) / s


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_apply_quantizes_the_ten_block_linears_and_attention_inputs():
    model = _model()
    reference = copy.deepcopy(model)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    summary = apply_hif8(model)
    assert (summary.num_linears, summary.num_attention) == (20, 4)
    assert "blocks.1.ffn.2" in summary.linear_names and "blocks.0.cross_attn" in summary.attention_names
    assert type(model.head) is nn.Linear and isinstance(model.blocks[0].ffn[0], HiF8Linear)
    assert isinstance(model.blocks[1].self_attn.qkv_hook, HiF8QKVHook)
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())

    seen = {}
    model.blocks[0].ffn[2].register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    x, context = _inputs()
    out = model(x, context)
    lin = model.blocks[0].ffn[2]
    expected = F.linear(_qdq(seen["x"], 15.0), _qdq(lin.weight.detach(), 15.0), lin.bias)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-6, atol=1e-6)  # matmul order only

    ref_out = reference(x, context)
    assert 1e-4 < _rel_err(out, ref_out) < 0.2  # quantized, but still the same function
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert remove_hif8(model) == 24
    assert torch.equal(model(x, context), ref_out)


def test_quantize_attention_flag_and_deepcopy():
    x, context = _inputs()
    linears_only = _model()
    apply_hif8(linears_only, quantize_attention=False)
    assert all(m.self_attn.qkv_hook is None for m in linears_only.blocks)
    full = _model()
    apply_hif8(full)
    assert not torch.equal(full(x, context), linears_only(x, context))
    clone = copy.deepcopy(full)
    assert isinstance(clone.blocks[0].self_attn.q, HiF8Linear)
    assert torch.equal(clone(x, context), full(x, context))


def test_apply_errors_name_the_problem():
    with pytest.raises(ValueError, match="matched no module"):
        apply_hif8(_model(), targets=("blocks.*.mlp.fc1",))
    with pytest.raises(ValueError, match="no qkv_hook attribute"):
        apply_hif8(_model(), attention_targets=("blocks.*.ffn",))
    with pytest.raises(ValueError, match="scaling must be"):
        apply_hif8(_model(), scaling="dynamic")
    model = _model()
    apply_hif8(model)
    with pytest.raises(ValueError, match="already HiF8-quantized"):
        apply_hif8(model)


def _train_step(model, seed):
    x, context = _inputs(seed)
    out = model(x, context)
    out.square().mean().backward()
    return out.detach()


def test_delayed_scaling_state_round_trip_through_the_model():
    a = _model()
    apply_hif8(a, scaling="delayed", history_len=4)
    for seed in range(3):
        _train_step(a, seed)
    state = hif8_scaling_state_dict(a)
    assert len(state) == 20 * 3 + 4 * 6 and state["blocks.0.ffn.0.grad_output"]["num_observed"] == 3

    b = _model()
    apply_hif8(b, scaling="delayed", history_len=4)
    load_hif8_scaling_state_dict(b, state)
    fresh = _model()
    apply_hif8(fresh, scaling="delayed", history_len=4)
    out_a, out_b, out_fresh = (_train_step(m, 7) for m in (a, b, fresh))
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, out_fresh)  # the history really changes the scales
    current = _model()
    apply_hif8(current)
    assert hif8_scaling_state_dict(current) == {}
    with pytest.raises(ValueError, match="does not fit this model"):
        load_hif8_scaling_state_dict(current, state)


@pytest.mark.parametrize("order", ["lora_then_hif8", "hif8_then_lora"])
def test_peft_lora_quantizes_the_base_layer_and_keeps_the_adapter_in_high_precision(order):
    peft = pytest.importorskip("peft")
    x, context = _inputs()
    plain = _model()
    apply_hif8(plain)
    expected = plain(x, context)

    model = _model()
    lora = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q", "k", "v", "o"])
    if order == "lora_then_hif8":
        model = peft.get_peft_model(model, lora)
        summary = apply_hif8(model)
        assert sorted(summary.linear_names) == sorted(apply_hif8(_model()).linear_names)
    else:
        apply_hif8(model)
        model = peft.get_peft_model(model, lora)
    q = model.base_model.model.blocks[0].self_attn.q
    assert isinstance(q.base_layer, HiF8Linear)
    assert type(q.lora_A["default"]) is nn.Linear and type(q.lora_B["default"]) is nn.Linear
    # lora_B starts at zero, so the adapter adds exactly 0 to the quantized base output.
    assert torch.equal(model(x, context), expected)
    model(x, context).square().mean().backward()
    assert q.lora_B["default"].weight.grad.abs().sum() > 0


def test_real_osp_next_tiny_model():
    from policies.osp_next import OSPNext, OSPNextConfig

    torch.manual_seed(0)
    model = OSPNext(OSPNextConfig.preset("tiny"))
    reference = copy.deepcopy(model)
    summary = apply_hif8(model)
    layers = model.config.num_layers
    assert (summary.num_linears, summary.num_attention) == (10 * layers, 2 * layers)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 2, 8, 8, generator=g)
    timesteps = torch.tensor([500.0])
    text = torch.randn(1, 5, 16, generator=g)
    out = model(latents, timesteps, text)
    assert out.shape == latents.shape
    assert 1e-4 < _rel_err(out, reference(latents, timesteps, text)) < 0.2
    out.square().mean().backward()
    grads = [p.grad.clone() for p in model.blocks.parameters()]
    assert all(g_.isfinite().all() for g_ in grads)
    with torch.inference_mode():  # rollouts
        assert torch.equal(model(latents, timesteps, text), out.detach())
    # Recomputing blocks in backward re-quantizes identically under current scaling: same gradients.
    model.zero_grad()
    model.gradient_checkpointing = True
    model(latents, timesteps, text).square().mean().backward()
    for before, p in zip(grads, model.blocks.parameters()):
        torch.testing.assert_close(p.grad, before, rtol=0, atol=0)
