"""Reusing the rollout's CFG uncond velocity at the first inner step: the same log-probs, gradients and ratio 1."""

import torch

from mixgrpo import sde
from mixgrpo.algo.sampler import concat_trajectories, recompute_log_prob, sample
from policies.toy import build_toy_policy
from tests.core.test_sampler import NEG, ToyVelocity, _rollout


def _recompute(model, traj, text, neg, idx, step, reuse, guidance=3.0):
    return recompute_log_prob(model, traj, step=step, sample_idx=idx, text_states_BLD=text[traj.group_index[idx]],
                              negative_text_states_BLD=neg, guidance_scale=guidance, eta=0.7, sde_kind="flow_grpo",
                              separate_uncond=True, reuse_uncond=reuse)


def test_batch_invariant_model_reuse_is_bit_exact_and_keeps_ratio_one():
    model = ToyVelocity()
    traj, text = _rollout(model, keep_uncond=True)
    plain, _ = _rollout(model)
    assert traj.uncond_velocity.shape == (traj.num_steps, *traj.latents.shape) and plain.uncond_velocity is None
    assert torch.equal(traj.log_prob, plain.log_prob)  # storing it changes nothing in the rollout
    idx = torch.tensor([4, 0, 3])
    for step in range(traj.num_steps):
        grads = []
        for reuse in (False, True):
            model.zero_grad()
            log_prob, _, _ = _recompute(model, traj, text, NEG, idx, step, reuse)
            assert torch.equal(log_prob.detach(), traj.log_prob[idx, step])
            log_prob.sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    # select / concat carry the field
    sub = traj.select([1, 2])
    assert torch.equal(sub.uncond_velocity, traj.uncond_velocity[:, [1, 2]])
    both = concat_trajectories([traj, traj])
    assert both.uncond_velocity.shape[1] == 2 * traj.num_samples


def test_toy_transformer_reuse_matches_recompute_within_fp32_round_off():
    policy = build_toy_policy()
    model = lambda x, s, t: policy.velocity(x, s, t)  # noqa: E731
    prompts = ["a red circle moving left", "a blue square moving right"]
    text, neg = policy.encode_text(prompts), policy.encode_text([""])
    traj = sample(model, text_states_BLD=text, negative_text_states_BLD=neg, guidance_scale=2.0,
                  sigmas=sde.sigma_schedule(4, shift=1.0), sde_steps=(0, 1), eta=0.7,
                  latent_shape=policy.latent_shape(), group_size=2, seeds=[1, 2, 3, 4], group_seeds=[5, 6],
                  keep_uncond=True)
    idx = torch.tensor([3, 1])
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    for step in range(traj.num_steps):
        out = {}
        for reuse in (False, True):
            policy.transformer.zero_grad()
            log_prob, mean, _ = _recompute(model, traj, text, neg, idx, step, reuse, guidance=2.0)
            log_prob.sum().backward()
            out[reuse] = (log_prob.detach(), mean.detach(), [p.grad.clone() for p in params])
        torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-6)
        for a, b in zip(out[True][2], out[False][2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        ratio = torch.exp(out[True][0] - traj.log_prob[idx, step])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)
