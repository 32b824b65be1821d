"""Every GPU a run asks for, placed on the cluster's nodes before anything starts (pure functions).

A run asks for GPUs in two places: its worker groups (``num_workers`` groups of ``sp_size`` ranks, one GPU per
rank, each group on one node) and its rewards that run in their own Ray actors (``backend: ray`` with
``num_gpus``; a fraction shares a GPU, a whole number must fit one node). Ray would leave an actor that asks for
a GPU no one has left pending forever; this placement refuses such a run at once, naming the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class GPUDemand:
    """What a run asks for: worker groups of ``sp_size`` GPUs and the reward actors' GPUs (name, amount)."""

    num_workers: int
    sp_size: int
    rewards: tuple[tuple[str, float], ...] = ()

    @property
    def worker_gpus(self) -> int:
        return self.num_workers * self.sp_size

    @property
    def reward_gpus(self) -> float:
        return sum(amount for _, amount in self.rewards)

    @property
    def total(self) -> float:
        return self.worker_gpus + self.reward_gpus

    def describe(self) -> str:
        text = f"{self.num_workers} worker groups x sp_size {self.sp_size} = {self.worker_gpus} GPUs"
        if self.rewards:
            names = ", ".join(f"{name} {amount:g}" for name, amount in self.rewards)
            text += f" + {self.reward_gpus:g} for reward actors ({names})"
        return text


def gpu_demand(*, num_workers: int, sp_size: int, use_gpu: bool, reward_specs: Sequence) -> GPUDemand:
    """The demand of a run: ``reward_specs`` are ``RewardSpec``-like (``name``, ``backend``, ``num_gpus``); only
    ``backend="ray"`` rewards with GPUs count (local ones share the driver's device, worker-group ones the
    groups' GPUs)."""
    rewards = tuple((spec.name, float(spec.num_gpus)) for spec in reward_specs
                    if getattr(spec, "backend", "local") == "ray" and float(spec.num_gpus) > 0)
    return GPUDemand(num_workers=num_workers if use_gpu else 0, sp_size=sp_size, rewards=rewards)


def unplaced_gpus(demand: GPUDemand, node_gpus: Sequence[float]) -> list[str]:
    """Place the demand on nodes with ``node_gpus`` free GPUs each; what cannot be placed, one line per problem
    (empty: it fits). Groups go first (whole GPUs, one node each, most-free node first), then the reward actors,
    largest first, first fit on the GPUs the groups left (a fraction shares a GPU with other fractions)."""
    free = sorted((float(g) for g in node_gpus), reverse=True)
    problems = []
    total = sum(free)
    if demand.total > total + 1e-9:
        problems.append(f"{demand.total:g} GPUs ({demand.describe()}) but the cluster has {total:g} free")
        return problems
    for group in range(demand.num_workers):
        index = max(range(len(free)), key=free.__getitem__, default=None)
        if index is None or free[index] < demand.sp_size:
            problems.append(f"worker group {group + 1} of {demand.num_workers} needs {demand.sp_size} GPUs on one "
                            f"node; the nodes have {[f'{g:g}' for g in free]} free after the groups before it")
            return problems
        free[index] -= demand.sp_size
    for name, amount in sorted(demand.rewards, key=lambda item: -item[1]):
        need = amount if amount <= 1 else float(math.ceil(amount))
        index = next((i for i, g in enumerate(free) if g + 1e-9 >= need), None)
        if index is None:
            problems.append(f"reward actor {name} needs {amount:g} GPUs on one node; after the worker groups "
                            f"({demand.worker_gpus} GPUs) the nodes have {[f'{g:g}' for g in free]} free")
            continue
        free[index] -= need
    return problems


def check_gpu_placement(demand: GPUDemand, node_gpus: Sequence[float]) -> None:
    """Raise RuntimeError naming the numbers unless the demand fits the nodes."""
    problems = unplaced_gpus(demand, node_gpus)
    if problems:
        raise RuntimeError("the run's GPUs cannot be placed: " + "; ".join(problems) + ". Lower rollout.num_workers "
                           "or rollout.sp_size, score the rewards on the worker groups (or give their num_gpus a "
                           "fraction that shares a GPU), or add GPUs to the cluster.")


__all__ = ["GPUDemand", "check_gpu_placement", "gpu_demand", "unplaced_gpus"]
