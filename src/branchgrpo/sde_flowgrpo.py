"""Flow-GRPO's SDE transition: a σ-dependent noise level (an alternative to docs/method.md §3's ``η·√Δ``).

Source: Flow-GRPO, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``, function
``sde_step_with_logprob`` (github.com/yifan123/flow_grpo, commit 54809b5f), ``sde_type == 'sde'``.
With ``σ`` the current and ``σ'`` the next noise level, ``dt = σ' − σ < 0``, velocity ``v`` and
noise level ``a`` (``noise_level``, 0.7 for SD3.5):

    std_dev_t        = sqrt(σ / (1 − (σ == 1 ? sigma_max : σ))) · a      # sigma_max = scheduler.sigmas[1]
    prev_sample_mean = x·(1 + std_dev_t²/(2σ)·dt) + v·(1 + std_dev_t²·(1 − σ)/(2σ))·dt
    prev_sample      = prev_sample_mean + std_dev_t·sqrt(−dt)·ε
    log_prob         = Gaussian log-density with std std_dev_t·sqrt(−dt), mean over all but the batch dim

i.e. the reverse SDE ``dx = [v + std²/(2σ)·(x + (1 − σ)·v)]·dt + std·dW`` of the flow
``x_σ = (1 − σ)·x0 + σ·ε`` (the drift correction is ``−½·std²·score``), Euler–Maruyama
discretised. Its one-step marginals match the ODE's up to the discretisation error (see
``tests/test_sde_flowgrpo.py``). The σ = 1 guard: Flow-GRPO divides by ``1 − sigmas[1]`` at σ = 1;
in a schedule starting at σ_0 = 1, ``sigmas[1]`` is the next σ of that very step, so here the
guard uses ``σ_next`` (the same number for every schedule that starts at 1).

:func:`transition_mean_flowgrpo` has the signature and returns of
:func:`branchgrpo.sde.transition_mean`, so the engine can switch transitions by name with
:func:`get_transition`. Log-probs use :func:`branchgrpo.sde.gaussian_log_prob` unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from branchgrpo.sde import STD_FLOOR, Reduction, per_row, reduce_rows, select_rows

TransitionName = Literal["flowsde", "flowgrpo"]


def flowgrpo_std_dev(sigma: Tensor, sigma_next: Tensor, noise_level: float) -> Tensor:
    """Flow-GRPO's ``std_dev_t = a·sqrt(σ / (1 − σ))`` with its σ = 1 guard (``1 − σ_next`` there).

    This is the diffusion coefficient of the SDE, *not* the step's std (that is
    ``std_dev_t·sqrt(σ − σ_next)``).
    """
    denominator = 1.0 - torch.where(sigma == 1.0, sigma_next, sigma)
    return torch.sqrt(sigma / denominator) * noise_level


def transition_mean_flowgrpo(
    latents: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: float,
    sde: bool | Tensor = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and std of one Flow-GRPO step ``σ → σ_next`` and the clean-sample prediction.

    Same contract as :func:`branchgrpo.sde.transition_mean`, with ``eta`` read as Flow-GRPO's
    ``noise_level`` ``a``:

    Args:
        latents: ``x`` ``[N, ...]``; velocity: ``v = vθ(x, σ, c)`` ``[N, ...]``.
        sigma, sigma_next: scalars or ``[N]``; ``1 ≥ sigma > sigma_next ≥ 0``.
        eta: the noise level ``a`` (Flow-GRPO: 0.7 for SD3.5); sde: scalar or ``[N]`` bool.
    Returns:
        ``(mean [N, ...], std [N] or scalar, x0_pred [N, ...])`` in float32; ``std =
        a·sqrt(σ/(1−σ))·sqrt(σ − σ_next)``. For ODE rows the mean is the Euler step and the std
        is the floor (never used).
    """
    x = latents.float()
    v = velocity.float()
    s = per_row(sigma, x)
    s_next = per_row(sigma_next, x)
    dt = s_next - s  # < 0, Flow-GRPO's sign convention
    x0_pred = x - s * v
    mean_ode = x + dt * v
    std_dev_t = flowgrpo_std_dev(s, s_next, eta)
    variance = std_dev_t * std_dev_t
    mean_sde = x * (1.0 + variance / (2.0 * s) * dt) + v * (1.0 + variance * (1.0 - s) / (2.0 * s)) * dt
    std = (std_dev_t * torch.sqrt(-dt)).clamp_min(STD_FLOOR).reshape(dt.shape[:1])
    return select_rows(sde, mean_sde, mean_ode), std, x0_pred


def flowgrpo_kl(
    mean: Tensor, ref_mean: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, eta: float,
    reduction: Reduction = "mean",
) -> Tensor:
    """Flow-GRPO's KL loss term, per row ``[N]``, exactly as ``scripts/train_sd3.py`` computes it:

        kl = mean((prev_sample_mean − prev_sample_mean_ref)²) / (2·std_dev_t²)

    with ``std_dev_t`` the SDE coefficient **without** the ``sqrt(−dt)`` factor, so this equals
    the true Gaussian KL (``branchgrpo.loss.gaussian_kl_same_std`` with the step std) times
    ``σ − σ_next``. Use it to reproduce Flow-GRPO's β (0.04) on its own scale.
    """
    diff = mean.float() - ref_mean.float()
    s = per_row(sigma, diff)
    s_next = per_row(sigma_next, diff)
    coeff = flowgrpo_std_dev(s, s_next, eta)
    elementwise = diff * diff / (2.0 * coeff * coeff)
    return reduce_rows(elementwise, reduction)


__all__ = [
    "flowgrpo_kl",
    "flowgrpo_std_dev",
    "transition_mean_flowgrpo",
]
