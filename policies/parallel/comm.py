"""Autograd collectives for sequence parallelism, and communication accounting.

Every collective here is a ``torch.autograd.Function`` whose backward is the adjoint collective:

==========================  =============================================================
forward                     backward
==========================  =============================================================
``all_to_all``              ``all_to_all`` with scatter and gather dims (and sizes) swapped
``all_gather`` (grad=sum)   reduce-scatter: downstream grads are per-rank partial sums
``all_gather`` (grad=slice) slice: downstream grads are replicated (same on every rank)
``scatter``                 all-gather (the input is one replicated value)
==========================  =============================================================

Uneven shards are supported everywhere through explicit ``sizes`` (one size per rank along the sharded dim);
:func:`even_sizes` gives the ``torch.tensor_split`` split used throughout the package.

Accounting: inside ``with record_comm() as log:`` every collective adds one call and its bytes to ``log``, keyed
by (collective, scope label, direction). The label is the innermost ``comm_scope("block.12")`` active when the
*forward* ran; backward calls reuse it, because autograd runs backward after the forward scopes have exited
(and, on CUDA, on another thread, which is why the recorder is process-global rather than thread-local).

Two byte counts are kept per call: ``payload`` (bytes of the local tensor handed to the collective) and ``wire``
(bytes this rank sends to other ranks under the usual algorithms: all-to-all sends everything but its own
chunk; ring all-gather / reduce-scatter send (P-1)/P of the full tensor).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup | None

# Newer torch renamed the tensor-in/tensor-out collectives; use whichever this build has.
_all_gather_base = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_base = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

@dataclass
class CommLog:
    """Bytes and calls per (collective, scope, direction); direction is "forward" or "backward"."""

    entries: dict[tuple[str, str, str], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))

    def add(self, collective: str, scope: str, direction: str, payload: int, wire: int) -> None:
        entry = self.entries[(collective, scope, direction)]
        entry[0] += 1
        entry[1] += payload
        entry[2] += wire

    def _select(self, collective: str | None, scope: str | None, direction: str | None, prefix: bool):
        for (c, s, d), entry in self.entries.items():
            if collective not in (None, c) or direction not in (None, d):
                continue
            if scope is not None and not (s.startswith(scope) if prefix else s == scope):
                continue
            yield entry

    def calls(self, collective=None, scope=None, direction=None, *, prefix: bool = False) -> int:
        return sum(e[0] for e in self._select(collective, scope, direction, prefix))

    def payload_bytes(self, collective=None, scope=None, direction=None, *, prefix: bool = False) -> int:
        return sum(e[1] for e in self._select(collective, scope, direction, prefix))

    def wire_bytes(self, collective=None, scope=None, direction=None, *, prefix: bool = False) -> int:
        return sum(e[2] for e in self._select(collective, scope, direction, prefix))

    def rows(self) -> list[dict]:
        """One dict per key, sorted; handy for ``pandas.DataFrame(log.rows())`` or printing."""
        return [
            {"collective": c, "scope": s, "direction": d, "calls": e[0], "payload_bytes": e[1], "wire_bytes": e[2]}
            for (c, s, d), e in sorted(self.entries.items())
        ]


_RECORDERS: list[CommLog] = []
_SCOPES: list[str] = []


@contextlib.contextmanager
def record_comm() -> Iterator[CommLog]:
    """Record every collective (forward and backward) issued inside the ``with`` block; nests."""
    log = CommLog()
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)


@contextlib.contextmanager
def comm_scope(label: str) -> Iterator[None]:
    """Label the collectives issued in the block (e.g. ``"block.12"``); the innermost label wins."""
    _SCOPES.append(label)
    try:
        yield
    finally:
        _SCOPES.pop()


def current_scope() -> str:
    return _SCOPES[-1] if _SCOPES else ""


def _record(collective: str, scope: str, direction: str, payload: int, wire: int) -> None:
    for log in _RECORDERS:
        log.add(collective, scope, direction, payload, wire)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def group_size(group: ProcessGroup) -> int:
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    return dist.get_rank(group)


def even_sizes(length: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(length, parts)``: the first ``length % parts`` parts get one more."""
    if parts < 1 or length < 0:
        raise ValueError(f"even_sizes needs length >= 0 and parts >= 1, got length={length}, parts={parts}")
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _check_sizes(sizes: Sequence[int], world: int, total: int | None, name: str) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != world:
        raise ValueError(f"{name} must have one entry per rank ({world}), got {len(sizes)}: {sizes}")
    if total is not None and sum(sizes) != total:
        raise ValueError(f"{name} must sum to the dim size {total}, got {sizes} (sum {sum(sizes)})")
    return sizes


def shard(x: torch.Tensor, dim: int, sizes: Sequence[int], rank: int) -> torch.Tensor:
    """This rank's piece of ``x`` along ``dim`` (plain autograd narrow: backward zero-pads, no communication)."""
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank])


def _all_to_all_impl(x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes, scope, direction):
    world = group_size(group)
    rank = group_rank(group)
    chunks = list(torch.split(x, scatter_sizes, dim=scatter_dim))
    even = len(set(scatter_sizes)) == 1 and len(set(gather_sizes)) == 1
    if even:
        # Splitting a contiguous tensor along dim 0 already lays the pieces out back to back: send it as is.
        send = x if scatter_dim == 0 and x.is_contiguous() else torch.stack(chunks)
        send = send.reshape(world, *chunks[0].shape)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        received = list(recv.unbind(0))
    else:
        # Pieces of different shapes: exchange flat buffers with per-rank element counts.
        send = torch.cat([c.reshape(-1) for c in chunks])
        in_counts = [c.numel() for c in chunks]
        shape = list(x.shape)
        shapes = []
        for i in range(world):
            shape[scatter_dim] = scatter_sizes[rank]
            shape[gather_dim] = gather_sizes[i]
            shapes.append(tuple(shape))
        out_counts = [int(torch.Size(s).numel()) for s in shapes]
        recv = x.new_empty(sum(out_counts))
        dist.all_to_all_single(recv, send, out_counts, in_counts, group=group)
        received = [piece.view(s) for piece, s in zip(torch.split(recv, out_counts), shapes)]
    out = torch.cat(received, dim=gather_dim)
    own = _nbytes(chunks[rank])
    _record("all_to_all", scope, direction, _nbytes(x), _nbytes(x) - own)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes, scope):
        ctx.args = (group, gather_dim, scatter_dim, gather_sizes, scatter_sizes, scope)
        return _all_to_all_impl(x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes, scope, "forward")

    @staticmethod
    def backward(ctx, grad):
        group, s_dim, g_dim, s_sizes, g_sizes, scope = ctx.args
        grad = _all_to_all_impl(grad.contiguous(), group, s_dim, g_dim, s_sizes, g_sizes, scope, "backward")
        return grad, None, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    group: ProcessGroup,
    *,
    scatter_dim: int,
    gather_dim: int,
    scatter_sizes: Sequence[int] | None = None,
    gather_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` (piece i to rank i), concatenate received pieces along ``gather_dim``.

    Args:
        scatter_sizes: per-rank sizes of the split of ``x.shape[scatter_dim]`` (same list on every rank);
            default equal.
        gather_sizes: ``x.shape[gather_dim]`` on each rank (same list on every rank); default this rank's size
            everywhere, i.e. an even sharding.
    """
    world = group_size(group)
    scatter_dim %= x.dim()
    gather_dim %= x.dim()
    if scatter_dim == gather_dim:
        raise ValueError(f"all_to_all: scatter_dim and gather_dim must differ, both are {scatter_dim}")
    if scatter_sizes is None:
        if x.shape[scatter_dim] % world:
            raise ValueError(
                f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} does not split evenly over {world} "
                f"ranks; pass scatter_sizes (e.g. even_sizes({x.shape[scatter_dim]}, {world}))"
            )
        scatter_sizes = [x.shape[scatter_dim] // world] * world
    scatter_sizes = _check_sizes(scatter_sizes, world, x.shape[scatter_dim], "scatter_sizes")
    gather_sizes = _check_sizes(gather_sizes or [x.shape[gather_dim]] * world, world, None, "gather_sizes")
    if gather_sizes[group_rank(group)] != x.shape[gather_dim]:
        raise ValueError(
            f"all_to_all: gather_sizes[{group_rank(group)}]={gather_sizes[group_rank(group)]} must equal this "
            f"rank's x.shape[{gather_dim}]={x.shape[gather_dim]}"
        )
    if world == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes, current_scope())


def _all_gather_impl(x, group, dim, sizes, scope, direction):
    world = group_size(group)
    biggest = max(sizes)
    padded = x
    if x.shape[dim] < biggest:
        pad_shape = list(x.shape)
        pad_shape[dim] = biggest - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    send = padded.movedim(dim, 0).contiguous()
    recv = send.new_empty((world * biggest, *send.shape[1:]))
    _all_gather_base(recv, send, group=group)
    pieces = [recv[i * biggest : i * biggest + s] for i, s in enumerate(sizes)]
    out = torch.cat(pieces, dim=0).movedim(0, dim)
    _record("all_gather", scope, direction, _nbytes(x), _nbytes(send) * (world - 1))
    return out


def _reduce_scatter_impl(x, group, dim, sizes, scope, direction):
    world = group_size(group)
    rank = group_rank(group)
    biggest = max(sizes)
    moved = x.movedim(dim, 0)
    pieces = []
    for piece in torch.split(moved, sizes, dim=0):
        if piece.shape[0] < biggest:
            piece = torch.cat([piece, piece.new_zeros((biggest - piece.shape[0], *piece.shape[1:]))])
        pieces.append(piece)
    send = torch.cat(pieces).contiguous()
    recv = send.new_empty((biggest, *send.shape[1:]))
    _reduce_scatter_base(recv, send, op=dist.ReduceOp.SUM, group=group)
    _record("reduce_scatter", scope, direction, _nbytes(x), _nbytes(recv) * (world - 1))
    return recv[: sizes[rank]].movedim(0, dim)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes, grad_mode, scope):
        ctx.args = (group, dim, sizes, grad_mode, scope)
        return _all_gather_impl(x, group, dim, sizes, scope, "forward")

    @staticmethod
    def backward(ctx, grad):
        group, dim, sizes, grad_mode, scope = ctx.args
        if grad_mode == "sum":
            grad = _reduce_scatter_impl(grad, group, dim, sizes, scope, "backward")
        else:
            grad = shard(grad, dim, sizes, group_rank(group))
        return grad, None, None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes, scope):
        ctx.args = (group, dim, sizes, scope)
        return _reduce_scatter_impl(x, group, dim, sizes, scope, "forward")

    @staticmethod
    def backward(ctx, grad):
        group, dim, sizes, scope = ctx.args
        return _all_gather_impl(grad.contiguous(), group, dim, sizes, scope, "backward"), None, None, None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes, scope):
        ctx.args = (group, dim, sizes, scope)
        return shard(x, dim, sizes, group_rank(group)).clone()

    @staticmethod
    def backward(ctx, grad):
        group, dim, sizes, scope = ctx.args
        return _all_gather_impl(grad.contiguous(), group, dim, sizes, scope, "backward"), None, None, None, None


def _sizes_or_even(x: torch.Tensor, dim: int, group: ProcessGroup, sizes, *, local: bool) -> list[int]:
    """Per-rank sizes along ``dim``; ``local`` means ``x`` holds this rank's piece, else the whole dim."""
    world = group_size(group)
    if sizes is None:
        if local:
            return [x.shape[dim]] * world
        if x.shape[dim] % world:
            raise ValueError(
                f"dim {dim} of size {x.shape[dim]} does not split evenly over {world} ranks; "
                f"pass sizes (e.g. even_sizes({x.shape[dim]}, {world}))"
            )
        return [x.shape[dim] // world] * world
    sizes = _check_sizes(sizes, world, None if local else x.shape[dim], "sizes")
    if local and sizes[group_rank(group)] != x.shape[dim]:
        raise ValueError(
            f"sizes[{group_rank(group)}]={sizes[group_rank(group)]} must equal this rank's "
            f"x.shape[{dim}]={x.shape[dim]}"
        )
    return sizes


def all_gather(
    x: torch.Tensor, group: ProcessGroup, *, dim: int, sizes: Sequence[int] | None = None, grad: str = "sum"
) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (``sizes``: each rank's ``x.shape[dim]``, default equal).

    ``grad="sum"``: the output's gradient is a per-rank partial sum, so backward reduce-scatters (true adjoint).
    ``grad="slice"``: the output's gradient is replicated (e.g. every rank computes the same loss on the
    gathered output), so backward keeps this rank's slice and communicates nothing.
    """
    if grad not in ("sum", "slice"):
        raise ValueError(f"all_gather: grad must be 'sum' (reduce-scatter) or 'slice', got {grad!r}")
    dim %= x.dim()
    sizes = _sizes_or_even(x, dim, group, sizes, local=True)
    if group_size(group) == 1:
        return x
    return _AllGather.apply(x, group, dim, sizes, grad, current_scope())


def reduce_scatter(
    x: torch.Tensor, group: ProcessGroup, *, dim: int, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's piece along ``dim``; backward all-gathers."""
    dim %= x.dim()
    sizes = _sizes_or_even(x, dim, group, sizes, local=False)
    if group_size(group) == 1:
        return x
    return _ReduceScatter.apply(x, group, dim, sizes, current_scope())


def scatter(x: torch.Tensor, group: ProcessGroup, *, dim: int, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Keep this rank's piece of a replicated ``x``; backward all-gathers the pieces' gradients."""
    dim %= x.dim()
    sizes = _sizes_or_even(x, dim, group, sizes, local=False)
    if group_size(group) == 1:
        return x
    return _Scatter.apply(x, group, dim, sizes, current_scope())


class _AllGatherReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, outer_group, dim, sizes, keep, scope):
        ctx.args = (group, outer_group, dim, sizes, keep, scope)
        return _all_gather_impl(x, group, dim, sizes, scope, "forward")

    @staticmethod
    def backward(ctx, grad):
        group, outer_group, dim, sizes, keep, scope = ctx.args
        grad = grad.contiguous()
        dist.all_reduce(grad, group=outer_group)
        outer = group_size(outer_group)
        _record("all_reduce", scope, "backward", _nbytes(grad), 2 * _nbytes(grad) * (outer - 1) // outer)
        grad = shard(grad, dim, sizes, group_rank(group))
        return (grad if keep else torch.zeros_like(grad)), None, None, None, None, None, None


def all_gather_replicated(
    x: torch.Tensor, group: ProcessGroup, outer_group: ProcessGroup, *, dim: int, sizes: Sequence[int],
    keep_grad: bool,
) -> torch.Tensor:
    """All-gather inside ``group`` when ``outer_group`` holds several identical copies of that computation.

    Backward: the gathered tensor's gradient is a partial sum over ``outer_group``; all-reduce it there, slice
    this rank's piece, and keep it on one copy only (``keep_grad``), so that parameter gradients summed over
    ``outer_group`` count the replicated computation once. With one copy, use :func:`all_gather` instead.
    """
    dim %= x.dim()
    sizes = _sizes_or_even(x, dim, group, sizes, local=True)
    return _AllGatherReplicated.apply(x, group, outer_group, dim, sizes, keep_grad, current_scope())
