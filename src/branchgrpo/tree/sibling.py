"""Sibling-relative advantages (docs/beyond-the-paper.md §1; an option beyond the paper).

At a split edge (the parent has K ≥ 2 children) the child is compared with its siblings only:
``A(c) = (r̄(c) − mean_sib) / (std_sib + 1e-8)`` over the children of the same parent, with the
unbiased (sample, K − 1) std as in depth-wise normalisation (docs/method.md §6). Siblings that tie
(``std_sib < 1e-6``) give ``A = 0``. A chain edge (the parent has one child) inherits the advantage
of the nearest split edge above it: its node's fused reward equals that split child's fused reward
(fusion over one child is the identity), so it carries the same sibling comparison. A chain edge
with no split above it (before the first split) keeps its depth-wise z-score (paper Eq. 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from branchgrpo.tree.advantages import _scatter_sum, depth_advantages


def sibling_advantages(
    fused: list[Tensor], parent: list[Tensor], group: list[Tensor], num_groups: int, std_floor: float = 0.0
) -> list[Tensor]:
    """Per-node advantages in ``sibling`` mode; ``fused[d]: [N_d]``, ``parent[d]: [N_d]``. float32 per depth.

    ``std_floor`` raises small sibling stds to the floor (as in depth-wise mode). Depth 0 (roots,
    no edge) keeps its depth-wise z-score.
    """
    depthwise = depth_advantages(fused, group, num_groups, std_floor)
    out = [depthwise[0]]
    split_above = torch.zeros(fused[0].numel(), dtype=torch.bool, device=fused[0].device)
    for d in range(1, len(fused)):
        reward = fused[d]
        index = parent[d].to(reward.device)
        size = fused[d - 1].numel()
        count = _scatter_sum(torch.ones_like(reward), index, size)
        mean = _scatter_sum(reward, index, size) / count.clamp_min(1)
        centred = reward - mean[index]
        std = (_scatter_sum(centred * centred, index, size) / (count - 1).clamp_min(1)).sqrt()
        tied = std < 1e-6
        if std_floor > 0:
            std = std.clamp_min(std_floor)
        sibling = torch.where(tied[index], torch.zeros_like(centred), centred / (std[index] + 1e-8)).float()
        is_split = count[index] > 1
        inherited = torch.where(split_above[index], out[d - 1][index], depthwise[d])
        out.append(torch.where(is_split, sibling, inherited))
        split_above = is_split | split_above[index]
    return out
