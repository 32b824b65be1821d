"""Pure helpers of the Ray engine: how shares, sequence-parallel degrees, weight chunks and preflight are decided."""

import pytest
import torch

from mixgrpo.ray_rollout import chunk_tensors, contiguous_shares, gpus_without, missing_resources, sp_degrees


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


def test_chunks_respect_the_size_and_keep_every_tensor_in_order():
    tensors = {f"t{i}": torch.zeros(n) for i, n in enumerate([10, 30, 5, 100, 1, 1])}  # float32: 4 bytes each
    chunks = chunk_tensors(tensors, max_bytes=160)
    assert [k for c in chunks for k in c] == list(tensors)
    for chunk in chunks:
        size = sum(t.numel() * 4 for t in chunk.values())
        assert size <= 160 or len(chunk) == 1  # a tensor larger than a chunk travels alone
    assert [list(c) for c in chunks] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]


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
    cpus = {"CPU": 4.0}
    assert missing_resources(num_workers=5, sp_size=1, use_gpu=False, available=cpus, total=cpus, per_node=[cpus]) \
        == ["5 CPUs for 5 worker groups x sp_size 1 (4 free of 4 in the cluster)"]


def test_a_local_ray_instance_never_sees_the_learners_gpu():
    assert gpus_without(None, 4, 0) == "1,2,3"
    assert gpus_without("4,5,6,7", 4, 2) == "4,5,7"  # the index is among the visible devices
    assert gpus_without("3", 1, 0) == ""
    with pytest.raises(ValueError, match="train.device index 2 is not among the 2 visible GPUs"):
        gpus_without("0,1", 2, 2)
