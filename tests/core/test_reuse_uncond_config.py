"""learner.reuse_rollout_uncond: the worker's rollout keeps the CFG uncond velocity and the first optimizer step
reuses it; the update's loss, gradients and first-step ratio equal those of the switch-off path."""

import pytest
import torch

from mixgrpo.config import load_config
from mixgrpo.engine.learner import plan_update
from mixgrpo.engine.rollout import RolloutRequest
from mixgrpo.engine.worker import PolicyWorker


def _worker(weights, reuse: bool) -> PolicyWorker:
    cfg = load_config("quickstart", ["sampler.num_steps=4", "sampler.guidance_scale=3.0", "window.size=2",
                                     "rollout.prompts_per_iteration=2", "rollout.group_size=2",
                                     "rollout.batch_size=4", "learner.micro_batch_size=2", "train.device=cpu",
                                     f"policy.weights={weights}", "eval.every=0",
                                     f"learner.reuse_rollout_uncond={'true' if reuse else 'false'}"])
    torch.manual_seed(0)
    return PolicyWorker(cfg, device=torch.device("cpu"))


def test_reuse_rollout_uncond_gives_the_same_update(tmp_path):
    from policies.toy import make_toy_policy, save_toy_policy

    weights = save_toy_policy(make_toy_policy(seed=3), tmp_path / "toy.safetensors")
    request = RolloutRequest(iteration=0, prompts=["a red square moving left", "a blue circle moving right"],
                             group_seeds=[11, 12], group_size=2, sde_steps=[0, 1])
    out, forwarded = {}, {}
    for reuse in (False, True):
        worker = _worker(weights, reuse)
        result = worker.rollout(request)
        kept = worker.batch.trajectory.uncond_velocity
        assert (kept is not None) == reuse and result.trajectory.uncond_velocity is None  # not sent to the driver
        mask = torch.ones(4, result.trajectory.num_steps, dtype=torch.bool)
        plan = plan_update(mask, optimizer_steps=1, micro_batch_size=2, shares=[(0, 4)],
                           generator=torch.Generator().manual_seed(0))
        calls = []
        hook = worker.learner.transformer.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
        stats = worker.update(torch.tensor([1.0, -1.0, 0.5, -0.5]), plan, (0, 4))
        hook.remove()
        forwarded[reuse] = sum(calls)  # rows through the transformer in the update
        grads = {n: p.grad.clone() for n, p in worker.learner.params.items() if p.grad is not None}
        out[reuse] = (result.trajectory.log_prob, stats, grads)
    assert forwarded[True] < forwarded[False]  # the uncond forwards were skipped
    assert torch.equal(out[True][0], out[False][0])  # keeping the uncond changes nothing in the rollout
    on, off = out[True][1], out[False][1]
    assert on.sums["terms"] == off.sums["terms"] > 0
    assert on.sums["loss"] == pytest.approx(off.sums["loss"], rel=1e-5, abs=1e-7)
    assert on.sums["first/ratio"] / on.sums["first/terms"] == pytest.approx(1.0, abs=1e-5)
    assert on.sums["first/ratio"] == pytest.approx(off.sums["first/ratio"], abs=1e-6)
    assert out[True][2].keys() == out[False][2].keys() and out[True][2]
    for name, grad in out[True][2].items():
        torch.testing.assert_close(grad, out[False][2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_reuse_rollout_uncond_must_be_a_bool():
    with pytest.raises(Exception, match="reuse_rollout_uncond"):
        load_config("quickstart", ["learner.reuse_rollout_uncond=sometimes"])
