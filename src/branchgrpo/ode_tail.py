"""The ODE tail: the deterministic steps after a rollout's last stochastic step, integrated in
fewer model calls (docs/beyond-the-paper.md §7).

After the last SDE step (the end of the Mix window, or the last split) every leaf follows its own
ODE chain to σ = 0. No edge of that chain is trained and no log-prob is read from it; only its
end, the sample that is decoded and scored, matters. So the chain may be integrated on a coarser
σ grid with a second-order solver, as MixGRPO-Flash does after its window (Li et al. 2025,
arXiv:2507.21802: DPM-Solver++ on the post-window ODE steps). Held-out evaluation never uses it.

Pure tensor functions; the rollout (:mod:`branchgrpo.tree.rollout`) calls them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from branchgrpo.sde import sigma_schedule


def tail_calls(tail_steps: int, keep: float) -> int:
    """Model calls for ``tail_steps`` ODE steps kept at fraction ``keep``: ``round(n·keep)``, at least 1."""
    return max(1, min(tail_steps, math.floor(tail_steps * keep + 0.5)))


def tail_sigmas(steps: int, shift: float, first: int, calls: int) -> Tensor:
    """The σ grid of a tail that starts at step ``first`` of a ``steps``-step schedule and reaches
    0 in ``calls`` steps: uniform in the unshifted time from step ``first``'s to 0, then shifted
    as the schedule is (:func:`branchgrpo.sde.sigma_schedule`). Float64 ``[calls + 1]``; its first
    value is the schedule's ``σ_first`` exactly, and with ``calls = steps − first`` it is the
    schedule's own tail."""
    full = sigma_schedule(steps, shift)
    if not 0 <= first < steps:
        raise ValueError(f"the tail's first step must be in 0..{steps - 1}, got {first}")
    if calls < 1:
        raise ValueError(f"a tail needs at least one model call, got {calls}")
    if calls == steps - first:
        return full[first:].clone()
    u_first = float(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[first])
    u = torch.linspace(u_first, 0.0, calls + 1, dtype=torch.float64)
    sigmas = shift * u / (1.0 + (shift - 1.0) * u)
    sigmas[0] = full[first]
    return sigmas


def _lambda(sigma: float) -> float:
    """Half log-SNR ``log(α/σ)`` of a flow-matching state, ``α = 1 − σ``."""
    return math.log(1.0 - sigma) - math.log(sigma)


def dpm_solver_pp_step(
    x: Tensor, x0: Tensor, sigma: float, sigma_next: float, previous: tuple[Tensor, float] | None = None
) -> Tensor:
    """One DPM-Solver++ step ``σ → σ_next`` of a flow-matching ODE (``x_σ = (1 − σ)·x̂0 + σ·ε``) from
    the data prediction ``x0`` at ``x`` (Lu et al. 2022, arXiv:2211.01095, Alg. 2; the midpoint form).

    Without ``previous`` (the data prediction and σ of the step before) or when ``σ_next = 0`` the
    step is first order, which for this parametrisation is exactly the Euler step
    ``x + (σ_next − σ)·v``; with it, the two-step multistep correction is added. As diffusers'
    ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_order=2``,
    ``solver_type="midpoint"`` and flow sigmas (first order on the first and the final step).
    """
    if not 0.0 <= sigma_next < sigma <= 1.0:
        raise ValueError(f"a step needs 0 <= sigma_next < sigma <= 1, got {sigma} -> {sigma_next}")
    if sigma_next == 0.0:
        return x0.clone()
    alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
    # α_next·(1 − e^{−h}) with e^{−h} = (α·σ_next)/(σ·α_next): finite at σ = 1 (α = 0)
    c = alpha_next - alpha * sigma_next / sigma
    out = (sigma_next / sigma) * x + c * x0
    if previous is None or sigma >= 1.0:
        return out
    x0_previous, sigma_previous = previous
    if not sigma < sigma_previous < 1.0:
        raise ValueError(f"the previous step's sigma must lie in ({sigma}, 1), got {sigma_previous}")
    h = _lambda(sigma_next) - _lambda(sigma)
    r0 = (_lambda(sigma) - _lambda(sigma_previous)) / h
    d1 = (x0 - x0_previous) / r0
    return out + 0.5 * c * d1


__all__ = ["tail_calls", "tail_sigmas", "dpm_solver_pp_step"]
