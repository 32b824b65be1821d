import pytest

from mixgrpo.driver.placement import GPUDemand, check_gpu_placement, gpu_demand, unplaced_gpus
from rewards.ensemble import RewardSpec


def test_demand_counts_ray_rewards_with_gpus_only():
    specs = [RewardSpec(name="videoalign", backend="ray", num_gpus=1.0),
             RewardSpec(name="jpeg_compressibility", backend="local"),
             RewardSpec(name="clip_score", backend="ray", num_gpus=0.0)]
    demand = gpu_demand(num_workers=2, sp_size=4, use_gpu=True, reward_specs=specs)
    assert (demand.worker_gpus, demand.reward_gpus, demand.total) == (8, 1.0, 9.0)
    assert demand.rewards == (("videoalign", 1.0),)
    assert gpu_demand(num_workers=2, sp_size=4, use_gpu=False, reward_specs=specs).worker_gpus == 0


def test_two_groups_of_four_fill_a_node_of_eight_and_a_reward_gpu_is_refused_naming_the_numbers():
    demand = GPUDemand(num_workers=2, sp_size=4, rewards=(("videoalign", 1.0),))
    problems = unplaced_gpus(demand, [8])
    assert len(problems) == 1 and "9 GPUs" in problems[0] and "8 free" in problems[0]
    assert "2 worker groups x sp_size 4 = 8 GPUs + 1 for reward actors (videoalign 1)" in problems[0]
    with pytest.raises(RuntimeError, match="cannot be placed"):
        check_gpu_placement(demand, [8])


def test_fits_and_node_by_node():
    assert unplaced_gpus(GPUDemand(num_workers=2, sp_size=4), [8]) == []
    assert unplaced_gpus(GPUDemand(num_workers=2, sp_size=3, rewards=(("a", 1.0), ("b", 1.0))), [8]) == []
    # Two fractions share the one GPU the groups leave.
    assert unplaced_gpus(GPUDemand(num_workers=1, sp_size=7, rewards=(("a", 0.5), ("b", 0.5))), [8]) == []
    # Enough in total, but 4 + 2 + 2 holds one group of 4, not two.
    problems = unplaced_gpus(GPUDemand(num_workers=2, sp_size=4), [4, 2, 2])
    assert problems and "worker group 2 of 2 needs 4 GPUs on one node" in problems[0]
    # A 2-GPU reward actor needs 2 GPUs on one node, not one here and one there.
    problems = unplaced_gpus(GPUDemand(num_workers=1, sp_size=2, rewards=(("big", 2.0),)), [3, 1])
    assert problems and "reward actor big needs 2 GPUs on one node" in problems[0]
