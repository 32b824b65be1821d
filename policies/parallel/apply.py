"""``apply_sequence_parallel``: shard one OSP-Next forward over S*U ranks (SSP x Ulysses).

After ``groups = apply_sequence_parallel(model, ssp_size=S, ulysses_size=U)`` every rank of an S*U group calls
the model with the same full inputs and gets the same full output as one device. Inside:

- full blocks: contiguous token shards, Ulysses attention over the whole group (or over ``gcd(heads, S*U)``
  ranks, the full-block computation then running once per ``S*U / gcd`` copy, as the release does);
- sparse blocks: each rank holds ``k*k/S`` whole Skiparse subsequences (SSP), split further by rows over U
  ranks; the token <-> group switch is one all-to-all over the S ranks; with U > 1 attention is Ulysses over U;
- transitions: full -> sparse all-gathers the token shards and keeps this rank's subsequences (as the release);
  sparse -> full all-gathers subsequences and rows, then re-shards tokens; the head output is all-gathered.

Gradients: the function does NOT all-reduce parameter gradients. Each rank's parameter gradients are its
share of the single-device gradient, and their SUM over the sequence-parallel group (``groups.sp``) is exactly
the single-device gradient, provided every rank computes the same loss from the (identical) full output. Sum
them with :func:`sum_gradients`, or let data parallelism do it: an all-reduce / FSDP reduce-scatter over all
dp*S*U ranks that *averages* divides by dp*S*U, so multiply the loss by S*U (or use a sum reduction divided by
dp) to get the mean over the dp samples.

How the sum comes out right: a tensor every rank computes identically (embeddings, text states, a gathered
sequence) carries a per-rank *partial* gradient; narrowing it to a shard back-propagates zeros elsewhere, and
gathering shards into it reduce-scatters the partial gradients. The model output is the one replicated tensor
whose incoming gradient is *not* partial (each rank's loss gives the full gradient), so a forward hook scales
it by 1/(S*U) (exact for powers of two).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from policies.osp_next.attention import attention
from policies.osp_next.layout import SequencePlan, SparseGeometry
from policies.parallel.comm import all_gather, all_gather_replicated, comm_scope, even_sizes, shard
from policies.parallel.groups import SequenceParallelGroups, SequenceParallelSizes, build_groups
from policies.parallel.ssp import (
    num_rows,
    row_shard,
    ssp_enter,
    ssp_leave,
    ssp_shard_subsequences,
    ssp_switch,
)
from policies.parallel.ulysses import ulysses_attention


class SequenceParallelPlan(SequencePlan):
    """The model's layout operations, sharded over ``groups`` (see the module docstring)."""

    def __init__(self, groups: SequenceParallelGroups, *, k: int, dim: int, num_blocks: int) -> None:
        self.groups, self.k, self.dim, self.num_blocks = groups, k, dim, num_blocks
        self.grid: tuple[int, int, int] | None = None  # set by the model's forward pre-hook
        self._seq_len = 0
        self._full_masks: dict[int, torch.Tensor] = {}
        self._block = 0
        self.hooks: list = []  # forward hooks installed by apply_sequence_parallel

    # ---- sizes and accounting labels of the current forward ----
    def begin(self, grid: tuple[int, int, int]) -> None:
        self.grid = tuple(grid)
        self._block = 0

    def _scope(self):
        # The model asks for a block's attention kernel once per block, right before running it, and does the
        # layout change feeding block i just before that: label both "block.i" ("head" after the last block).
        return comm_scope(f"block.{self._block}" if self._block < self.num_blocks else "head")

    def _next_block_scope(self) -> str:
        label = f"block.{self._block}"
        self._block += 1
        return label

    def _full_sizes(self) -> list[int]:
        return even_sizes(self._seq_len, self.groups.sizes.full_size)

    def _rows(self, geometry: SparseGeometry | None = None) -> tuple[list[int], int]:
        """Rows per Ulysses rank and the padded width of the current sparse geometry."""
        padded = (geometry or SparseGeometry(grid=self.grid, k=self.k)).padded_grid
        rows, ulysses = num_rows(padded, self.k), self.groups.sizes.ulysses_size
        if rows < ulysses:
            raise ValueError(
                f"ulysses_size={ulysses} needs at least that many rows (T * H'/k^2) in sparse blocks, but the "
                f"padded grid {padded} has {rows}; use a smaller ulysses_size or a larger video"
            )
        return even_sizes(rows, ulysses), padded[2]

    # ---- full blocks ----
    def shard_full(self, x: torch.Tensor) -> torch.Tensor:
        self._seq_len = x.shape[1]
        return shard(x, 1, self._full_sizes(), self.groups.full_rank)

    def unshard_full(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        with self._scope():
            if g.full_replicas == 1:
                return all_gather(x, g.full, dim=1, sizes=self._full_sizes(), grad="sum")
            return all_gather_replicated(x, g.full, g.sp, dim=1, sizes=self._full_sizes(),
                                         keep_grad=g.full_replica == 0)

    @property
    def full_attention(self):
        # Bound to this forward's sizes and label, so a checkpointed block recomputed in backward uses them too.
        return functools.partial(_full_attention, group=self.groups.full, seq_sizes=self._full_sizes(),
                                 scope=self._next_block_scope())

    # ---- sparse blocks ----
    def shard_batch(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        mine = ssp_shard_subsequences(x, self.k, g.ssp_rank, g.sizes.ssp_size)
        # Per-token tables (RoPE [P*B, N'/P, D2], masks [P*B, N'/P]) are split by rows as well; per-sample ones
        # (text states, modulation) end in the model dim C. The model's contract for shard_batch tells them apart.
        if g.sizes.ulysses_size == 1 or (mine.dim() > 2 and mine.shape[-1] == self.dim):
            return mine
        rows, _ = self._rows()
        local = row_shard(mine, sum(rows), rows, g.ulysses_rank)
        if mine.dtype == torch.bool:
            # Ulysses attention needs the whole subsequence's key mask; the model caches its sharded masks, so
            # remember the unsplit one by identity instead of gathering it in every block.
            self._full_masks[id(local)] = mine
            while len(self._full_masks) > 16:  # the model keeps one grid's tables; old grids' masks can go
                self._full_masks.pop(next(iter(self._full_masks)))
        return local

    def unshard_batch(self, x: torch.Tensor) -> torch.Tensor:
        with self._scope():
            return all_gather(x, self.groups.ssp, dim=0, grad="sum")

    def enter_sparse(self, x_BNC: torch.Tensor, geometry: SparseGeometry, pattern: str) -> torch.Tensor:
        g = self.groups
        rows, _ = self._rows(geometry)
        return ssp_enter(x_BNC, geometry.grid, pattern, self.k, ssp_rank=g.ssp_rank, ssp_size=g.sizes.ssp_size,
                         rows_per_rank=rows, ulysses_rank=g.ulysses_rank)

    def switch(self, x: torch.Tensor, geometry: SparseGeometry, from_pattern: str, to_pattern: str) -> torch.Tensor:
        if from_pattern == to_pattern:
            return x
        rows, width = self._rows(geometry)
        with self._scope():
            return ssp_switch(x, rows[self.groups.ulysses_rank], width, self.k, self.groups.ssp)

    def leave_sparse(self, x: torch.Tensor, geometry: SparseGeometry, pattern: str) -> torch.Tensor:
        rows, _ = self._rows(geometry)
        with self._scope():
            return ssp_leave(x, geometry.grid, pattern, self.k, ssp_group=self.groups.ssp,
                             ulysses_group=self.groups.ulysses, rows_per_rank=rows)

    @property
    def sparse_attention(self):
        scope = self._next_block_scope()
        if self.groups.sizes.ulysses_size == 1:
            return attention  # whole subsequences on this rank: no communication at all
        rows, width = self._rows()
        return functools.partial(_sparse_attention, group=self.groups.ulysses, seq_sizes=[r * width for r in rows],
                                 full_masks=dict(self._full_masks), scope=scope)


def _full_attention(q, k, v, *, key_mask=None, backend="auto", group, seq_sizes, scope):
    if key_mask is not None:
        raise ValueError("full blocks under sequence parallelism take no key mask (the model passes None)")
    with comm_scope(scope):
        return ulysses_attention(q, k, v, functools.partial(attention, backend=backend), group,
                                 seq_sizes=seq_sizes)


def _sparse_attention(q, k, v, *, key_mask=None, backend="auto", group, seq_sizes, full_masks, scope):
    full_mask = None if key_mask is None else full_masks[id(key_mask)]
    kernel = functools.partial(attention, key_mask=full_mask, backend=backend)
    with comm_scope(scope):
        return ulysses_attention(q, k, v, kernel, group, seq_sizes=seq_sizes)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def apply_sequence_parallel(
    model: nn.Module, *, ssp_size: int, ulysses_size: int, group: dist.ProcessGroup | None = None
) -> SequenceParallelGroups:
    """Shard ``model`` (an ``OSPNext``) over ``ssp_size * ulysses_size`` ranks of ``group`` (default: world).

    Every member of ``group`` calls this (it creates process groups). With more ranks than S*U, consecutive
    blocks of S*U ranks form independent sequence-parallel groups (data parallelism across them). Returns the
    groups; sum parameter gradients over ``groups.sp`` (see the module docstring: this does not all-reduce them).
    """
    if not all(hasattr(model, name) for name in ("config", "blocks", "sequence_plan")):
        raise ValueError("apply_sequence_parallel expects an OSPNext (config, blocks and sequence_plan attributes)")
    if isinstance(model.sequence_plan, SequenceParallelPlan):
        raise ValueError("sequence parallelism is already applied to this model; call remove_sequence_parallel first")
    config = model.config
    sizes = SequenceParallelSizes(ssp_size=ssp_size, ulysses_size=ulysses_size, num_heads=config.num_heads,
                                  sparse_ratio=config.sparse_ratio)
    groups = build_groups(sizes, group)
    plan = SequenceParallelPlan(groups, k=config.sparse_ratio, dim=config.dim, num_blocks=len(model.blocks))
    model.sequence_plan = plan
    model._tables = {}

    def before(module, args, kwargs):
        latents = args[0] if args else kwargs["latents_BCTHW"]
        plan.begin(module.patch_grid(latents))

    def after(module, args, output):
        return _ScaleGrad.apply(output, 1.0 / sizes.sp_size)

    plan.hooks = [model.register_forward_pre_hook(before, with_kwargs=True), model.register_forward_hook(after)]
    return groups


def remove_sequence_parallel(model: nn.Module) -> None:
    """Undo :func:`apply_sequence_parallel`: single-device plan, hooks removed (the process groups stay)."""
    plan = model.sequence_plan
    if not isinstance(plan, SequenceParallelPlan):
        raise ValueError("remove_sequence_parallel: the model has no sequence-parallel plan (apply one first)")
    for handle in plan.hooks:
        handle.remove()
    model.sequence_plan = SequencePlan()
    model._tables = {}


def sum_gradients(model: nn.Module, group: dist.ProcessGroup) -> None:
    """All-reduce (sum) every parameter gradient over ``group``: the single-device gradient on every rank."""
    all_reduce_sum_([param.grad for param in model.parameters() if param.grad is not None], group)


def all_reduce_sum_(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Sum ``tensors`` over ``group`` in place, in one collective (one flat buffer instead of one call each)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    for tensor, summed in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(summed.view_as(tensor))
