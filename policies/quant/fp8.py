"""FP8 (E4M3 forward, E5M2 gradients) training linears through torchao's float8 training, not hand-written casts.

``apply_fp8`` swaps chosen ``nn.Linear`` modules of the transformer for torchao ``Float8Linear`` in place (the
parameters stay the same tensors in their high-precision dtype, so state dicts and LoRA are unaffected). The same
module runs in rollouts and in updates, so the first inner step's probability ratio stays 1.

Which linears: the attention and MLP projections of the blocks (``blocks.*``; ``blocks="sparse"`` keeps the
full-attention blocks in bf16: a full block at long sequences is attention-bound and 8-bit GEMMs buy little
there, a Skiparse block spends a quarter of the attention FLOPs). Skipped: linears outside the blocks
(embeddings, modulation, head), any with a dimension not divisible by 16 (the FP8 GEMM's alignment) or smaller
than ``min_features`` (too small to amortise the casts). The matmuls need a GPU with FP8 tensor cores (sm89+).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["FP8_BLOCKS", "FP8_RECIPES", "FP8Summary", "apply_fp8", "fp8_module_filter"]

FP8_BLOCKS = ("sparse", "all")
FP8_RECIPES = ("tensorwise", "rowwise")


@dataclass(frozen=True)
class FP8Summary:
    converted: tuple[str, ...]
    skipped: tuple[str, ...]


def _block_kinds(transformer: nn.Module) -> dict[str, str]:
    blocks = getattr(transformer, "blocks", None)
    if blocks is None:
        return {}
    return {f"blocks.{i}.": getattr(block, "kind", "full") for i, block in enumerate(blocks)}


def fp8_module_filter(transformer: nn.Module, *, blocks: str = "sparse", min_features: int = 256):
    """``(module, fqn) -> bool`` choosing the linears to convert (see the module docstring)."""
    if blocks not in FP8_BLOCKS:
        raise ValueError(f"fp8 blocks must be one of {list(FP8_BLOCKS)}, got {blocks!r}")
    kinds = _block_kinds(transformer)

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return True  # let torchao walk into containers
        prefix = next((p for p in kinds if fqn.startswith(p)), None)
        if prefix is None or (blocks == "sparse" and kinds[prefix] == "full"):
            return False
        if "modulation" in fqn:
            return False
        dims = (module.in_features, module.out_features)
        return all(d % 16 == 0 and d >= min_features for d in dims)

    return keep


def apply_fp8(transformer: nn.Module, *, blocks: str = "sparse", recipe: str = "tensorwise",
              min_features: int = 256) -> FP8Summary:
    """Convert the chosen linears of ``transformer`` to torchao float8 training linears, in place."""
    if recipe not in FP8_RECIPES:
        raise ValueError(f"fp8 recipe must be one of {list(FP8_RECIPES)}, got {recipe!r}")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ImportError("policy.quantization=fp8 needs torchao: pip install 'mixgrpo[fp8]'") from None
    keep = fp8_module_filter(transformer, blocks=blocks, min_features=min_features)
    linears = [(name, m) for name, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    chosen = tuple(name for name, m in linears if keep(m, name))
    skipped = tuple(name for name, m in linears if not keep(m, name))
    if chosen:
        convert_to_float8_training(transformer, module_filter_fn=keep,
                                   config=Float8LinearConfig.from_recipe_name(recipe))
    return FP8Summary(converted=chosen, skipped=skipped)
