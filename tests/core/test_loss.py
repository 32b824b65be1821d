"""Clipped surrogate and KL on hand-computed cases."""

import math

import pytest
import torch

from mixgrpo.algo.loss import clipped_surrogate_loss, kl_to_reference


def test_on_policy_loss_is_minus_mean_advantage_with_policy_gradient():
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, info = clipped_surrogate_loss(logp, logp.detach().clone(), adv, 1e-4)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert info["ratio/mean"].item() == 1.0 and info["clip_fraction"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 3)  # d(-A r)/dlogp = -A r, r = 1


def test_clipping_hand_computed():
    eps = 0.1
    old = torch.zeros(4)
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, +1, -1
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, info = clipped_surrogate_loss(logp, old, adv, eps)
    # per-sample max(-A r, -A clip(r)): -1.1 (clipped), 1.5 (unclipped), -0.5 (unclipped), 0.9 (clipped)
    assert loss.item() == pytest.approx((-1.1 + 1.5 - 0.5 + 0.9) / 4)
    assert info["clip_fraction"].item() == 1.0
    assert info["ratio/min"].item() == pytest.approx(0.5) and info["ratio/max"].item() == pytest.approx(1.5)
    loss.backward()
    # clipped branches get no gradient; unclipped ones get -A r / B
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1.5 / 4, -0.5 / 4, 0.0]))


def test_asymmetric_clip_high():
    logp = torch.log(torch.tensor([1.5])).requires_grad_(True)
    loss, _ = clipped_surrogate_loss(logp, torch.zeros(1), torch.ones(1), 0.1, clip_range_high=0.3)
    assert loss.item() == pytest.approx(-1.3)


def test_log_ratio_clamp_keeps_gradients_finite():
    logp = torch.tensor([200.0, 0.0], requires_grad=True)  # exp(200) overflows fp32
    loss, info = clipped_surrogate_loss(logp, torch.zeros(2), torch.tensor([-1.0, 1.0]), 1e-4, max_log_ratio=10.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert info["ratio/max"].item() == pytest.approx(math.exp(10.0), rel=1e-5)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="must all be"):
        clipped_surrogate_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), 1e-4)
    with pytest.raises(ValueError, match="clip ranges"):
        clipped_surrogate_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0)


def test_kl_to_reference_formula_and_gradient():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    std = torch.tensor([[0.5], [2.0]])
    kl = kl_to_reference(mean, ref, std)
    # sample 0: mean(1, 4) / (2 * 0.25) = 5; sample 1: mean(1, 9) / (2 * 4) = 0.625
    torch.testing.assert_close(kl, torch.tensor([5.0, 0.625]))
    kl.sum().backward()
    # d/dmean = (mean - ref) / (num_elements * std^2)
    torch.testing.assert_close(mean.grad, torch.tensor([[2.0, 4.0], [-0.125, -0.375]]))
    assert torch.equal(kl_to_reference(ref, ref, 1.0), torch.zeros(2))
