"""The compressed ODE tail's maths (src/branchgrpo/ode_tail.py) against independent computations:
diffusers' DPMSolverMultistepScheduler step by step, the closed-form ODE of Gaussian data (the
solver's order of convergence), the Euler step written out, and the schedule of docs/method.md §2.
"""

from __future__ import annotations

import math

import pytest
import torch

from branchgrpo.ode_tail import dpm_solver_pp_step, tail_calls, tail_sigmas
from branchgrpo.sde import sigma_schedule


def nonlinear_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """An arbitrary smooth field: the solvers must agree on it step for step, not solve it exactly."""
    return torch.sin(3.0 * x) * (1.0 + sigma) + 0.5 * x * sigma * sigma - 0.2


def test_first_order_is_the_euler_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    for sigma, sigma_next in [(1.0, 0.9), (0.8, 0.55), (0.3, 0.01), (0.2, 0.0)]:
        v = nonlinear_velocity(x, sigma)
        euler = x + (sigma_next - sigma) * v
        assert torch.allclose(dpm_solver_pp_step(x, x - sigma * v, sigma, sigma_next), euler, atol=1e-12)


def test_dpm_solver_pp_2m_matches_diffusers_step_by_step():
    """Our tail on its own grid against diffusers' scheduler configured the same way (dpmsolver++,
    order 2, midpoint, flow sigmas, first order on the last step), fed the same grid."""
    from diffusers import DPMSolverMultistepScheduler

    sigmas = tail_sigmas(20, 3.0, 10, 4)
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", use_flow_sigmas=True,
        prediction_type="flow_prediction", flow_shift=3.0, lower_order_final=True, final_sigmas_type="zero",
    )
    scheduler.set_timesteps(4)
    scheduler.sigmas = sigmas.to(torch.float64)
    scheduler.timesteps = (sigmas[:-1] * 1000).to(torch.int64)
    gen = torch.Generator().manual_seed(1)
    x_ours = x_ref = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    previous = None
    for j in range(4):
        sigma, sigma_next = float(sigmas[j]), float(sigmas[j + 1])
        v_ours, v_ref = nonlinear_velocity(x_ours, sigma), nonlinear_velocity(x_ref, sigma)
        x0 = x_ours - sigma * v_ours
        x_ours = dpm_solver_pp_step(x_ours, x0, sigma, sigma_next, previous)
        previous = (x0, sigma)
        x_ref = scheduler.step(v_ref, scheduler.timesteps[j], x_ref).prev_sample
        assert torch.allclose(x_ours, x_ref.double(), atol=5e-6, rtol=0), j
    # the grid is non-trivial: the second-order correction changed the result
    euler = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for j in range(4):
        sigma, sigma_next = float(sigmas[j]), float(sigmas[j + 1])
        euler = euler + (sigma_next - sigma) * nonlinear_velocity(euler, sigma)
    assert (euler - x_ours).abs().max() > 1e-3


def gaussian_ode(mean: float, std: float):
    """Data N(mean, std²) in one dimension: the exact flow-matching velocity and ODE solution.

    ``x_σ = (1 − σ)·x0 + σ·ε`` has variance ``s(σ)² = (1 − σ)²·std² + σ²``; the probability-flow
    ODE keeps ``z = (x − (1 − σ)·mean)/s(σ)`` constant."""

    def scale(sigma: float) -> float:
        return math.sqrt((1.0 - sigma) ** 2 * std**2 + sigma**2)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        ds = ((sigma - 1.0) * std**2 + sigma) / scale(sigma)
        z = (x - (1.0 - sigma) * mean) / scale(sigma)
        return -mean + ds * z

    def solution(x: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
        z = (x - (1.0 - sigma) * mean) / scale(sigma)
        return (1.0 - sigma_to) * mean + scale(sigma_to) * z

    return velocity, solution


@pytest.mark.parametrize("order, expected", [(1, 1.0), (2, 2.0)])
def test_order_of_convergence_on_the_closed_form_ode(order, expected):
    """Error at σ_end against the exact solution, halving the step: ~2× smaller for Euler, ~4× for
    DPM-Solver++(2M). Integrated to σ = 0.05 (not 0, where both end on the exact x̂0 and the last
    step hides the order)."""
    velocity, solution = gaussian_ode(mean=1.5, std=0.4)
    x_start = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)
    sigma_start, sigma_end = 0.9, 0.05

    def integrate(steps: int) -> float:
        grid = torch.linspace(sigma_start, sigma_end, steps + 1, dtype=torch.float64)
        x, previous = x_start.clone(), None
        for j in range(steps):
            sigma, sigma_next = float(grid[j]), float(grid[j + 1])
            x0 = x - sigma * velocity(x, sigma)
            x = dpm_solver_pp_step(x, x0, sigma, sigma_next, previous if order == 2 else None)
            previous = (x0, sigma)
        return float((x - solution(x_start, sigma_start, sigma_end)).abs().max())

    errors = [integrate(n) for n in (16, 32, 64)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(rate - expected) < 0.25 for rate in rates), (errors, rates)


def test_tail_grid_starts_on_the_schedule_and_keeps_its_shift():
    full = sigma_schedule(20, 3.0)
    grid = tail_sigmas(20, 3.0, 10, 4)
    assert grid.shape == (5,) and grid.dtype == torch.float64
    assert grid[0] == full[10] and grid[-1] == 0.0
    assert bool((grid[1:] < grid[:-1]).all())
    # uniform in the unshifted time u = 1 − i/T from u_10 = 0.5 to 0, then shifted: u = 0.375, 0.25, 0.125
    for u, sigma in zip([0.375, 0.25, 0.125], grid[1:4].tolist()):
        assert sigma == pytest.approx(3.0 * u / (1.0 + 2.0 * u), abs=1e-15)
    # keeping every step gives the schedule's own tail, bit for bit
    assert torch.equal(tail_sigmas(20, 3.0, 4, 16), full[4:])


@pytest.mark.parametrize("steps, keep, calls", [(10, 0.4, 4), (16, 0.4, 6), (15, 0.5, 8), (3, 0.1, 1), (7, 1.0, 7)])
def test_tail_calls_round_half_up_and_never_reach_zero(steps, keep, calls):
    assert tail_calls(steps, keep) == calls


def test_bad_steps_are_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        dpm_solver_pp_step(x, x, 0.3, 0.4)
    with pytest.raises(ValueError, match="previous step's sigma"):
        dpm_solver_pp_step(x, x, 0.5, 0.4, previous=(x, 0.45))
    with pytest.raises(ValueError, match="first step"):
        tail_sigmas(20, 3.0, 20, 1)
