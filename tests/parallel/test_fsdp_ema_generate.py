"""Under FSDP, videos of the EMA policy (evaluation, sample videos) come from the EMA weights, not the raw ones."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.sp_harness import run_ranks

pytestmark = pytest.mark.dist


def _check(rank, world, weights):
    from mixgrpo.config import load_config
    from mixgrpo.engine.worker import PolicyWorker, world_dims

    cfg = load_config("quickstart", ["sampler.num_steps=4", "window.size=2", "rollout.prompts_per_iteration=2",
                                     "rollout.group_size=2", "rollout.batch_size=2", "train.device=cpu",
                                     f"policy.weights={weights}", "learner.sharding=fsdp", "learner.ema_decay=0.5",
                                     "rollout.backend=ray", "rollout.num_workers=2", "eval.every=0"])
    worker = PolicyWorker(cfg, device=torch.device("cpu"), dims=world_dims(cfg).at_rank(rank))
    raw = worker.generate(["a red square moving left"], [1])
    with torch.no_grad():
        for shadow in worker.learner.ema.shadow.values():
            shadow.zero_()  # an EMA far from the weights
    assert not torch.equal(worker.generate(["a red square moving left"], [1]), raw)
    with torch.no_grad():  # and back: the raw weights were restored after the EMA forward
        for name, shadow in worker.learner.ema.shadow.items():
            shadow.copy_(dict(worker.learner.params)[name].detach())
    torch.testing.assert_close(worker.generate(["a red square moving left"], [1]), raw, rtol=0, atol=0)


def test_generate_uses_the_ema_weights_under_fsdp(tmp_path):
    from policies.toy import make_toy_policy, save_toy_policy

    weights = save_toy_policy(make_toy_policy(seed=3), tmp_path / "toy.safetensors")
    run_ranks(_check, 2, str(weights))
