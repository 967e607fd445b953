"""From leaf rewards to trained edges: fusion → depth-wise advantages → selection → NFE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from branchgrpo.tree.advantages import FusedRewards, depth_advantages, edge_advantages, fuse_rewards
from branchgrpo.tree.counting import NfeCounts, count_nfe
from branchgrpo.tree.rollout import RolloutTree
from branchgrpo.tree.selection import EdgeSelection, select_edges
from branchgrpo.tree.sibling import sibling_advantages
from branchgrpo.tree.spec import MethodConfig


@dataclass
class TreeScores:
    """Everything the update needs from a scored tree, per depth."""

    leaf_rewards: Tensor  # [N_T]
    fused: FusedRewards
    node_advantage: list[Tensor]
    edge_advantage: list[Tensor]  # clipped to ±A_max
    selection: EdgeSelection
    nfe: NfeCounts  # per prompt group


def score_tree(
    tree: RolloutTree,
    leaf_rewards: Tensor,
    config: MethodConfig,
    generator: torch.Generator | None = None,
) -> TreeScores:
    """Fuse leaf rewards (docs/method.md §5), normalise per group and depth (§6), select edges (§7)."""
    if leaf_rewards.shape != (tree.parent[-1].numel(),):
        raise ValueError(
            f"leaf_rewards must have shape [{tree.parent[-1].numel()}] (one per leaf), got {tuple(leaf_rewards.shape)}"
        )
    if not torch.isfinite(leaf_rewards).all():
        raise ValueError("leaf_rewards contain NaN or Inf; refusing to train on missing rewards")
    return score_topology(tree.parent, tree.group, tree.num_groups, tree.sde, tree.logp, tree.iteration,
                          leaf_rewards, config, generator)


def score_topology(
    parent: list[Tensor],
    group: list[Tensor],
    num_groups: int,
    sde: list[bool],
    logp: list[Tensor],
    iteration: int,
    leaf_rewards: Tensor,
    config: MethodConfig,
    generator: torch.Generator | None = None,
) -> TreeScores:
    """The fuse → normalise → select → count chain on a tree's arrays; training (:func:`score_tree`)
    and the planner (``branchgrpo plan``) both go through it."""
    advantage = config.advantage
    fused = fuse_rewards(parent, logp, leaf_rewards, advantage.fusion_beta)
    if advantage.mode == "sibling":
        node_adv = sibling_advantages(fused.reward, parent, group, num_groups, advantage.std_floor)
    else:
        node_adv = depth_advantages(fused.reward, group, num_groups, advantage.std_floor)
    edge_adv = edge_advantages(node_adv, advantage.advantage_clip)
    selection = select_edges(
        config, parent, group, num_groups, sde, [f.float() for f in fused.reward], edge_adv, iteration, generator,
    )
    nfe = count_nfe(parent, sde, selection, num_groups, config.tree.ode_tail_at(iteration))
    return TreeScores(leaf_rewards, fused, node_adv, edge_adv, selection, nfe)
