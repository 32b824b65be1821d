"""The model recipe (policies.prepare): its order, seen from the prepared transformer.

HiF8 comes before LoRA, so each adapter wraps a quantized base layer; FSDP comes last and sees float32 master
weights (the model's own dtype becomes the compute dtype); a meta-device build is materialised after sharding."""

from __future__ import annotations

import pytest
import torch

from policies.parallel.dims import ParallelDims
from policies.prepare import LoraRecipe, ModelRecipe, mixed_precision_dtype, prepare_transformer
from policies.synthetic import build_synthetic_policy
from tests.parallel.sp_harness import run_ranks


def _tiny(dtype=torch.float32, device="meta"):
    return build_synthetic_policy(preset="tiny", num_frames=5, height=64, width=64, layout="dual_end",
                                  num_full_blocks=2, dtype=dtype, device=device).transformer


def test_lora_wraps_the_hif8_quantized_linears():
    from peft.tuners.lora import LoraLayer

    from policies.quant import HiF8Linear

    recipe = ModelRecipe(quantization="hif8", lora=LoraRecipe(rank=2, alpha=2.0, targets=("self_attn.q",)),
                         gradient_checkpointing=True)
    transformer = prepare_transformer(_tiny(), recipe)
    adapted = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
    assert adapted and all(isinstance(m.base_layer, HiF8Linear) for m in adapted)
    assert transformer.gradient_checkpointing
    assert not any(p.is_meta for p in transformer.parameters())  # materialised (no world: after nothing)
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_a_frozen_reference_has_no_gradients_and_refuses_adapters():
    transformer = prepare_transformer(_tiny(), ModelRecipe(trainable=False))
    assert not any(p.requires_grad for p in transformer.parameters())
    with pytest.raises(ValueError, match="ModelRecipe.lora"):
        ModelRecipe(trainable=False, lora=LoraRecipe(rank=2, alpha=2.0, targets=("self_attn.q",)))


def test_mixed_precision_names():
    assert mixed_precision_dtype("bf16") is torch.bfloat16 and mixed_precision_dtype("fp16") is torch.float16
    assert mixed_precision_dtype("no") is None


def test_sequence_parallel_needs_an_osp_next():
    dims = ParallelDims(ssp_size=2)
    with pytest.raises(ValueError, match="rollout.sp_size=2"):
        prepare_transformer(torch.nn.Linear(2, 2), ModelRecipe(), dims=dims)


def _check_fsdp(rank, world):
    from torch.distributed.fsdp import FSDPModule

    dims = ParallelDims(num_groups=world, fsdp=True, rank=rank)
    mesh = dims.world_mesh()
    assert mesh.mesh_dim_names == ("world",) and mesh.size() == world
    reference = prepare_transformer(_tiny(torch.bfloat16), ModelRecipe(seed=3))
    sharded = prepare_transformer(_tiny(torch.bfloat16), ModelRecipe(seed=3), dims=dims, mesh=mesh)
    assert isinstance(sharded, FSDPModule)
    for (name, ref), (_, param) in zip(reference.named_parameters(), sharded.named_parameters()):
        assert param.dtype == torch.float32, name  # the master weights
        assert param.device_mesh == mesh, name
        # materialised after sharding: this rank's shard holds the unsharded build's values (bf16 -> fp32 exact)
        torch.testing.assert_close(param.full_tensor().to(ref.dtype), ref.detach(), rtol=0, atol=0)
    assert sharded._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16  # the model's dtype computes
    with pytest.raises(ValueError, match="mesh"):
        prepare_transformer(_tiny(), ModelRecipe(), dims=dims)


@pytest.mark.dist
def test_fsdp_comes_last_over_float32_masters_and_meta_weights_materialise_after_it():
    run_ranks(_check_fsdp, 2)
