"""Sampler steps against their formulas written out independently here (fp64 references)."""

import math

import pytest
import torch

from mixgrpo import sde

SHAPE = (3, 2, 2, 3, 4)  # B, C, T, H, W


def _xv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def test_sigma_schedule_shift_endpoints_and_formula():
    s = sde.sigma_schedule(4, shift=3.0)
    assert s.shape == (5,) and s.dtype == torch.float32
    expected = [3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25, 0.0)]
    torch.testing.assert_close(s, torch.tensor(expected), rtol=0, atol=1e-7)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert torch.equal(sde.sigma_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="num_steps"):
        sde.sigma_schedule(0)
    with pytest.raises(ValueError, match="shift"):
        sde.sigma_schedule(4, shift=0.0)


def test_flow_sde_step_matches_formula_and_normal_density():
    x, v, eps = _xv()
    sigma, sigma_next, eta = 0.8, 0.6, 0.7
    x_next, logp, mean, std = sde.flow_sde_step(x, v, sigma, sigma_next, eta, noise=eps)
    xd, vd, ed = x.double(), v.double(), eps.double()
    dt = sigma_next - sigma
    st = eta * math.sqrt(sigma / (1 - sigma))
    mean_ref = xd + (vd + st**2 / (2 * sigma) * (xd + (1 - sigma) * vd)) * dt
    std_ref = st * math.sqrt(-dt)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_next.double(), mean_ref + std_ref * ed, rtol=1e-6, atol=1e-6)
    assert std.flatten().item() == pytest.approx(std_ref, rel=1e-6)
    normal = torch.distributions.Normal(mean.double(), std_ref)
    logp_ref = normal.log_prob(x_next.double()).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(logp.double(), logp_ref, rtol=1e-6, atol=1e-6)
    assert logp.shape == (3,) and logp.dtype == torch.float32


def test_prev_sample_scores_a_stored_sample_and_grad_flows_through_mean_only():
    x, v, eps = _xv(1)
    x_next, logp, _, _ = sde.flow_sde_step(x, v, 0.5, 0.4, 0.7, noise=eps)
    v_req = v.clone().requires_grad_(True)
    x_again, logp_again, _, _ = sde.flow_sde_step(x, v_req, 0.5, 0.4, 0.7, prev_sample=x_next)
    assert torch.equal(x_again, x_next) and torch.equal(logp_again.detach(), logp)
    logp_again.sum().backward()
    assert v_req.grad is not None and v_req.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not both"):
        sde.flow_sde_step(x, v, 0.5, 0.4, 0.7, noise=eps, prev_sample=x_next)


def test_per_sample_tensor_sigmas_equal_per_sample_float_calls():
    x, v, eps = _xv(2)
    sig, sig_next = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.45, 0.0])
    x_next, logp, mean, _ = sde.flow_sde_step(x, v, sig, sig_next, 0.7, noise=eps)
    for b in range(3):
        xb, lb, mb, _ = sde.flow_sde_step(
            x[b : b + 1], v[b : b + 1], sig[b].item(), sig_next[b].item(), 0.7, noise=eps[b : b + 1]
        )
        torch.testing.assert_close(x_next[b : b + 1], xb)
        torch.testing.assert_close(logp[b : b + 1], lb)


def test_sigma_one_guard_uses_sigma_next_like_the_peers():
    x, v, eps = _xv(3)
    sigmas = sde.sigma_schedule(10, shift=3.0)
    x_next, logp, mean, std = sde.flow_sde_step(x, v, sigmas[0].item(), sigmas[1].item(), 0.7, noise=eps)
    assert torch.isfinite(x_next).all() and torch.isfinite(logp).all() and torch.isfinite(std).all()
    s1 = sigmas[1].item()
    st = 0.7 * math.sqrt(1.0 / (1 - s1))  # peers: sqrt(sigma / (1 - sigmas[1])) at sigma = 1
    assert std.flatten().item() == pytest.approx(st * math.sqrt(1.0 - s1), rel=1e-6)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde.flow_sde_step(x, v, 0.5, 0.5, 0.7)


def test_dance_step_matches_the_dancegrpo_score_form():
    x, v, eps = _xv(4)
    sigma, sigma_next, eta = 0.7, 0.55, 0.3
    x_next, logp, mean, std = sde.dance_sde_step(x, v, sigma, sigma_next, eta, noise=eps)
    xd, vd = x.double(), v.double()
    dsigma = sigma_next - sigma
    x0 = xd - sigma * vd
    score = -(xd - (1 - sigma) * x0) / sigma**2
    mean_ref = xd + dsigma * vd + (-0.5 * eta**2 * score) * dsigma
    std_ref = eta * math.sqrt(sigma - sigma_next)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_next.double(), mean_ref + std_ref * eps.double(), rtol=1e-6, atol=1e-6)
    logp_ref = torch.distributions.Normal(mean_ref, std_ref).log_prob(x_next.double()).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(logp.double(), logp_ref, rtol=1e-6, atol=1e-6)
    # DanceGRPO needs no sigma = 1 guard: it stays finite at step 0.
    assert torch.isfinite(sde.dance_sde_step(x, v, 1.0, 0.9, eta, noise=eps)[1]).all()


def test_osp_step_matches_osp_next_form():
    x, v, eps = _xv(5)
    sigma, sigma_next = 0.6, 0.5
    x_next, _, mean, std = sde.osp_sde_step(x, v, sigma, sigma_next, 1.0, noise=eps)
    xd, vd = x.double(), v.double()
    dt, st = sigma_next - sigma, sigma
    mean_ref = xd * (1 + st**2 / (2 * sigma) * dt) + vd * (1 + st**2 * (1 - sigma) / (2 * sigma)) * dt
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=1e-6)
    assert std.flatten().item() == pytest.approx(st * math.sqrt(-dt), rel=1e-6)


def test_cps_step_formula_and_peer_log_prob():
    x, v, eps = _xv(6)
    sigma, sigma_next, eta = 0.6, 0.45, 0.8
    x_next, logp, mean, std = sde.cps_sde_step(x, v, sigma, sigma_next, eta, noise=eps)
    xd, vd = x.double(), v.double()
    std_ref = sigma_next * math.sin(eta * math.pi / 2)
    mean_ref = (1 - sigma_next) * (xd - sigma * vd) + math.sqrt(sigma_next**2 - std_ref**2) * (xd + (1 - sigma) * vd)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=1e-6)
    x_ref = mean_ref + std_ref * eps.double()
    torch.testing.assert_close(x_next.double(), x_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logp.double(), -((x_ref - mean_ref) ** 2).mean(dim=(1, 2, 3, 4)), rtol=1e-5, atol=1e-6)
    # last step (sigma_next = 0): deterministic, lands on x0_hat, finite log-prob
    x_last, logp_last, _, _ = sde.cps_sde_step(x, v, 0.2, 0.0, eta, noise=eps)
    torch.testing.assert_close(x_last, x - 0.2 * v)
    assert torch.isfinite(logp_last).all()


def test_eta_zero_flow_step_is_euler():
    x, v, eps = _xv(7)
    x_next, _, mean, _ = sde.flow_sde_step(x, v, 0.7, 0.5, 0.0, noise=eps)
    torch.testing.assert_close(x_next, x + (0.5 - 0.7) * v)
    torch.testing.assert_close(sde.euler_step(x, v, 0.7, 0.5), x + (0.5 - 0.7) * v)


def test_get_sde_step_names_the_options():
    assert sde.get_sde_step("flow_grpo") is sde.flow_sde_step
    with pytest.raises(ValueError, match="choose one of"):
        sde.get_sde_step("ddim")


def _dpm_ref_2m(x, x0, x0_prev, s_prev, s, s_next):
    """DPM-Solver++(2M) midpoint for alpha = 1 - sigma, written with logs (fp64)."""
    lam = lambda t: math.log(1 - t) - math.log(t)  # noqa: E731
    h, h0 = lam(s_next) - lam(s), lam(s) - lam(s_prev)
    r0 = h0 / h
    d0, d1 = x0, (x0 - x0_prev) / r0
    a_next = 1 - s_next
    return (s_next / s) * x - a_next * (math.exp(-h) - 1) * d0 - 0.5 * a_next * (math.exp(-h) - 1) * d1


def test_dpm_solver_2m_matches_log_form_and_first_order_cases():
    x, x0, x0_prev = (t.double() for t in _xv(8))
    got = sde.dpm_solver_2m_step(x.float(), x0.float(), 0.5, 0.3, prev_x0_pred=x0_prev.float(), prev_sigma=0.7)
    torch.testing.assert_close(got.double(), _dpm_ref_2m(x, x0, x0_prev, 0.7, 0.5, 0.3), rtol=1e-5, atol=1e-5)
    # first order (no history) is DDIM: x_next = (s'/s) x + (1 - s'/s) x0 for alpha = 1 - sigma
    first = sde.dpm_solver_2m_step(x.float(), x0.float(), 0.5, 0.3)
    torch.testing.assert_close(first.double(), 0.6 * x + (0.7 - 0.6 * 0.5) * x0, rtol=1e-5, atol=1e-5)
    # to sigma = 0 the result is x0_hat even with history (lower-order final step)
    last = sde.dpm_solver_2m_step(x.float(), x0.float(), 0.2, 0.0, prev_x0_pred=x0_prev.float(), prev_sigma=0.4)
    torch.testing.assert_close(last, x0.float())
    # with a constant x0 prediction the second-order term vanishes
    same = sde.dpm_solver_2m_step(x.float(), x0.float(), 0.5, 0.3, prev_x0_pred=x0.float(), prev_sigma=0.7)
    torch.testing.assert_close(same, first)
    with pytest.raises(ValueError, match="both"):
        sde.dpm_solver_2m_step(x.float(), x0.float(), 0.5, 0.3, prev_x0_pred=x0.float())


def test_dpm_solver_is_exact_for_a_straight_flow():
    # For x_sigma = sigma * n + (1 - sigma) * x0 with a perfect model, every solver lands on x0 exactly.
    g = torch.Generator().manual_seed(9)
    x0, n = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sigmas = sde.sigma_schedule(6, shift=3.0).tolist()
    x, prev = sigmas[1] * n + (1 - sigmas[1]) * x0, None
    for i in range(1, 6):
        kw = {} if prev is None else {"prev_x0_pred": x0, "prev_sigma": prev}
        x = sde.dpm_solver_2m_step(x, x0, sigmas[i], sigmas[i + 1], **kw)
        prev = sigmas[i]
        torch.testing.assert_close(x, sigmas[i + 1] * n + (1 - sigmas[i + 1]) * x0, rtol=1e-5, atol=1e-5)


def test_gaussian_log_prob_helper_against_normal():
    x, mean, _ = _xv(10)
    std = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1, 1, 1)
    ref = torch.distributions.Normal(mean, std).log_prob(x).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(sde.gaussian_log_prob(x, mean, std), ref)


def test_eta_zero_log_prob_is_zero_not_nan():
    x, v, eps = _xv(11)
    _, logp, _, std = sde.flow_sde_step(x, v, 0.7, 0.5, 0.0, noise=eps)
    assert torch.equal(logp, torch.zeros(3)) and std.abs().max() == 0
