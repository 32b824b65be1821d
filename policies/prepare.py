"""The one recipe that turns a freshly built transformer into the one that rollouts and updates use.

:func:`prepare_transformer` applies, in place and in this order (each step needs what the ones before it made):

1. gradient checkpointing (per block, ``policies.checkpointing``): set first, it touches no weights;
2. FP8 or HiF8: swaps the targeted ``nn.Linear`` layers for quantized ones (a class swap, same parameters). Before LoRA,
   so that the adapters wrap the quantized base layers (the adapters' own small matmuls stay unquantized), and
   before sequence parallelism, whose amax sharing needs the quantizers;
3. LoRA: injects peft adapters (their A matrices drawn from the caller's seeded RNG) and freezes the rest.
   Before FSDP, which shards the parameters that exist when it is applied;
4. freezing (a frozen reference of a KL term: no adapters, no gradients);
5. placement on ``device`` (unless the weights are still on the meta device);
6. sequence parallelism (SSP x Ulysses over each worker group) and, with HiF8, each activation quantizer's amax
   shared over the group, so every rank scales its shard as one device would scale the whole tensor. It changes
   no parameter, only the attention plan, so FSDP may come after it;
7. FSDP: the weights cast to float32 master copies, then sharded over every rank, forwards computing in the
   mixed-precision dtype (or the model's own). Last of the wrappers: it must see the final module tree;
8. materialisation of meta-device weights (the synthetic policy): after sharding, so each rank allocates and
   initialises only its own shards.

Loading trained weights into the prepared (possibly sharded) transformer is the caller's step after this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from policies.parallel.dims import ParallelDims

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``learner.mixed_precision`` names and their dtypes ("no": none)."""


def mixed_precision_dtype(name: str) -> torch.dtype | None:
    """The compute dtype ``name`` ("no", "bf16", "fp16") asks for; None for "no" (the model's own dtype)."""
    return MIXED_PRECISION.get(name)


@dataclass(frozen=True, kw_only=True)
class LoraRecipe:
    rank: int
    alpha: float
    targets: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ModelRecipe:
    """What to apply to a transformer (the world it is sharded over is a separate :class:`ParallelDims`)."""

    gradient_checkpointing: bool | int | str = False
    """Which blocks recompute their activations (``policies.checkpointing``); False: none."""
    quantization: Literal["none", "hif8", "fp8"] = "none"
    lora: LoraRecipe | None = None
    """Adapters to inject; None: train (or freeze) the full model."""
    trainable: bool = True
    """False: the frozen reference of a KL term (build it with ``lora=None``)."""
    mixed_precision: torch.dtype | None = None
    """FSDP's compute dtype; None: the dtype the model was built in."""
    seed: int = 0
    """Seed of the values meta-device weights are materialised with."""

    def __post_init__(self) -> None:
        if self.quantization not in ("none", "hif8", "fp8"):
            raise ValueError(f"ModelRecipe.quantization must be 'none', 'hif8' or 'fp8', got {self.quantization!r}")
        if self.lora is not None and not self.trainable:
            raise ValueError("ModelRecipe.lora must be None when trainable=False (a frozen reference has no adapters)")


def prepare_transformer(transformer: nn.Module, recipe: ModelRecipe, *, dims: ParallelDims = ParallelDims(),
                        device: str | torch.device = "cpu", mesh: DeviceMesh | None = None) -> nn.Module:
    """Apply ``recipe`` to ``transformer`` over the world ``dims`` describes, in place (see the module docstring
    for the order and why). ``mesh``: the world's mesh (``dims.world_mesh()``), needed when ``dims.sharded``.
    Every rank of the world calls it with the same arguments (sequence parallelism and FSDP are collective).
    Returns the transformer."""
    device = torch.device(device)
    if recipe.gradient_checkpointing:
        from policies.checkpointing import apply_checkpointing

        apply_checkpointing(transformer, recipe.gradient_checkpointing)
    if recipe.quantization == "fp8":
        from policies.quant.fp8 import apply_fp8

        apply_fp8(transformer)
    if recipe.quantization == "hif8":
        from policies.quant import apply_hif8

        apply_hif8(transformer)
    if recipe.lora is not None:
        from policies.lora import apply_lora

        apply_lora(transformer, rank=recipe.lora.rank, alpha=recipe.lora.alpha, targets=list(recipe.lora.targets))
    if not recipe.trainable:
        transformer.requires_grad_(False)
    on_meta = any(p.is_meta for p in transformer.parameters())
    if not on_meta:
        transformer.to(device)
    if dims.sp_size > 1:
        _sequence_parallel(transformer, dims, share_amax=recipe.quantization == "hif8")
    if dims.sharded:
        _fsdp(transformer, mesh, mixed_precision=recipe.mixed_precision)
    if on_meta:
        from policies.synthetic import materialize_

        materialize_(transformer, device, seed=recipe.seed)
    return transformer


def _sequence_parallel(transformer: nn.Module, dims: ParallelDims, *, share_amax: bool) -> None:
    from policies.parallel import apply_sequence_parallel

    if not hasattr(transformer, "sequence_plan"):
        raise ValueError(f"rollout.sp_size={dims.sp_size} needs an OSP-Next transformer (a sequence-parallel plan); "
                         "this policy has none: set rollout.sp_size=1")
    groups = apply_sequence_parallel(transformer, ssp_size=dims.ssp_size, ulysses_size=dims.ulysses_size)
    if share_amax:
        from policies.quant import share_amax as share

        share(transformer, groups.sp)


def _fsdp(transformer: nn.Module, mesh: DeviceMesh | None, *, mixed_precision: torch.dtype | None) -> None:
    from policies.parallel.fsdp import apply_fsdp

    if mesh is None:
        raise ValueError("prepare_transformer: a sharded world (ParallelDims.fsdp) needs its mesh "
                         "(mesh=dims.world_mesh())")
    compute = next(transformer.parameters()).dtype
    transformer.to(torch.float32)  # FSDP keeps float32 master weights; forwards run in the compute dtype
    apply_fsdp(transformer, mesh=mesh, param_dtype=mixed_precision or compute)
