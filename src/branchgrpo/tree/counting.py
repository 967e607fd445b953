"""NFE accounting (docs/method.md §10): what one iteration runs, per prompt group.

Counts are of what the engine runs: rollout denoiser rows, edges, trained edges and training
forwards (distinct parents with at least one trained edge; one forward serves all its children).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from branchgrpo.tree.selection import EdgeSelection


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
    parent: list[Tensor], sde: list[bool], selection: EdgeSelection, num_groups: int,
    tail: tuple[int, int] | None = None,
) -> NfeCounts:
    """NFE of a tree batch, divided by the number of groups (so: per prompt). ``tail``: the
    compressed ODE tail's ``(first step, model calls)`` (:meth:`TreeSpec.ode_tail_at`): its chains
    cost that many calls each instead of one per step."""
    nodes = [p.numel() for p in parent]
    calls = sum(nodes[:-1]) if tail is None else sum(nodes[: tail[0]]) + nodes[tail[0]] * tail[1]
    trained = selection.mask
    forwards = 0
    for d in range(1, len(parent)):
        if trained[d].any():
            forwards += int(torch.unique(parent[d][trained[d]]).numel())
    total = NfeCounts(
        leaves=nodes[-1],
        nodes=sum(nodes),
        rollout_calls=calls,
        edges=sum(nodes[1:]),
        sde_edges=sum(n for n, s in zip(nodes[1:], sde) if s),
        trained_edges=selection.trained_edges,
        training_forwards=forwards,
    )
    if num_groups == 1:
        return total
    return total.scaled(num_groups)
