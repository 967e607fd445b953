"""The model-free cost planner behind ``branchgrpo plan`` (docs/method.md §10).

It scores a tree of the method's shape through the same path as training
(:func:`branchgrpo.tree.scoring.score_topology`) with distinct random leaf rewards, so the counts
are those of the engine (:mod:`branchgrpo.tree.counting`), structural zeros included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from branchgrpo.tree.counting import NfeCounts, count_nfe
from branchgrpo.tree.rollout import build_topology
from branchgrpo.tree.scoring import score_topology
from branchgrpo.tree.spec import MethodConfig


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
    scores = score_topology(topology.parent, topology.group, 1, sde, logp, iteration, leaf_rewards, config, generator)
    selection, counts = scores.selection, scores.nfe
    return Plan(
        config=config,
        iteration=iteration,
        nodes_per_depth=topology.nodes_per_depth(),
        sde_steps=sde,
        trained_per_depth=[int(m.sum()) for m in selection.mask],
        counts=counts,
        skipped=selection.skipped,
    )


__all__ = ["NfeCounts", "Plan", "count_nfe", "plan"]
