"""The world one run trains in, described once: worker groups x SSP x Ulysses ranks, FSDP, GPUs, and who does what.

A :class:`ParallelDims` is a frozen value built once from the run's settings (``mixgrpo.engine.worker.world_dims``)
and handed, with its ``rank`` filled in, to every rank. Ray's placement, the worker, the learner's gradient group,
the model recipe (``policies.prepare``) and FSDP all read it, so "how many ranks", "is FSDP sharding", "which
rank leads its group" and "which prompts does each group sample" each have one answer.

Rank layout (as ``policies.parallel.groups``): ``num_groups`` worker groups of ``sp_size = ssp_size *
ulysses_size`` consecutive ranks; group ``g`` holds ranks ``g*sp_size .. (g+1)*sp_size - 1`` and samples the
``g``-th contiguous slice of each iteration's prompt groups.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from policies.parallel.degrees import check_degrees, sp_degrees

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def contiguous_shares(num_groups: int, num_workers: int) -> list[list[int]]:
    """Contiguous slices of ``num_groups`` prompt groups, one per worker group, sizes differing by at most one."""
    per, extra = divmod(num_groups, num_workers)
    out, start = [], 0
    for w in range(num_workers):
        size = per + (1 if w < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def sample_shares(prompt_shares: list[list[int]], group_size: int) -> list[tuple[int, int]]:
    """``(first sample, number of samples)`` of each worker group, for its share of prompt groups."""
    return [(share[0] * group_size if share else 0, len(share) * group_size) for share in prompt_shares]


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """How the ranks of one run are laid out, and where this rank sits (``rank``)."""

    num_groups: int = 1
    """Worker groups (``rollout.num_workers``): each samples its own share of the prompts."""
    ssp_size: int = 1
    """Ranks of a worker group that split the Skiparse subsequences of one video (SSP)."""
    ulysses_size: int = 1
    """Ranks of a worker group that split the attention heads (Ulysses); ``ssp_size * ulysses_size`` per group."""
    fsdp: bool = False
    """``learner.sharding=fsdp``: parameters, gradients and Adam state sharded over every rank (see ``sharded``)."""
    use_gpu: bool = False
    """One GPU per rank (NCCL); else CPUs (gloo)."""
    rank: int = 0
    """This process's rank in the world (0 on the driver, which holds no model)."""

    def __post_init__(self) -> None:
        for name in ("num_groups", "ssp_size", "ulysses_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelDims.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"ParallelDims.rank must be in 0..{self.world_size - 1} (num_groups {self.num_groups} x "
                             f"sp_size {self.sp_size} ranks), got {self.rank!r}")

    @classmethod
    def for_model(cls, *, num_groups: int = 1, sp_size: int = 1, num_heads: int | None = None,
                  sparse_ratio: int | None = None, field: str = "rollout.sp_size", **rest) -> ParallelDims:
        """Split ``sp_size`` ranks per group into SSP x Ulysses for a transformer with ``num_heads`` heads and
        Skiparse ``k = sparse_ratio`` (``policies.parallel.degrees``). With ``num_heads`` unknown (a weight file
        without a config), only the split is computed; ``apply_sequence_parallel`` checks the heads on the model."""
        if sp_size == 1:
            return cls(num_groups=num_groups, **rest)
        if num_heads is None and sparse_ratio is not None:
            ssp, ulysses = sp_degrees(sp_size, sparse_ratio)
        else:
            sizes = check_degrees(sp_size, num_heads=num_heads, sparse_ratio=sparse_ratio, field=field)
            ssp, ulysses = sizes.ssp_size, sizes.ulysses_size
        return cls(num_groups=num_groups, ssp_size=ssp, ulysses_size=ulysses, **rest)

    def at_rank(self, rank: int) -> ParallelDims:
        return replace(self, rank=rank)

    # ---- sizes ----

    @property
    def sp_size(self) -> int:
        """Ranks of one worker group (one sequence-parallel group): they share one video."""
        return self.ssp_size * self.ulysses_size

    @property
    def world_size(self) -> int:
        return self.num_groups * self.sp_size

    @property
    def distributed(self) -> bool:
        """More than one rank: a torch.distributed world exists."""
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """FSDP shards the learner (it needs a world of more than one rank; the config check requires both)."""
        return self.fsdp and self.distributed

    @property
    def device_type(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    # ---- this rank ----

    @property
    def group(self) -> int:
        """The worker group of this rank."""
        return self.rank // self.sp_size

    @property
    def leads_group(self) -> bool:
        """Rank 0 of its worker group: the one that returns the group's results (its peers hold the same)."""
        return self.rank % self.sp_size == 0

    def group_ranks(self, group: int) -> list[int]:
        return list(range(group * self.sp_size, (group + 1) * self.sp_size))

    # ---- work ----

    def prompt_shares(self, num_prompt_groups: int) -> list[list[int]]:
        """The prompt groups each worker group samples: contiguous slices, sizes differing by at most one."""
        return contiguous_shares(num_prompt_groups, self.num_groups)

    def sample_shares(self, num_prompt_groups: int, group_size: int) -> list[tuple[int, int]]:
        """``(first sample, number of samples)`` of each worker group's share."""
        return sample_shares(self.prompt_shares(num_prompt_groups), group_size)

    # ---- the world's mesh ----

    def world_mesh(self) -> DeviceMesh:
        """A 1-D mesh ``("world",)`` over every rank (collective: all ranks call it; needs an initialised world).

        FSDP shards over it and the unsharded learner sums gradients over its group. The sequence-parallel
        sub-groups are not mesh dimensions: ``policies.parallel.groups`` makes them by hand, because the
        full-block Ulysses group has ``gcd(num_heads, S*U)`` consecutive ranks, which is no factor of an
        ``S x U`` mesh in general (and ``apply_sequence_parallel``'s contract builds its own groups).
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized() or dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims.world_mesh needs an initialised torch.distributed world of "
                             f"{self.world_size} ranks (num_groups {self.num_groups} x sp_size {self.sp_size})")
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("world",))
