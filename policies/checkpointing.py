"""Which transformer blocks recompute their activations in backward (activation checkpointing, per block).

Checkpointing trades one extra block forward in the update for that block's activation memory, so a run should
checkpoint only as many blocks as its memory needs. Settings (``policy.gradient_checkpointing``):
``false``/``none`` (no block), ``true``/``all`` (every block), ``full_blocks`` / ``sparse_blocks`` (blocks of that
attention kind: full blocks hold the largest attention activations at long sequences) or an integer N (the first
N blocks). Recomputation gives the same values as the stored activations (same ops on the same inputs), so every
setting yields the same loss and gradients; only memory and time differ.
"""

from __future__ import annotations

from torch import nn

__all__ = ["CHECKPOINT_CHOICES", "parse_checkpointing", "checkpointed_blocks", "apply_checkpointing"]

CHECKPOINT_CHOICES = ("none", "all", "full_blocks", "sparse_blocks")


def parse_checkpointing(value: bool | int | str) -> bool | int | str:
    """The setting normalised: False, True, 'full_blocks', 'sparse_blocks' or an int >= 0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"policy.gradient_checkpointing must be >= 0 blocks, got {value}")
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return int(text)
        if text in ("none", "false"):
            return False
        if text in ("all", "true"):
            return True
        if text in CHECKPOINT_CHOICES:
            return text
    raise ValueError(f"policy.gradient_checkpointing must be true/false, one of {list(CHECKPOINT_CHOICES)} or a number "
                     f"of blocks, got {value!r}")


def checkpointed_blocks(kinds: list[str], setting: bool | int | str) -> frozenset[int]:
    """Indices of the blocks (attention ``kinds`` in order) that ``setting`` recomputes."""
    setting = parse_checkpointing(setting)
    if setting is True:
        return frozenset(range(len(kinds)))
    if setting is False:
        return frozenset()
    if setting == "full_blocks":
        return frozenset(i for i, kind in enumerate(kinds) if kind == "full")
    if setting == "sparse_blocks":
        return frozenset(i for i, kind in enumerate(kinds) if kind != "full")
    return frozenset(range(min(int(setting), len(kinds))))


def apply_checkpointing(transformer: nn.Module, setting: bool | int | str) -> frozenset[int]:
    """Set ``transformer.gradient_checkpointing`` (a bool, or the frozenset of block indices) and return the indices."""
    kinds = [getattr(block, "kind", "full") for block in transformer.blocks]
    chosen = checkpointed_blocks(kinds, setting)
    transformer.gradient_checkpointing = True if len(chosen) == len(kinds) and kinds else (chosen or False)
    return chosen
