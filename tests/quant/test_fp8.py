"""policy.quantization=fp8: which linears torchao converts, and (on CUDA with FP8 tensor cores) that it runs."""

import pytest
import torch
from torch import nn

pytest.importorskip("torchao.float8", reason="torchao is the optional extra mixgrpo[fp8]")

from policies.quant.fp8 import apply_fp8, fp8_module_filter  # noqa: E402


class _Block(nn.Module):
    def __init__(self, kind, dim=256):
        super().__init__()
        self.kind = kind
        self.qkv = nn.Linear(dim, 3 * dim)
        self.odd = nn.Linear(dim, 24)  # 24 % 16 != 0
        self.modulation = nn.Linear(dim, dim)


class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(256, 256)
        self.blocks = nn.ModuleList([_Block("full"), _Block("token"), _Block("group"), _Block("full")])

    def forward(self, x):
        for block in self.blocks:
            x = x + block.qkv(x)[..., :256]
        return x


def _float8_linears(model):
    from torchao.float8.float8_linear import Float8Linear

    return sorted(name for name, m in model.named_modules() if isinstance(m, Float8Linear))


def test_filter_converts_sparse_block_projections_only():
    model = _Transformer()
    summary = apply_fp8(model, blocks="sparse")
    assert _float8_linears(model) == ["blocks.1.qkv", "blocks.2.qkv"] == sorted(summary.converted)
    assert "embed" in summary.skipped and "blocks.1.odd" in summary.skipped and "blocks.0.qkv" in summary.skipped
    model = _Transformer()
    apply_fp8(model, blocks="all", recipe="rowwise")
    assert _float8_linears(model) == ["blocks.0.qkv", "blocks.1.qkv", "blocks.2.qkv", "blocks.3.qkv"]
    names_before = list(_Transformer().state_dict())
    assert list(model.state_dict()) == names_before  # checkpoints unchanged


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="blocks"):
        fp8_module_filter(_Transformer(), blocks="some")
    with pytest.raises(ValueError, match="recipe"):
        apply_fp8(_Transformer(), recipe="blockwise")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 matmuls need a CUDA GPU with FP8 tensor cores (sm89+)")
def test_fp8_forward_backward_close_to_bf16_on_gpu():
    torch.manual_seed(0)
    ref = _Transformer().cuda().bfloat16()
    model = _Transformer().cuda().bfloat16()
    model.load_state_dict(ref.state_dict())
    apply_fp8(model, blocks="all")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    out, want = model(x), ref(x)
    assert torch.nn.functional.cosine_similarity(out.float().flatten(), want.float().flatten(), dim=0) > 0.99
    out.sum().backward()
    assert all(p.grad is not None for p in model.blocks[1].qkv.parameters())
    # same module twice, same inputs: the rollout and the update see the same values (ratio 1)
    assert torch.equal(model(x), model(x))
