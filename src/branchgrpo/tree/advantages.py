"""Reward fusion (paper Eq. 3, docs/method.md §5) and depth-wise advantages (paper Eq. 4, docs/method.md §6).

Pure functions over per-depth tensors; one scatter pass per depth, no node objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FusedRewards:
    """Fused reward of every node and the entropy of its leaf weights, per depth."""

    reward: list[Tensor]  # reward[d]: [N_d] r̄(n) = Σ_ℓ softmax_ℓ(β·S(n→ℓ)) r_ℓ
    log_partition: list[Tensor]  # log Σ_ℓ exp(β·S(n→ℓ)) per node
    entropy: list[Tensor]  # entropy (nats) of the leaf weights w(n → ·); 0 at leaves

    def root_entropy_ratio(self) -> float:
        """Mean over roots of entropy / log(#leaves below): 1 = uniform, 0 = one-hot."""
        leaves = self.reward[-1].numel() / max(self.reward[0].numel(), 1)
        if leaves <= 1:
            return 1.0
        return float(self.entropy[0].mean() / torch.log(torch.tensor(leaves, dtype=torch.float64)))


def _scatter_max(values: Tensor, index: Tensor, size: int) -> Tensor:
    out = torch.full((size,), float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, index, values, reduce="amax", include_self=True)


def _scatter_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def fuse_rewards(parent: list[Tensor], logp: list[Tensor], leaf_rewards: Tensor, beta: float) -> FusedRewards:
    """Bottom-up fusion: ``r̄(n) = Σ_{ℓ∈L(n)} softmax_ℓ(β·S(n→ℓ)) r_ℓ`` (docs/method.md §5).

    Uses the exact recursion ``Z(n) = logsumexp_c(β·lp(n→c) + Z(c))``, ``w_c ∝ exp(β·lp + Z(c))``,
    ``r̄(n) = Σ_c w_c r̄(c)``, so path sums are never materialised. Computed in float64.

    Args:
        parent: ``parent[d] [N_d]`` for d = 0..T; logp: edge log-prob into each node (ODE = 0).
        leaf_rewards: ``[N_T]``.
    """
    depth_max = len(parent) - 1
    device = leaf_rewards.device
    reward = leaf_rewards.to(torch.float64)
    log_z = torch.zeros_like(reward)
    entropy = torch.zeros_like(reward)
    rewards, log_zs, entropies = [reward], [log_z], [entropy]
    for d in range(depth_max, 0, -1):
        index = parent[d].to(device)
        size = parent[d - 1].numel()
        score = beta * logp[d].to(device, torch.float64) + log_z
        peak = _scatter_max(score, index, size)
        weight_unnorm = torch.exp(score - peak[index])
        total = _scatter_sum(weight_unnorm, index, size)
        weight = weight_unnorm / total[index]
        new_log_z = peak + torch.log(total)
        # H(n) = −Σ_c w_c log w_c + Σ_c w_c H(c)
        local = -weight * torch.log(weight.clamp_min(1e-300)) + weight * entropy
        entropy = _scatter_sum(local, index, size)
        reward = _scatter_sum(weight * reward, index, size)
        log_z = new_log_z
        rewards.insert(0, reward)
        log_zs.insert(0, log_z)
        entropies.insert(0, entropy)
    return FusedRewards(reward=rewards, log_partition=log_zs, entropy=entropies)


def depth_advantages(
    fused: list[Tensor], group: list[Tensor], num_groups: int, std_floor: float = 0.0
) -> list[Tensor]:
    """Per-group, per-depth z-scores of fused rewards (docs/method.md §6, paper Eq. 4).

    ``A(n) = (r̄(n) − mean_d) / (std_d + 1e-8)`` with the unbiased std over the nodes of the same
    group at depth d; ``A = 0`` where the group has one node at that depth or ``std_d < 1e-6``.
    ``std_floor`` raises small stds to the floor. Groups never mix. Returns float32 per depth.
    """
    out = []
    for reward, grp in zip(fused, group):
        index = grp.to(reward.device)
        count = _scatter_sum(torch.ones_like(reward), index, num_groups)
        mean = _scatter_sum(reward, index, num_groups) / count.clamp_min(1)
        centred = reward - mean[index]
        var = _scatter_sum(centred * centred, index, num_groups) / (count - 1).clamp_min(1)
        std = var.sqrt()
        degenerate = (count <= 1) | (std < 1e-6)
        if std_floor > 0:
            std = std.clamp_min(std_floor)
        adv = centred / (std[index] + 1e-8)
        adv = torch.where(degenerate[index], torch.zeros_like(adv), adv)
        out.append(adv.float())
    return out


def edge_advantages(node_advantages: list[Tensor], clip: float) -> list[Tensor]:
    """Edge into node n inherits ``A(n)``, clipped to ``[−A_max, A_max]`` (docs/method.md §6)."""
    return [a.clamp(-clip, clip) for a in node_advantages]
