"""Clipped GRPO surrogate and the optional KL-to-reference term (docs/method.md §8). Pure functions."""

from __future__ import annotations

import torch
from torch import Tensor

from branchgrpo.sde import Reduction, per_row, reduce_rows


def clipped_surrogate(
    lp_new: Tensor, lp_old: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-edge ``L_e = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))`` with ``ρ = exp(lp_new − lp_old)``.

    All ``[E]``. Returns ``(loss [E], ratio [E], clipped [E] bool)``; ``clipped`` marks edges whose
    clipped term is the active (larger) one, i.e. that carry no gradient.
    """
    ratio = torch.exp(lp_new - lp_old)
    unclipped = -advantages * ratio
    clipped_term = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped_term)
    return loss, ratio, clipped_term > unclipped


def gaussian_kl_same_std(mean: Tensor, ref_mean: Tensor, std: Tensor | float, reduction: Reduction = "mean") -> Tensor:
    """``KL(N(μ, s²I) ‖ N(μ_ref, s²I)) = ‖μ − μ_ref‖² / (2 s²)``, reduced like the log-prob.

    The per-element form is reduced by ``mean`` or ``sum`` over all but the first dim (as Flow-GRPO
    does with ``mean``). Returns ``[N]``.
    """
    diff = mean.float() - ref_mean.float()
    sd = per_row(std, diff)
    elementwise = diff * diff / (2.0 * sd * sd)
    return reduce_rows(elementwise, reduction)
