"""Parallelism for OSP-Next: the world's layout (``ParallelDims``), sequence parallelism (process groups, autograd
collectives with accounting, Ulysses, SSP) and FSDP."""

from policies.parallel.apply import (
    SequenceParallelPlan,
    apply_sequence_parallel,
    remove_sequence_parallel,
    sum_gradients,
)
from policies.parallel.comm import comm_scope, record_comm
from policies.parallel.degrees import check_degrees, sp_degrees
from policies.parallel.dims import ParallelDims
from policies.parallel.groups import SequenceParallelGroups, SequenceParallelSizes, build_groups

__all__ = [
    "ParallelDims",
    "SequenceParallelGroups",
    "SequenceParallelPlan",
    "SequenceParallelSizes",
    "apply_sequence_parallel",
    "build_groups",
    "check_degrees",
    "sp_degrees",
    "remove_sequence_parallel",
    "comm_scope",
    "record_comm",
    "sum_gradients",
]
