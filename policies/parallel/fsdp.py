"""FSDP2 for full fine-tuning: parameters, gradients and optimizer state sharded over every rank.

``apply_fsdp(model, group=..., param_dtype=...)`` wraps each transformer block, then the whole model, with torch's
``fully_shard``. Master weights stay in the dtype the model was built in (float32 for training); forwards and
backwards run in ``param_dtype``; gradients are reduce-scattered in ``reduce_dtype`` and SUMMED, not averaged:

- under sequence parallelism every rank's gradients are its share of its group's gradient (see
  ``policies/parallel/apply.py``), so the sum over a group is that group's gradient;
- the learner scales each loss term by its share of the whole batch, so the sum over groups is the gradient of
  the whole batch, as one device would compute it.

Every forward and backward of a sharded model is a collective over all ranks (parameter all-gathers and gradient
reduce-scatters), so all ranks must run the same number of them; ``gathered(model)`` lifts that for stretches of
no-grad forwards (rollouts): the full parameters are gathered once and stay until the block exits.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, *, mesh: DeviceMesh | None = None, group: dist.ProcessGroup | None = None,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Shard ``model`` (an ``OSPNext``: ``model.blocks`` are the units) over ``mesh`` (1-D), else over ``group``
    (default: the world), in place; call it on every rank of the mesh. Where it comes in preparing a model (and
    why there): ``policies.prepare``. Parameters may still be on the meta device (materialise them afterwards
    with ``model.to_empty(device=...)`` and an init that writes the local shards).
    """
    if not hasattr(model, "blocks"):
        raise ValueError("apply_fsdp expects a transformer with a `blocks` ModuleList (an OSPNext)")
    if mesh is None:
        group = group or dist.group.WORLD
        mesh = DeviceMesh.from_group(group, "cuda" if dist.get_backend(group) == "nccl" else "cpu")
    # No casting of forward inputs: the model casts what its layers need itself, and some inputs must stay float32
    # (timesteps on the 0..1000 scale, RoPE tables, modulation), as in the unsharded model.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    _sum_gradients(model)
    return model


def _sum_gradients(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, FSDPModule):
            if hasattr(module, "set_gradient_divide_factor"):
                module.set_gradient_divide_factor(1.0)
            else:  # older torch
                module.set_reduce_scatter_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                # a plain SUM collective (gloo has no pre-multiplied sum; NCCL needs no scaling at factor 1 either)
                module.set_force_sum_reduction_for_comms(True)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Full parameters on every rank inside the block (one all-gather, a collective: all ranks enter together),
    so that ranks may then run different numbers of no-grad forwards. A no-op for an unsharded model."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # apply_fsdp's settings: blocks reshard after forward; the root keeps its few parameters (FSDP's default)
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter or optimizer-state tensor (a DTensor shard, or the tensor itself)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a sharded DTensor; a collective)."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if gather is not None else tensor


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write ``full`` (the whole tensor) into ``param``: all of it, or this rank's dim-0 shard of a sharded one
    (FSDP2 splits dim 0 with ``torch.chunk``)."""
    local = local_tensor(param)
    if local.shape != full.shape:
        mesh = param.device_mesh
        chunks = torch.chunk(full, mesh.size(), dim=0)  # fewer chunks than ranks when dim 0 is short
        rank = mesh.get_local_rank()
        full = chunks[rank] if rank < len(chunks) else full[:0]
    if local.numel():
        local.copy_(full.to(local.device, local.dtype))
