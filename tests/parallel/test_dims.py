"""ParallelDims: the one description of the world (sizes, this rank's place, each group's share, validation)."""

from __future__ import annotations

import pytest

from mixgrpo.config import load_config
from mixgrpo.engine.worker import world_dims
from policies.parallel.dims import ParallelDims


def test_sizes_and_ranks():
    dims = ParallelDims(num_groups=3, ssp_size=2, ulysses_size=2, fsdp=True)
    assert (dims.sp_size, dims.world_size, dims.distributed, dims.sharded) == (4, 12, True, True)
    placed = [dims.at_rank(r) for r in range(dims.world_size)]
    assert [d.group for d in placed] == [0] * 4 + [1] * 4 + [2] * 4
    assert [d.rank for d in placed if d.leads_group] == [0, 4, 8]
    assert dims.group_ranks(1) == [4, 5, 6, 7]
    assert dims.at_rank(5).num_groups == 3 and dims.rank == 0  # a copy: the original stays rank 0


def test_one_device_is_never_sharded():
    dims = ParallelDims(fsdp=True)
    assert (dims.world_size, dims.distributed, dims.sharded, dims.leads_group) == (1, False, False, True)


def test_shares_of_prompts_and_samples():
    dims = ParallelDims(num_groups=2)
    assert dims.prompt_shares(5) == [[0, 1, 2], [3, 4]]
    assert dims.sample_shares(5, 4) == [(0, 12), (12, 8)]
    assert ParallelDims(num_groups=3).sample_shares(2, 3) == [(0, 3), (3, 3), (0, 0)]  # an idle group samples none


@pytest.mark.parametrize("field, kwargs", [("num_groups", {"num_groups": 0}), ("ssp_size", {"ssp_size": 1.5}),
                                           ("ulysses_size", {"ulysses_size": True}),
                                           ("rank", {"num_groups": 2, "rank": 2}), ("rank", {"rank": -1})])
def test_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"ParallelDims.{field} "):
        ParallelDims(**kwargs)


def test_split_of_a_sequence_parallel_group_for_a_model():
    dims = ParallelDims.for_model(num_groups=2, sp_size=8, num_heads=40, sparse_ratio=2)
    assert (dims.ssp_size, dims.ulysses_size, dims.world_size) == (4, 2, 16)
    assert ParallelDims.for_model(sp_size=8, num_heads=None, sparse_ratio=2).ssp_size == 4  # heads checked later
    with pytest.raises(ValueError, match="rollout.sp_size=3"):
        ParallelDims.for_model(sp_size=3, num_heads=2, sparse_ratio=2)


def test_world_dims_from_the_config():
    local = world_dims(load_config("quickstart", []))
    assert (local.world_size, local.sharded, local.use_gpu) == (1, False, False)
    cfg = load_config("quickstart", ["rollout.backend=ray", "rollout.num_workers=2", "learner.sharding=fsdp",
                                     "train.device=cpu"])
    ray = world_dims(cfg, use_gpu=False)
    assert (ray.num_groups, ray.sp_size, ray.world_size, ray.sharded) == (2, 1, 2, True)
