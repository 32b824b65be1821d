"""Process groups for data x SSP x Ulysses parallelism.

Rank layout inside the world (or a given group) of size W = dp * S * U, Ulysses innermost, as in the OSP-Next
release mesh ``(dp, skiparse_sp, sp)``:

    rank = dp_index * (S * U) + ssp_rank * U + ulysses_rank

- ``sp``: the S*U ranks that share one video (one sequence-parallel group);
- ``ssp``: the S ranks of an ``sp`` group with the same ``ulysses_rank`` (the SSP all-to-all runs here);
- ``ulysses``: the U ranks of an ``sp`` group with the same ``ssp_rank`` (Ulysses inside sparse blocks);
- ``full``: the ranks that run Ulysses in full blocks: the whole ``sp`` group when its size divides the head
  count, else ``gcd(num_heads, S*U)`` consecutive ranks, as the release does; then ``full_replicas`` copies of
  the full-block computation run side by side inside one ``sp`` group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(kw_only=True)
class SequenceParallelSizes:
    """Degrees of sequence parallelism, validated against the model they will shard."""

    ssp_size: int
    """S: ranks that split the k*k Skiparse subsequences of one video; must divide k*k."""
    ulysses_size: int
    """U: Ulysses degree inside sparse blocks (frames of each subsequence); must divide num_heads."""
    num_heads: int
    sparse_ratio: int
    """Skiparse k (k*k subsequences per video)."""

    def __post_init__(self) -> None:
        for name in ("ssp_size", "ulysses_size", "num_heads", "sparse_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        subsequences = self.sparse_ratio**2
        if subsequences % self.ssp_size:
            valid = [d for d in range(1, subsequences + 1) if subsequences % d == 0]
            raise ValueError(
                f"ssp_size={self.ssp_size} must divide k*k = {subsequences} (sparse_ratio k={self.sparse_ratio}) "
                f"so every rank holds whole subsequences; use one of {valid}"
            )
        if self.num_heads % self.ulysses_size:
            valid = [d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]
            raise ValueError(
                f"ulysses_size={self.ulysses_size} must divide num_heads={self.num_heads} (Ulysses splits heads); "
                f"use one of {valid}"
            )

    @property
    def sp_size(self) -> int:
        return self.ssp_size * self.ulysses_size

    @property
    def full_size(self) -> int:
        """Ulysses degree of full blocks: S*U if it divides the heads, else gcd(num_heads, S*U)."""
        return math.gcd(self.num_heads, self.sp_size)

    def check_world(self, world_size: int) -> None:
        if world_size % self.sp_size:
            raise ValueError(
                f"ssp_size * ulysses_size = {self.sp_size} must divide the number of ranks ({world_size}); "
                f"change the sizes or launch a multiple of {self.sp_size} processes"
            )


@dataclass(kw_only=True)
class SequenceParallelGroups:
    """The groups this rank belongs to, and its coordinates in them."""

    sizes: SequenceParallelSizes
    sp: dist.ProcessGroup
    ssp: dist.ProcessGroup
    ulysses: dist.ProcessGroup
    full: dist.ProcessGroup
    dp: dist.ProcessGroup
    sp_rank: int
    ssp_rank: int
    ulysses_rank: int
    full_rank: int
    full_replica: int
    """Which copy of the full-block computation this rank belongs to (always 0 when full_size == S*U)."""
    dp_rank: int

    @property
    def full_replicas(self) -> int:
        return self.sizes.sp_size // self.sizes.full_size


def build_groups(sizes: SequenceParallelSizes, group: dist.ProcessGroup | None = None) -> SequenceParallelGroups:
    """Create the dp / sp / ssp / ulysses / full groups over ``group`` (default: the world).

    Every member of ``group`` must call this, with the same sizes; other processes need not (the groups are
    created with group-local synchronization), so disjoint groups can be split independently.
    """
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised; call torch.distributed.init_process_group first")
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    me = dist.get_rank()
    if me not in ranks:
        raise ValueError(f"this process (global rank {me}) is not a member of the given group {ranks}")
    sizes.check_world(len(ranks))
    sp, full_size = sizes.sp_size, sizes.full_size
    s, u = sizes.ssp_size, sizes.ulysses_size
    mine: dict[str, dist.ProcessGroup] = {}

    def make(name: str, members: list[int]) -> None:
        # Members of a group create it in the same relative order (the enumeration below is the same everywhere).
        if me in members:
            mine[name] = dist.new_group(members, use_local_synchronization=True)

    num_dp = len(ranks) // sp
    for d in range(num_dp):
        block = ranks[d * sp : (d + 1) * sp]
        make("sp", block)
        for i in range(u):
            make("ssp", [block[j * u + i] for j in range(s)])
        for j in range(s):
            make("ulysses", block[j * u : (j + 1) * u])
        for r in range(sp // full_size):
            make("full", block[r * full_size : (r + 1) * full_size])
    for i in range(sp):
        make("dp", [ranks[d * sp + i] for d in range(num_dp)])
    index = ranks.index(me)
    sp_rank = index % sp
    return SequenceParallelGroups(
        sizes=sizes,
        sp=mine["sp"],
        ssp=mine["ssp"],
        ulysses=mine["ulysses"],
        full=mine["full"],
        dp=mine["dp"],
        sp_rank=sp_rank,
        ssp_rank=sp_rank // u,
        ulysses_rank=sp_rank % u,
        full_rank=sp_rank % full_size,
        full_replica=sp_rank // full_size,
        dp_rank=index // sp,
    )
