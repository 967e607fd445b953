"""Noise schedule, one SDE/ODE transition and its Gaussian log-prob (docs/method.md §2–3).

Pure tensor functions: no model, no I/O. Every function accepts per-row noise levels so that one
training micro-batch may mix edges of different steps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum"]
STD_FLOOR = 1e-8  # docs/method.md §3: guard s_i >= 1e-8
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def sigma_schedule(steps: int, shift: float) -> Tensor:
    """Shifted σ schedule ``σ_i = shift·u / (1 + (shift − 1)·u)``, ``u = linspace(1, 0, T+1)``.

    Returns a float64 tensor ``[steps + 1]`` going from 1 to 0 (docs/method.md §2).
    """
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * u / (1.0 + (shift - 1.0) * u)


def per_row(value: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or a ``[N]`` tensor against ``like: [N, ...]`` (float32)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def select_rows(mask: bool | Tensor, if_true: Tensor, if_false: Tensor) -> Tensor:
    """Per-row choice between two ``[N, ...]`` tensors; ``mask`` is a scalar or ``[N]`` bool."""
    flag = torch.as_tensor(mask, device=if_true.device)
    if flag.ndim == 0:
        return if_true if bool(flag) else if_false
    return torch.where(flag.reshape(-1, *([1] * (if_true.ndim - 1))), if_true, if_false)


def reduce_rows(elementwise: Tensor, reduction: Reduction) -> Tensor:
    """``[N, ...]`` → ``[N]`` by ``mean`` or ``sum`` over all but the first dim."""
    flat = elementwise.reshape(elementwise.shape[0], -1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if reduction == "sum":
        return flat.sum(dim=1)
    raise ValueError(f"log-prob reduction must be 'mean' or 'sum', got {reduction!r}")


def transition_mean(
    latents: Tensor,
    velocity: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    eta: float,
    sde: bool | Tensor = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and std of one step ``σ → σ_next`` and the clean-sample prediction (docs/method.md §3).

    Args:
        latents: ``x`` ``[N, ...]``; velocity: ``v = vθ(x, σ, c)`` ``[N, ...]``.
        sigma, sigma_next: scalars or ``[N]``; ``sigma > sigma_next``.
        eta: the SDE noise level η; sde: whether the step is stochastic (scalar or ``[N]`` bool).
    Returns:
        ``(mean [N, ...], std [N] or scalar, x0_pred [N, ...])`` in float32. For ODE rows the
        mean is the Euler step and the std is the floor (the std of an ODE row is never used).
    """
    x = latents.float()
    v = velocity.float()
    s = per_row(sigma, x)
    s_next = per_row(sigma_next, x)
    delta = s - s_next
    x0_pred = x - s * v
    mean_ode = x - delta * v
    score = -(x - (1.0 - s) * x0_pred) / (s * s)
    mean_sde = mean_ode + 0.5 * eta * eta * score * delta
    std = (eta * delta.sqrt()).clamp_min(STD_FLOOR).reshape(delta.shape[:1])
    return select_rows(sde, mean_sde, mean_ode), std, x0_pred


def gaussian_log_prob(
    sample: Tensor, mean: Tensor, std: Tensor | float, reduction: Reduction = "mean"
) -> Tensor:
    """Log-density of ``sample`` under ``N(mean, std² I)``, reduced over all but the first dim.

    ``std`` is a scalar or ``[N]``. Computed in float32 (docs/method.md §3). Returns ``[N]``.
    """
    x = sample.float()
    mu = mean.float()
    sd = per_row(std, x)
    elementwise = -((x - mu) ** 2) / (2.0 * sd * sd) - sd.log() - _HALF_LOG_2PI
    return reduce_rows(elementwise, reduction)


def correlated_split_noise(
    base: Tensor, independent: Tensor, split_noise_scale: float
) -> Tensor:
    """Marginal-preserving sibling noise ``ξ_b = (ξ_0 + s·ζ_b)/√(1 + s²)`` (docs/method.md §4, Lemma 1–2).

    Args:
        base: ``ξ_0`` repeated for every child ``[N_children, ...]``.
        independent: ``ζ_b`` ``[N_children, ...]``; split_noise_scale: ``s ≥ 0``.
    Every ``ξ_b`` is ``N(0, I)``; siblings have correlation ``1/(1 + s²)``.
    """
    s = float(split_noise_scale)
    return (base + s * independent) / math.sqrt(1.0 + s * s)
