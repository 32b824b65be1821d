"""The mixed sampler with a tiny deterministic velocity model (elementwise ops only, so it is batch-invariant and
any batch-size dependence seen here would come from the sampler itself)."""

import math

import pytest
import torch
from torch import nn

from mixgrpo import sde
from mixgrpo.algo.sampler import (
    concat_trajectories,
    noise_seed,
    post_window_sigmas,
    recompute_log_prob,
    sample,
)

C, T, H, W = 2, 2, 3, 4
L, D = 3, 5
K = 6


class ToyVelocity(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(0.5 * torch.randn(C, generator=g))
        self.b = nn.Parameter(0.5 * torch.randn(C, generator=g))
        self.c = nn.Parameter(0.3 * torch.randn(D, generator=g))

    def forward(self, x, sigma_B, text_BLD):
        cond_B = (text_BLD * self.c).sum(-1).mean(-1)
        per_channel = (1, C, 1, 1, 1)
        return torch.tanh(x * self.a.view(per_channel) + (sigma_B + cond_B).view(-1, 1, 1, 1, 1)) + x * self.b.view(
            per_channel
        )


class CountingVelocity:
    def __init__(self, fn):
        self.fn, self.rows = fn, []

    def __call__(self, x, sigma_B, text_BLD):
        self.rows.append(x.shape[0])
        return self.fn(x, sigma_B, text_BLD)


def _text(num_groups, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_groups, L, D, generator=g)


NEG = torch.full((1, L, D), 0.1)


def _rollout(model, groups=(0, 1, 2), group_size=2, **overrides):
    """Groups are identified by an integer that fixes their text, group seed and sample seeds."""
    text = torch.cat([_text(1, seed=100 + n) for n in groups])
    kwargs = dict(
        text_states_BLD=text,
        negative_text_states_BLD=NEG,
        guidance_scale=3.0,
        sigmas=sde.sigma_schedule(K, shift=3.0),
        sde_steps=(1, 2),
        eta=0.7,
        latent_shape=(C, T, H, W),
        group_size=group_size,
        seeds=[1000 * n + g for n in groups for g in range(group_size)],
        group_seeds=[7 + n for n in groups],
    )
    kwargs.update(overrides)
    return sample(model, **kwargs), text


def _assert_same(a, b):
    for name in ("latents", "x_t", "x_next", "log_prob"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_rollout_shapes_and_stored_steps():
    traj, _ = _rollout(ToyVelocity())
    assert traj.latents.shape == (6, C, T, H, W)
    assert traj.x_t.shape == traj.x_next.shape == (2, 6, C, T, H, W)
    assert traj.log_prob.shape == (6, 2) and torch.isfinite(traj.log_prob).all()
    assert traj.step_indices.tolist() == [1, 2]
    sig = sde.sigma_schedule(K, shift=3.0)
    assert torch.equal(traj.sigmas, sig[1:3]) and torch.equal(traj.sigma_next, sig[2:4])
    assert traj.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(traj.x_t[1], traj.x_next[0])  # contiguous window
    assert traj.nfe == 2 * K  # CFG: two evaluations per step


def test_same_seeds_bit_identical_whether_batch_holds_one_or_three_groups():
    model = ToyVelocity()
    together, _ = _rollout(model, groups=(0, 1, 2))
    alone = [_rollout(model, groups=(n,))[0] for n in (0, 1, 2)]
    joined = concat_trajectories(alone, num_groups=[1, 1, 1])
    _assert_same(together, joined)
    assert joined.group_index.tolist() == together.group_index.tolist() and joined.num_groups == 3
    _assert_same(together.select([2, 3]), alone[1])
    # The states travel with the rollout, once per group; each sample's row is its own group's (and the shared
    # negative row stays one row).
    assert torch.equal(joined.text_states_NLD, together.text_states_NLD) and joined.text_states_NLD.shape[0] == 3
    text, neg = joined.sample_text_states(torch.tensor([5, 0, 3]))
    assert torch.equal(text, together.text_states_NLD[[2, 0, 1]]) and torch.equal(neg, NEG)


def test_rollout_is_deterministic_and_groups_share_initial_noise_only():
    model = ToyVelocity()
    first, _ = _rollout(model)
    second, _ = _rollout(model)
    _assert_same(first, second)
    x_branch = first.x_t[0]  # entering the first SDE step: after the shared ODE prefix
    assert torch.equal(x_branch[0], x_branch[1]) and not torch.equal(x_branch[0], x_branch[2])
    assert not torch.equal(first.latents[0], first.latents[1])  # members explore differently
    other_seeds, _ = _rollout(model, seeds=[9, 8, 7, 6, 5, 4])
    assert not torch.equal(other_seeds.latents, first.latents)


def test_ode_prefix_runs_once_per_group_and_rows_are_counted():
    counter = CountingVelocity(ToyVelocity())
    traj, _ = _rollout(counter, sde_steps=(3, 4))
    # 3 prefix steps on N = 3 groups (x2 for CFG), then 3 steps on B = 6 samples (x2)
    assert counter.rows == [6, 6, 6, 12, 12, 12]
    assert traj.num_model_rows == sum(counter.rows) and traj.nfe == 2 * K
    no_cfg = CountingVelocity(ToyVelocity())
    traj, _ = _rollout(no_cfg, sde_steps=(3,), negative_text_states_BLD=None, guidance_scale=1.0)
    assert no_cfg.rows == [3, 3, 3, 6, 6, 6] and traj.nfe == K


def test_micro_batched_model_calls_give_the_same_rollout():
    model = ToyVelocity()
    whole, _ = _rollout(model)
    counter = CountingVelocity(model)
    chunked, _ = _rollout(counter, micro_batch_size=4)
    _assert_same(whole, chunked)
    # prefix step: 3 groups fit one chunk (6 rows with CFG); after branching, 6 samples -> chunks of 4 and 2
    assert counter.rows == [6] + [8, 4] * (K - 1)
    with pytest.raises(ValueError, match="micro_batch_size"):
        _rollout(model, micro_batch_size=0)


def test_sde_step_reproducible_from_the_sample_seed_alone():
    model = ToyVelocity()
    traj, text = _rollout(model, sde_steps=(2,))
    b = 3  # group 1, member 1
    x_t = traj.x_t[0, b : b + 1]
    sigma, sigma_next = traj.sigmas[0].item(), traj.sigma_next[0].item()
    with torch.no_grad():
        pair = torch.cat([x_t, x_t])
        v_c, v_u = model(pair, torch.full((2,), sigma), torch.cat([text[1:2], NEG])).chunk(2)
    v = v_u + 3.0 * (v_c - v_u)
    noise = torch.randn((C, T, H, W), generator=torch.Generator().manual_seed(noise_seed(1001, 2)))[None]
    x_next, log_prob, mean, std = sde.flow_sde_step(x_t, v, sigma, sigma_next, 0.7, noise=noise)
    torch.testing.assert_close(traj.x_next[0, b : b + 1], x_next, rtol=1e-6, atol=1e-6)
    ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(x_next.double()).mean()
    assert traj.log_prob[b, 0].item() == pytest.approx(ref.item(), rel=1e-5)


def test_recompute_gives_ratio_exactly_one_and_a_gradient():
    model = ToyVelocity()
    traj, text = _rollout(model)
    idx = torch.tensor([4, 0, 3])
    for step in range(traj.num_steps):
        log_prob, mean, std = recompute_log_prob(
            model, traj, step=step, sample_idx=idx, text_states_BLD=text[traj.group_index[idx]],
            negative_text_states_BLD=NEG, guidance_scale=3.0, eta=0.7, sde_kind="flow_grpo",
        )
        assert torch.equal(log_prob.detach(), traj.log_prob[idx, step])  # ratio == 1 bit for bit
        assert mean.shape == (3, C, T, H, W)
    model.zero_grad()
    log_prob.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="CFG"):
        recompute_log_prob(model, traj, step=0, sample_idx=idx, text_states_BLD=text[traj.group_index[idx]],
                           negative_text_states_BLD=None, guidance_scale=3.0, eta=0.7, sde_kind="flow_grpo")
    with pytest.raises(ValueError, match="differ from the rollout"):
        recompute_log_prob(model, traj, step=0, sample_idx=idx, text_states_BLD=text[traj.group_index[idx]],
                           negative_text_states_BLD=NEG, guidance_scale=3.0, eta=0.5, sde_kind="flow_grpo")


@pytest.mark.parametrize("kind", ["dance_grpo", "cps", "osp_next"])
def test_recompute_ratio_one_for_every_sde_kind(kind):
    model = ToyVelocity()
    traj, text = _rollout(model, sde_kind=kind, eta=0.5, sde_steps=(0, 2))
    idx = torch.tensor([5, 1])
    log_prob, _, _ = recompute_log_prob(model, traj, step=1, sample_idx=idx,
                                        text_states_BLD=text[traj.group_index[idx]], negative_text_states_BLD=NEG,
                                        guidance_scale=3.0, eta=0.5, sde_kind=kind)
    assert torch.equal(log_prob, traj.log_prob[idx, 1])


def test_eta_zero_rollout_is_noise_free_and_equals_the_ode_rollout():
    model = ToyVelocity()
    sde_eta0, _ = _rollout(model, eta=0.0)
    ode, _ = _rollout(model, sde_steps=())
    torch.testing.assert_close(sde_eta0.latents, ode.latents, rtol=0, atol=0)
    assert ode.num_steps == 0 and ode.log_prob.shape == (6, 0)
    assert torch.equal(ode.latents[0], ode.latents[1])  # no noise: group members coincide
    assert torch.equal(sde_eta0.log_prob, torch.zeros(6, 2))


def _straight_flow(x0):
    """Exact velocity of x_sigma = sigma * n + (1 - sigma) * x0 for a fixed target x0."""

    def velocity(x, sigma_B, text_BLD):
        return (x - x0) / sigma_B.view(-1, 1, 1, 1, 1)

    return velocity


@pytest.mark.parametrize("post_window, ratio", [("euler", 1.0), ("euler", 0.4), ("dpm2m", 1.0), ("dpm2m", 0.4)])
def test_every_solver_path_lands_on_the_target_of_a_straight_flow(post_window, ratio):
    x0 = torch.linspace(-1, 1, C * T * H * W).reshape(1, C, T, H, W)
    counter = CountingVelocity(_straight_flow(x0))
    traj, _ = _rollout(counter, groups=(0,), eta=0.0, post_window=post_window, post_window_ratio=ratio,
                       negative_text_states_BLD=None, guidance_scale=1.0, sde_steps=(0, 1))
    torch.testing.assert_close(traj.latents, x0.expand(2, -1, -1, -1, -1), rtol=1e-5, atol=1e-5)
    post = math.ceil(ratio * (K - 2))
    assert traj.nfe == 2 + post and len(counter.rows) == 2 + post


def test_dpm_post_window_is_more_accurate_than_euler_on_a_curved_flow():
    # v = x: x_sigma is x_1 * exp(sigma - 1) (ODE dx/dsigma = x), so the exact result at sigma = 0 is x_1 / e.
    def velocity(x, sigma_B, text_BLD):
        return x

    errors = {}
    for solver in ("euler", "dpm2m"):
        traj, _ = _rollout(velocity, groups=(0,), eta=0.0, post_window=solver, sde_steps=(0,),
                           negative_text_states_BLD=None, guidance_scale=1.0)
        x1 = torch.randn((C, T, H, W), generator=torch.Generator().manual_seed(7))
        errors[solver] = (traj.latents[0] - x1 / math.e).abs().max().item()
    assert errors["dpm2m"] < errors["euler"]


def test_post_window_sub_grid():
    tail = torch.tensor([0.8, 0.6, 0.4, 0.3, 0.2, 0.0])  # 5 steps
    assert post_window_sigmas(tail, 1.0).tolist() == tail.tolist()
    assert post_window_sigmas(tail, 0.4).tolist() == pytest.approx([0.8, 0.3, 0.0])  # ceil(2.0) = 2 steps
    assert post_window_sigmas(tail, 0.2).tolist() == pytest.approx([0.8, 0.0])
    assert post_window_sigmas(tail[-1:], 0.5).tolist() == [0.0]


def test_trajectory_select_and_to():
    traj, _ = _rollout(ToyVelocity())
    sub = traj.select([5, 0])
    assert torch.equal(sub.x_t, traj.x_t[:, [5, 0]]) and sub.seeds.tolist() == [2001, 0]
    assert sub.group_index.tolist() == [2, 0] and sub.nfe == traj.nfe
    moved = traj.to("cpu")
    assert torch.equal(moved.log_prob, traj.log_prob) and moved.model_dtype == traj.model_dtype


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(seeds=[1, 2, 3]), "seeds"),
        (dict(sde_steps=(6,)), "sde_steps"),
        (dict(negative_text_states_BLD=None), "guidance_scale"),
        (dict(seeds=[1, 2, 3, 4, 5, 6], group_seeds=[1, 2]), "group_seeds"),
        (dict(negative_text_states_BLD=torch.zeros(1, L + 1, D)), "same token length"),
        (dict(post_window="heun"), "post_window"),
        (dict(sde_kind="ddim"), "sde_kind"),
        (dict(sigmas=torch.tensor([0.0, 0.5, 1.0])), "decreasing"),
    ],
)
def test_bad_arguments_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        _rollout(ToyVelocity(), **overrides)
