"""Specification tests for the clipped surrogate and the KL term (docs/method.md §8), against scalar formulas
and ``torch.distributions``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from branchgrpo.loss import clipped_surrogate, gaussian_kl_same_std

# Ratios chosen away from the clip boundaries 1 ± ε by ≥ 1e-4 relative, so float64 rounding of
# exp(log ρ) (~1e-16) can never move a point across a boundary.
RATIOS = [0.3, 0.8, 0.9985, 0.9995, 1.0, 1.0004, 1.0008, 1.0015, 1.2, 3.0]
ADVANTAGES = [-5.0, -1.3, -0.2, 0.0, 0.2, 1.3, 5.0]
EPSILONS = [1e-3, 0.1]


def scalar_loss(rho: float, adv: float, eps: float) -> float:
    """docs/method.md §8 for one edge: max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))."""
    clipped = min(max(rho, 1.0 - eps), 1.0 + eps)
    return max(-adv * rho, -adv * clipped)


def scalar_is_clipped(rho: float, adv: float, eps: float) -> bool:
    """The clipped term is the active one (and flat): A > 0 with ρ > 1 + ε, or A < 0 with ρ < 1 − ε."""
    return (adv > 0 and rho > 1 + eps) or (adv < 0 and rho < 1 - eps)


def grid(eps):
    pairs = list(itertools.product(RATIOS, ADVANTAGES))
    rho = torch.tensor([r for r, _ in pairs], dtype=torch.float64)
    adv = torch.tensor([a for _, a in pairs], dtype=torch.float64)
    lp_old = torch.linspace(-3.0, 2.0, len(pairs), dtype=torch.float64)
    lp_new = (lp_old + torch.log(rho)).requires_grad_(True)
    return pairs, lp_new, lp_old, adv


@pytest.mark.parametrize("eps", EPSILONS)
def test_clipped_surrogate_matches_scalar_formula(eps):
    pairs, lp_new, lp_old, adv = grid(eps)
    loss, ratio, clipped = clipped_surrogate(lp_new, lp_old, adv, eps)
    expected = torch.tensor([scalar_loss(r, a, eps) for r, a in pairs], dtype=torch.float64)
    # float64 exp/log round trip: ~1e-16 relative on ρ, times |A| ≤ 5
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-13)
    want_ratio = torch.tensor([r for r, _ in pairs], dtype=torch.float64)
    torch.testing.assert_close(ratio.detach(), want_ratio, rtol=1e-14, atol=0)
    assert clipped.tolist() == [scalar_is_clipped(r, a, eps) for r, a in pairs]
    # the grid really exercises clipping on both sides and the unclipped branch
    assert any(a > 0 and r > 1 + eps for r, a in pairs if scalar_is_clipped(r, a, eps))
    assert any(a < 0 and r < 1 - eps for r, a in pairs if scalar_is_clipped(r, a, eps))
    assert any(not scalar_is_clipped(r, a, eps) and a != 0 for r, a in pairs)


@pytest.mark.parametrize("eps", EPSILONS)
def test_clipped_surrogate_gradient(eps):
    pairs, lp_new, lp_old, adv = grid(eps)
    loss, _, _ = clipped_surrogate(lp_new, lp_old, adv, eps)
    loss.sum().backward()
    grad = lp_new.grad
    for k, (r, a) in enumerate(pairs):
        if scalar_is_clipped(r, a, eps) or a == 0:
            assert grad[k].item() == 0.0, f"ρ={r}, A={a}: clipped edges carry exactly no gradient"
        else:
            # d/dlp_new of −A·exp(lp_new − lp_old) = −A·ρ
            assert grad[k].item() == pytest.approx(-a * r, rel=1e-12)
            assert grad[k].item() != 0.0


def test_clipped_surrogate_is_pessimistic_bound():
    """L ≥ −A·ρ and L ≥ −A·clip(ρ) everywhere (PPO's pessimistic max)."""
    gen = torch.Generator().manual_seed(0)
    lp_old = torch.randn(500, generator=gen, dtype=torch.float64)
    lp_new = lp_old + 0.05 * torch.randn(500, generator=gen, dtype=torch.float64)
    adv = torch.randn(500, generator=gen, dtype=torch.float64)
    eps = 0.02
    loss, ratio, _ = clipped_surrogate(lp_new, lp_old, adv, eps)
    assert (loss >= -adv * ratio - 1e-15).all()
    assert (loss >= -adv * ratio.clamp(1 - eps, 1 + eps) - 1e-15).all()
    expected = torch.tensor([scalar_loss(float(r), float(a), eps) for r, a in zip(ratio, adv)], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape", [(6, 8), (5, 4, 3, 2)])
def test_gaussian_kl_same_std_matches_torch_distributions(shape):
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(shape, generator=gen, dtype=torch.float64)
    ref = mean + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    std = 0.05 + torch.rand(shape[0], generator=gen, dtype=torch.float64)
    std_b = std.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
    normal = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(normal(mean, std_b), normal(ref, std_b))
    dims = math.prod(shape[1:])
    per_row_sum = kl.reshape(shape[0], -1).sum(dim=1)
    # the implementation computes in float32: relative error ~1e-7; 1e-5 relative tolerance
    kl_sum = gaussian_kl_same_std(mean, ref, std, "sum").double()
    kl_mean = gaussian_kl_same_std(mean, ref, std, "mean").double()
    torch.testing.assert_close(kl_sum, per_row_sum, rtol=1e-5, atol=0)
    torch.testing.assert_close(kl_mean, per_row_sum / dims, rtol=1e-5, atol=0)
    # a scalar std means the same std for every row
    kl_scalar = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.full(shape, 0.2, dtype=torch.float64)),
        torch.distributions.Normal(ref, torch.full(shape, 0.2, dtype=torch.float64)),
    ).reshape(shape[0], -1)
    kl_scalar_std = gaussian_kl_same_std(mean, ref, 0.2, "mean").double()
    torch.testing.assert_close(kl_scalar_std, kl_scalar.mean(dim=1), rtol=1e-5, atol=0)


def test_gaussian_kl_is_zero_for_identical_means_and_has_closed_form_gradient():
    gen = torch.Generator().manual_seed(2)
    mean = torch.randn(4, 6, generator=gen).requires_grad_(True)
    ref = torch.randn(4, 6, generator=gen)
    std = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert gaussian_kl_same_std(mean.detach(), mean.detach(), std).eq(0).all()
    gaussian_kl_same_std(mean, ref, std, "mean").sum().backward()
    # ∂/∂μ of mean_j (μ_j − μ_ref,j)²/(2s²) = (μ − μ_ref)/(s²·D)
    expected = (mean.detach() - ref) / (std[:, None] ** 2 * 6)
    torch.testing.assert_close(mean.grad, expected, rtol=1e-5, atol=1e-6)
