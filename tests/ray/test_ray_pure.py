"""Pure helpers of the Ray workers: how shares, sequence-parallel degrees and preflight are decided."""

import pytest
import torch

from mixgrpo.driver.ray_workers import missing_resources
from policies.parallel.dims import contiguous_shares, sample_shares
from policies.parallel import check_degrees, sp_degrees


def test_shares_cover_every_group_once_in_order():
    for groups in range(0, 9):
        for workers in range(1, 5):
            shares = contiguous_shares(groups, workers)
            assert len(shares) == workers
            assert [g for share in shares for g in share] == list(range(groups))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("sp, k, expected", [(1, 2, (1, 1)), (2, 2, (2, 1)), (4, 2, (4, 1)), (8, 2, (4, 2)),
                                             (4, 1, (1, 4)), (6, 3, (3, 2))])
def test_sp_degrees_give_ssp_the_ranks_that_divide_the_subsequences(sp, k, expected):
    ssp, ulysses = sp_degrees(sp, k)
    assert (ssp, ulysses) == expected and ssp * ulysses == sp and (k * k) % ssp == 0


def test_sp_degrees_reject_zero():
    with pytest.raises(ValueError, match="rollout.sp_size"):
        sp_degrees(0, 2)


def test_sample_shares_follow_the_prompt_shares():
    assert sample_shares(contiguous_shares(5, 2), 4) == [(0, 12), (12, 8)]
    assert sample_shares(contiguous_shares(2, 2), 3) == [(0, 3), (3, 3)]


def test_degrees_that_do_not_fit_the_model_name_the_field_and_what_fits():
    assert check_degrees(1, num_heads=None, sparse_ratio=None) is None  # no sequence parallelism: nothing to check
    sizes = check_degrees(8, num_heads=40, sparse_ratio=2)
    assert (sizes.ssp_size, sizes.ulysses_size) == (4, 2)
    with pytest.raises(ValueError, match=r"rollout.sp_size=3 does not fit this model \(2 heads, Skiparse k=2\).*"
                                         r"Sizes that fit: \[1, 2, 4, 8\]"):
        check_degrees(3, num_heads=2, sparse_ratio=2)
    with pytest.raises(ValueError, match="needs an OSP-Next transformer"):
        check_degrees(2, num_heads=None, sparse_ratio=None)


def test_missing_resources_name_cpus_gpus_and_the_node_an_sp_group_needs():
    node = {"CPU": 16.0, "GPU": 8.0}
    ok = missing_resources(num_workers=2, sp_size=4, use_gpu=True, available=node, total=node, per_node=[node])
    assert ok == []
    missing = missing_resources(num_workers=3, sp_size=4, use_gpu=True, available={"CPU": 16.0, "GPU": 7.0},
                                total=node, per_node=[node])
    assert missing == ["12 GPUs for 3 worker groups x sp_size 4 (7 free of 8 in the cluster)"]
    small = {"CPU": 8.0, "GPU": 2.0}
    both = {"CPU": 16.0, "GPU": 4.0}
    missing = missing_resources(num_workers=1, sp_size=4, use_gpu=True, available=both, total=both,
                                per_node=[small, small])
    assert missing == ["a node with 4 GPUs for one sequence-parallel group (the largest has 2)"]
    uneven = [{"CPU": 8.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}]
    free = {"CPU": 24.0, "GPU": 8.0}
    assert missing_resources(num_workers=2, sp_size=4, use_gpu=True, available=free, total=free, per_node=uneven) \
        == ["2 x 4 GPUs on single nodes, one sequence-parallel group each (the nodes can hold 1)"]
    cpus = {"CPU": 4.0}
    assert missing_resources(num_workers=5, sp_size=1, use_gpu=False, available=cpus, total=cpus, per_node=[cpus]) \
        == ["5 CPUs for 5 worker groups x sp_size 1 (4 free of 4 in the cluster)"]


def test_local_and_ray_workers_implement_the_worker_protocol():
    import inspect

    from mixgrpo.config import load_config
    from mixgrpo.driver.ray_workers import RayWorkers
    from mixgrpo.engine.worker import LocalWorkers, WorkerSet

    local = LocalWorkers(load_config("quickstart", ["train.device=cpu"]))
    assert isinstance(local, WorkerSet)
    methods = [name for name, value in vars(WorkerSet).items() if inspect.isfunction(value) and name[0] != "_"]
    assert len(methods) == 8
    for cls in (LocalWorkers, RayWorkers):
        for name in methods:  # RayWorkers needs a cluster to build: its methods are checked by signature
            expected = list(inspect.signature(getattr(WorkerSet, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == expected, (cls.__name__, name)
