"""Intra-group diversity bonus (docs/beyond-the-paper.md §5; an option beyond the paper).

GRPO rewards each sample on its own, so once a prompt's samples agree on one high-reward image
nothing pushes them apart again: reward is bought with diversity. Adding to each leaf's reward a
term that grows with its distance from the other leaves of its prompt tree makes "different from
its siblings" part of what is reinforced, in the spirit of DiverseGRPO's distributional bonus
(Liu et al., 2025, arXiv:2512.21514) and DRIFT's intra-group diversity shaping (Liu et al., 2026,
arXiv:2601.12401); both use semantic features, this one the model's own final latents (every
family has them, no decoding or extra network, so the evaluation's diversity features stay an
independent measurement).

For leaf ``i`` of group ``g`` (the ``n_g`` leaves of one prompt), with ``x_i`` its final latent:

    d_i = (1 / (n_g − 1)) Σ_{j ∈ g, j ≠ i} rms(x_i − x_j)        rms(v) = sqrt(mean(v²))
    bonus_i = λ · d_i / mean_{j ∈ g} d_j

so a group's bonuses average λ whatever the latents' scale, and what reaches the advantages (which
are normalised per group) is the within-group spread of ``d`` relative to the reward's, weighted by
λ in the reward's units. A group of one leaf, or whose leaves are identical, gets 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from branchgrpo.diversity import pairwise_distances


def group_diversity_bonus(leaves: Tensor, group: Tensor, weight: float) -> Tensor:
    """``bonus [N]`` (float64, on ``leaves``' device) for final latents ``leaves [N, ...]`` of prompt groups ``group [N]``."""
    if leaves.shape[0] != group.numel():
        raise ValueError(f"leaves [{leaves.shape[0]}, ...] and group [{group.numel()}] must have one entry per leaf")
    bonus = torch.zeros(leaves.shape[0], dtype=torch.float64, device=leaves.device)
    if weight == 0 or leaves.shape[0] == 0:
        return bonus
    group = group.to(leaves.device)
    for g in torch.unique(group).tolist():  # a few prompt groups per iteration; no model call inside
        members = (group == g).nonzero().flatten()
        if members.numel() < 2:
            continue
        mean_to_others = pairwise_distances(leaves[members], rms=True).sum(dim=1) / (members.numel() - 1)
        scale = mean_to_others.mean()
        if scale > 0:
            bonus[members] = weight * mean_to_others / scale
    return bonus
