"""How many ranks of a sequence-parallel group do SSP and how many do Ulysses, checked before any model loads.

The one place where a sequence-parallel size ``S`` (``rollout.sp_size``) is turned into ``(ssp_size,
ulysses_size)`` for a given model. SSP takes as many ranks as divide the ``k*k`` Skiparse subsequences (each rank
then holds whole subsequences and sparse blocks need no communication but the pattern switch); Ulysses takes the
rest, over heads.
"""

from __future__ import annotations

import math

from policies.parallel.groups import SequenceParallelSizes


def sp_degrees(sp_size: int, sparse_ratio: int) -> tuple[int, int]:
    """``(ssp_size, ulysses_size)`` for ``sp_size`` ranks of a model with Skiparse ``k = sparse_ratio``."""
    if sp_size < 1 or sparse_ratio < 1:
        raise ValueError(f"rollout.sp_size ({sp_size}) and the model's sparse_ratio ({sparse_ratio}) must be >= 1")
    ssp = math.gcd(sp_size, sparse_ratio**2)
    return ssp, sp_size // ssp


def check_degrees(sp_size: int, *, num_heads: int | None, sparse_ratio: int | None,
                  field: str = "rollout.sp_size") -> SequenceParallelSizes | None:
    """The validated sizes for ``sp_size`` ranks, or None when ``sp_size == 1`` (no sequence parallelism).

    ``num_heads`` / ``sparse_ratio`` are the model's (None: the model has no sequence-parallel plan, i.e. it is not
    an OSP-Next). Raises ``ValueError`` naming ``field`` and the sizes that would work.
    """
    if sp_size == 1:
        return None
    if num_heads is None or sparse_ratio is None:
        raise ValueError(f"{field}={sp_size} needs an OSP-Next transformer (a sequence-parallel plan); this policy "
                         f"has none: set {field}=1")
    ssp, ulysses = sp_degrees(sp_size, sparse_ratio)
    try:
        return SequenceParallelSizes(ssp_size=ssp, ulysses_size=ulysses, num_heads=num_heads,
                                     sparse_ratio=sparse_ratio)
    except ValueError as error:
        valid = [s for s in range(1, 2 * sparse_ratio**2 * num_heads + 1) if _fits(s, num_heads, sparse_ratio)][:8]
        raise ValueError(f"{field}={sp_size} does not fit this model ({num_heads} heads, Skiparse k={sparse_ratio}): "
                         f"{error}. Sizes that fit: {valid}") from None


def _fits(sp_size: int, num_heads: int, sparse_ratio: int) -> bool:
    ssp, ulysses = sp_degrees(sp_size, sparse_ratio)
    return num_heads % ulysses == 0
