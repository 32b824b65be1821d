"""The preflight counts the reward actors' GPUs with the worker groups' (a local Ray cluster with 8 logical GPUs)."""

import pytest

from mixgrpo.config import ConfigError, load_config
from mixgrpo.driver.preflight import check_gpus

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def eight_gpu_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=8, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def _cfg(*overrides):
    return load_config(None, ["rollout.backend=ray", "rollout.num_workers=2", "rollout.sp_size=4",
                              "train.device=cuda", *overrides])


def test_groups_plus_a_reward_gpu_are_refused_at_once(eight_gpu_cluster):
    check_gpus(_cfg())  # 2 x 4 on 8 GPUs
    with pytest.raises(ConfigError, match=r"9 GPUs .*2 worker groups x sp_size 4 = 8 GPUs \+ 1 for reward actors"):
        check_gpus(_cfg("rewards.0.backend=ray", "rewards.0.num_gpus=1"))
    check_gpus(_cfg("rollout.sp_size=3", "rewards.0.backend=ray", "rewards.0.num_gpus=1"))
