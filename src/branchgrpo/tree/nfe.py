"""NFE accounting (docs/method.md §10) and the model-free cost planner behind ``branchgrpo plan``.

Counts are of what the engine runs: rollout denoiser rows, edges, trained edges and training
forwards (distinct parents with at least one trained edge; one forward serves all its children).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from branchgrpo.tree.advantages import depth_advantages, edge_advantages, fuse_rewards
from branchgrpo.tree.rollout import build_topology
from branchgrpo.tree.selection import EdgeSelection, select_edges
from branchgrpo.tree.spec import MethodConfig


@dataclass
class NfeCounts:
    """Cost of one iteration for one prompt group (divide by ``leaves`` for per-leaf numbers)."""

    leaves: int
    nodes: int  # including roots
    rollout_calls: int  # F = Σ_i frontier size at step i
    edges: int
    sde_edges: int
    trained_edges: int
    training_forwards: int

    def per_leaf(self) -> dict[str, float]:
        return {
            key: value / self.leaves
            for key, value in asdict(self).items()
            if key not in ("leaves",)
        }

    def scaled(self, factor: float) -> "NfeCounts":
        return NfeCounts(**{k: v / factor for k, v in asdict(self).items()})  # type: ignore[arg-type]


def count_nfe(
    parent: list[Tensor], sde: list[bool], selection: EdgeSelection, num_groups: int
) -> NfeCounts:
    """NFE of a tree batch, divided by the number of groups (so: per prompt)."""
    nodes = [p.numel() for p in parent]
    trained = selection.mask
    forwards = 0
    for d in range(1, len(parent)):
        if trained[d].any():
            forwards += int(torch.unique(parent[d][trained[d]]).numel())
    total = NfeCounts(
        leaves=nodes[-1],
        nodes=sum(nodes),
        rollout_calls=sum(nodes[:-1]),
        edges=sum(nodes[1:]),
        sde_edges=sum(n for n, s in zip(nodes[1:], sde) if s),
        trained_edges=selection.trained_edges,
        training_forwards=forwards,
    )
    if num_groups == 1:
        return total
    return total.scaled(num_groups)


@dataclass
class Plan:
    """What one iteration of a method costs, computed without a model."""

    config: MethodConfig
    iteration: int
    nodes_per_depth: list[int]
    sde_steps: list[bool]
    trained_per_depth: list[int]
    counts: NfeCounts
    skipped: dict[str, int]

    def to_json(self) -> dict:
        counts = asdict(self.counts)
        return {
            "preset": self.config.name,
            "iteration": self.iteration,
            **counts,
            "per_leaf": self.counts.per_leaf(),
            "nodes_per_depth": self.nodes_per_depth,
            "trained_per_depth": self.trained_per_depth,
            "sde_steps": [i for i, s in enumerate(self.sde_steps) if s],
            "skipped_edges": self.skipped,
        }


def plan(config: MethodConfig, iteration: int = 0, seed: int = 0) -> Plan:
    """Cost of one iteration for one prompt: runs the real fusion, advantage and selection code
    on the tree's shape with distinct random leaf rewards (so only structural zeros remain)."""
    tree = config.tree
    topology = build_topology(tree, num_prompts=1, iteration=iteration)
    generator = torch.Generator().manual_seed(seed)
    leaves = topology.parent[-1].numel()
    leaf_rewards = torch.rand(leaves, generator=generator, dtype=torch.float64)
    logp = [torch.zeros(p.numel()) for p in topology.parent]
    sde = tree.sde_steps(iteration)
    fused = fuse_rewards(topology.parent, logp, leaf_rewards, config.advantage.fusion_beta)
    node_adv = depth_advantages(fused.reward, topology.group, 1, config.advantage.std_floor)
    edge_adv = edge_advantages(node_adv, config.advantage.advantage_clip)
    selection = select_edges(
        config, topology.parent, topology.group, 1, sde, fused.reward, edge_adv, iteration, generator
    )
    counts = count_nfe(topology.parent, sde, selection, 1)
    return Plan(
        config=config,
        iteration=iteration,
        nodes_per_depth=topology.nodes_per_depth(),
        sde_steps=sde,
        trained_per_depth=[int(m.sum()) for m in selection.mask],
        counts=counts,
        skipped=selection.skipped,
    )
