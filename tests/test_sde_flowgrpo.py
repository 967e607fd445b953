"""Flow-GRPO's SDE transition (branchgrpo.sde_flowgrpo) against its source formulas, the exact
marginals of a Gaussian data distribution, and the on-policy ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from branchgrpo.loss import gaussian_kl_same_std
from branchgrpo.sde import gaussian_log_prob, sigma_schedule, transition_mean
from branchgrpo.sde_flowgrpo import flowgrpo_kl, flowgrpo_std_dev, transition_mean_flowgrpo
from branchgrpo.transitions import get_transition

A = 0.7  # Flow-GRPO's SD3.5 noise level

# Data x0 ~ N(M, S²) per coordinate; x_σ = (1 − σ)·x0 + σ·ε is Gaussian with the moments below and
# the exact velocity E[ε − x0 | x_σ = x] is affine in x.
M, S = 0.3, 0.5


def marginal_mean(sigma):
    return (1 - sigma) * M


def marginal_var(sigma):
    return (1 - sigma) ** 2 * S * S + sigma * sigma


def exact_velocity(x, sigma):
    return (sigma - (1 - sigma) * S * S) / marginal_var(sigma) * (x - marginal_mean(sigma)) - M


def flow_grpo_reference(model_output, sample, sigmas, step_index, noise_level, prev_sample):
    """A literal transcription of Flow-GRPO's ``sde_step_with_logprob`` (sde_type='sde') with the
    scheduler's σ table ``sigmas`` and per-row step indices (flow_grpo/diffusers_patch/
    sd3_sde_with_logprob.py, yifan123/flow_grpo@54809b5f)."""
    model_output, sample, prev_sample = model_output.float(), sample.float(), prev_sample.float()
    sigma = sigmas[step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = sigmas[step_index + 1].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = sample * (1 + std_dev_t**2 / (2 * sigma) * dt) + model_output * (
        1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)
    ) * dt
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample_mean, std_dev_t, torch.sqrt(-dt), log_prob


def test_matches_flow_grpo_source_formulas_on_a_mixed_batch():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)  # Flow-GRPO's SD3 sampling schedule (diffusers' default)
    sigmas = scheduler.sigmas
    gen = torch.Generator().manual_seed(0)
    steps = torch.tensor([0, 1, 4, 8, 9, 0])  # includes σ = 1 (the guarded case) and the last step
    x = torch.randn(6, 4, 8, 8, generator=gen)
    v = torch.randn(6, 4, 8, 8, generator=gen)
    mean, std, x0 = transition_mean_flowgrpo(x, v, sigmas[steps], sigmas[steps + 1], A)
    child = mean + std.view(-1, 1, 1, 1) * torch.randn(6, 4, 8, 8, generator=gen)
    ref_mean, ref_std_dev, ref_sqrt_dt, ref_lp = flow_grpo_reference(v, x, sigmas, steps, A, child)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, (ref_std_dev * ref_sqrt_dt).flatten(), rtol=1e-6, atol=0)
    torch.testing.assert_close(gaussian_log_prob(child, mean, std, "mean"), ref_lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x0, x - sigmas[steps].view(-1, 1, 1, 1) * v)
    # the σ = 1 guard: sqrt(1 / (1 − σ_1)) · a at step 0, whatever the row's neighbours
    assert std[0] == pytest.approx(A * math.sqrt(1 / (1 - float(sigmas[1]))) * math.sqrt(1 - float(sigmas[1])))
    assert torch.isfinite(std).all() and (std > 0).all()


def test_same_contract_as_transition_mean():
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    v = torch.randn_like(x)
    sigma, sigma_next = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2]), torch.tensor([0.8, 0.6, 0.4, 0.2, 0.0])
    ours = transition_mean_flowgrpo(x, v, sigma, sigma_next, A)
    spec = transition_mean(x, v, sigma, sigma_next, 0.3)
    for a, b in zip(ours, spec):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    # scalar σ gives a scalar std, like transition_mean
    _, std, _ = transition_mean_flowgrpo(x, v, 0.5, 0.4, A)
    assert std.ndim == 0
    # ODE rows: the Euler mean, as transition_mean
    mask = torch.tensor([True, False, True, False, True])
    mixed, _, _ = transition_mean_flowgrpo(x, v, sigma, sigma_next, A, sde=mask)
    ode, _, _ = transition_mean(x, v, sigma, sigma_next, 0.3, sde=False)
    torch.testing.assert_close(mixed[~mask], ode[~mask])
    torch.testing.assert_close(mixed[mask], ours[0][mask])
    assert get_transition("flowgrpo") is transition_mean_flowgrpo and get_transition("flowsde") is transition_mean
    with pytest.raises(ValueError, match="flowgrpo"):
        get_transition("ddim")


def _one_step_moments(transition, sigma: float, sigma_next: float, eta: float, correct_drift=True):
    """Exact output mean/var of one step from the exact marginal at σ (the mean is affine in x)."""
    xs = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    mean, std, _ = transition(xs, exact_velocity(xs, sigma), torch.full((2,), sigma), torch.full((2,), sigma_next), eta)
    slope, offset = float(mean[1, 0] - mean[0, 0]), float(mean[0, 0])
    out_mean = slope * marginal_mean(sigma) + offset
    out_var = slope**2 * marginal_var(sigma) + float(std[0]) ** 2
    return out_mean, out_var


@pytest.mark.parametrize("sigma", [0.9, 0.6, 0.3])
def test_one_step_marginal_error_is_second_order_like_the_ode(sigma):
    """Euler–Maruyama of the marginal-preserving SDE: local error O(dt²), as the ODE's Euler step."""
    errors = []
    for dt in (0.02, 0.01, 0.005):
        mean, var = _one_step_moments(transition_mean_flowgrpo, sigma, sigma - dt, A)
        errors.append((abs(mean - marginal_mean(sigma - dt)), abs(var - marginal_var(sigma - dt))))
    for (_, coarse), (_, fine) in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 5.0  # halving dt quarters the error
    assert max(e[0] for e in errors) < 1e-6  # the mean is exact here


def test_sde_step_samples_match_the_exact_marginal_at_sigma_next():
    """Monte Carlo: x ~ exact marginal at σ, one SDE step with the exact velocity → moments of
    the exact marginal at σ_next, within 4 standard errors of the sample size; dropping the
    drift correction (Euler mean + the same noise) is off by ~7 standard errors."""
    sigma, sigma_next = 0.6, 0.595
    n_rows, dims = 1024, 1024
    gen = torch.Generator().manual_seed(3)
    x = marginal_mean(sigma) + math.sqrt(marginal_var(sigma)) * torch.randn(n_rows, dims, generator=gen)
    v = exact_velocity(x, sigma)
    mean, std, _ = transition_mean_flowgrpo(x, v, torch.full((n_rows,), sigma), torch.full((n_rows,), sigma_next), A)
    xi = torch.randn(n_rows, dims, generator=gen)
    sample = (mean + std.view(-1, 1) * xi).double()
    n = sample.numel()
    target_mean, target_var = marginal_mean(sigma_next), marginal_var(sigma_next)
    se_mean, se_var = math.sqrt(target_var / n), target_var * math.sqrt(2.0 / (n - 1))
    emp_mean, emp_var = float(sample.mean()), float(sample.var())
    print(f"mean {emp_mean:.5f} vs {target_mean:.5f} (se {se_mean:.1e}); var {emp_var:.5f} vs {target_var:.5f} "
          f"(se {se_var:.1e})")
    assert abs(emp_mean - target_mean) < 4 * se_mean
    assert abs(emp_var - target_var) < 4 * se_var
    _, analytic_var = _one_step_moments(transition_mean_flowgrpo, sigma, sigma_next, A)
    assert abs(analytic_var - target_var) < 0.1 * se_var  # the discretisation bias is far below the noise
    # power: the uncorrected step (no drift correction) misses the marginal by std² ≈ a²σ/(1−σ)·dt
    naive = (x + (sigma_next - sigma) * v + std.view(-1, 1) * xi).double()
    assert abs(float(naive.var()) - target_var) > 6 * se_var


def test_on_policy_ratio_is_one_and_log_prob_is_exact():
    gen = torch.Generator().manual_seed(4)
    sigmas = sigma_schedule(10, 3.0).float()
    steps = torch.arange(10)
    x = torch.randn(10, 4, 8, 8, generator=gen)
    v = torch.randn(10, 4, 8, 8, generator=gen)
    mean, std, _ = transition_mean_flowgrpo(x, v, sigmas[steps], sigmas[steps + 1], A)
    child = mean + std.view(-1, 1, 1, 1) * torch.randn(10, 4, 8, 8, generator=gen)
    for reduction in ("mean", "sum"):
        lp_old = gaussian_log_prob(child, mean, std, reduction)
        # re-evaluate the same child under the same (x, v): row by row, in another batch layout
        lp_new = torch.cat([
            gaussian_log_prob(child[i : i + 1], *transition_mean_flowgrpo(
                x[i : i + 1], v[i : i + 1], sigmas[i : i + 1], sigmas[i + 1 : i + 2], A)[:2], reduction)
            for i in range(10)
        ])
        ratio = torch.exp(lp_new - lp_old)
        assert torch.equal(ratio, torch.ones_like(ratio)), ratio
    # and the log-prob is the Gaussian density of the drawn noise
    xi = (child - mean) / std.view(-1, 1, 1, 1)
    expected = (-0.5 * xi**2 - torch.log(std).view(-1, 1, 1, 1) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(child, mean, std), expected, rtol=1e-6, atol=1e-5)
    # a changed policy moves the ratio
    moved, _, _ = transition_mean_flowgrpo(x, v + 0.01, sigmas[steps], sigmas[steps + 1], A)
    assert not torch.allclose(gaussian_log_prob(child, moved, std), gaussian_log_prob(child, mean, std))


def test_flowgrpo_kl_is_the_true_kl_times_the_step():
    gen = torch.Generator().manual_seed(5)
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.9, 0.6, 0.0])
    x = torch.randn(3, 4, 4, 4, generator=gen)
    mean, std, _ = transition_mean_flowgrpo(x, torch.randn_like(x), sigma, sigma_next, A)
    ref_mean, _, _ = transition_mean_flowgrpo(x, torch.randn_like(x), sigma, sigma_next, A)
    ours = flowgrpo_kl(mean, ref_mean, sigma, sigma_next, A)
    true = gaussian_kl_same_std(mean, ref_mean, std)
    torch.testing.assert_close(ours, true * (sigma - sigma_next), rtol=1e-5, atol=0)
    # Flow-GRPO's own expression with its std_dev_t (no sqrt(-dt))
    coeff = flowgrpo_std_dev(sigma, sigma_next, A).view(-1, 1, 1, 1)
    literal = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * coeff**2)
    torch.testing.assert_close(ours, literal.flatten(), rtol=1e-6, atol=0)


def test_noise_level_grows_with_sigma_as_flow_grpo():
    sigmas = torch.tensor(np.linspace(0.9, 0.1, 9), dtype=torch.float32)
    coeff = flowgrpo_std_dev(sigmas, sigmas - 0.05, A)
    assert torch.all(coeff[:-1] > coeff[1:])  # a·sqrt(σ/(1−σ)) decreases toward the data end
    torch.testing.assert_close(coeff, A * torch.sqrt(sigmas / (1 - sigmas)))
