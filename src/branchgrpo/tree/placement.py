"""Adaptive split placement (docs/beyond-the-paper.md §4; an option beyond the paper).

The paper fixes where the tree splits. Here the trainer watches, for every split step in force,
the **share of a group's reward variance that is decided at that split**: by the law of total
variance, the variance of a group's leaf rewards is the sum over depths of the mean squared jump
between a leaf's ancestor's mean reward and the next ancestor's, ``(m_{d+1} − m_d)²``, and the jump
is non-zero only where the tree splits. A split whose share stays small spends a factor K of the
later model calls on a choice that hardly changes the outcome; every ``every`` iterations the
weakest split (smallest moving average of its share) moves one step to a free neighbour that has
shown, or may show, a larger share, as long as the rollout does not cost more calls than the
configured plan. K travels with the split, so leaves and group size stay the same.

The functions here are pure; :class:`SplitPlacement` holds the running state a checkpoint saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from branchgrpo.tree.advantages import _scatter_sum


def split_variance_shares(parent: list[Tensor], group: list[Tensor], leaf_rewards: Tensor, num_groups: int,
                          split_steps: list[int]) -> tuple[Tensor, int]:
    """Sum over groups of each split step's share of its group's leaf-reward variance, and the
    number of groups summed (groups whose leaves all tie have no variance to share and are left out).

    ``parent[d]: [N_d]`` indexes depth ``d − 1`` (``parent[0]`` is unused), ``group[d]: [N_d]`` the
    node's prompt group, ``leaf_rewards: [N_T]``. A split at step ``s`` branches depth ``s`` into
    depth ``s + 1``. The share of step ``s`` in group ``g`` is
    ``Σ_{c at depth s+1 in g} n_c (m_c − m_parent(c))² / (n_g · V_g)`` with ``n`` leaf counts, ``m``
    mean leaf rewards under a node and ``V_g`` the (population) variance of the group's leaves.
    With one root per group the shares of all split steps sum to 1.
    """
    depth = len(parent)
    rewards = leaf_rewards.detach().to(torch.float64).flatten()
    counts, sums = [None] * depth, [None] * depth
    counts[-1], sums[-1] = torch.ones_like(rewards), rewards
    for d in range(depth - 1, 0, -1):
        index = parent[d].to(rewards.device)
        size = parent[d - 1].numel()
        counts[d - 1] = _scatter_sum(counts[d], index, size)
        sums[d - 1] = _scatter_sum(sums[d], index, size)
    means = [s / c.clamp_min(1) for s, c in zip(sums, counts)]
    leaf_group = group[-1].to(rewards.device)
    n_group = _scatter_sum(torch.ones_like(rewards), leaf_group, num_groups)
    mean_group = _scatter_sum(rewards, leaf_group, num_groups) / n_group.clamp_min(1)
    var_group = _scatter_sum((rewards - mean_group[leaf_group]) ** 2, leaf_group, num_groups) / n_group.clamp_min(1)
    live = var_group > 1e-12
    shares = []
    for step in split_steps:
        d = step + 1
        index = parent[d].to(rewards.device)
        jump = counts[d] * (means[d] - means[d - 1][index]) ** 2
        per_group = _scatter_sum(jump, group[d].to(rewards.device), num_groups)
        share = torch.where(live, per_group / (n_group * var_group).clamp_min(1e-300), torch.zeros_like(per_group))
        shares.append(share.sum())
    total = torch.stack(shares) if shares else torch.zeros(0, dtype=torch.float64)
    return total, int(live.sum())


def rollout_calls(plan: dict[int, int], steps: int, roots: int = 1) -> int:
    """Model rows one prompt's tree costs: ``Σ_t`` (nodes entering step ``t``)."""
    calls, nodes = 0, roots
    for t in range(steps):
        calls += nodes
        nodes *= plan.get(t, 1)
    return calls


def next_split_plan(plan: dict[int, int], ema: dict[int, float], steps: int, max_calls: int,
                    roots: int = 1) -> dict[int, int]:
    """The plan after one placement move (``plan`` itself when nothing moves).

    The weakest split (smallest ``ema`` share; ties: the earlier step) moves to the free neighbour
    (``s − 1`` or ``s + 1``, not a split step) with the larger score, where a step's score is its
    ``ema`` share if it has held a split before and ``1 / len(plan)`` (the share of an even
    split of the variance) if it has not; ties: the later step, which costs fewer calls. It moves
    only when that score beats its own share and the new plan's rollout calls stay ``≤ max_calls``.
    """
    if not plan or any(s not in ema for s in plan):
        return dict(plan)
    weakest = min(plan, key=lambda s: (ema[s], s))
    prior = 1.0 / len(plan)
    best = None
    for t in (weakest + 1, weakest - 1):  # later first: wins ties
        if not 0 <= t < steps or t in plan:
            continue
        moved = {(t if s == weakest else s): k for s, k in plan.items()}
        if rollout_calls(moved, steps, roots) > max_calls:
            continue
        score = ema.get(t, prior)
        if score > ema[weakest] and (best is None or score > best[0]):
            best = (score, dict(sorted(moved.items())))
    return best[1] if best else dict(plan)


@dataclass
class SplitPlacement:
    """The running state of adaptive placement: the plan in force and each step's moving average
    share (steps that once held a split keep theirs). Saved in checkpoints (:meth:`to_dict`)."""

    plan: dict[int, int]
    max_calls: int
    ema: dict[int, float] = field(default_factory=dict)
    moves: int = 0

    def observe(self, shares: dict[int, float], decay: float) -> None:
        """Fold one iteration's mean shares of the split steps in force into the moving averages."""
        for step, value in shares.items():
            old = self.ema.get(step)
            self.ema[step] = value if old is None else decay * old + (1.0 - decay) * value

    def move(self, steps: int, roots: int = 1) -> bool:
        new = next_split_plan(self.plan, self.ema, steps, self.max_calls, roots)
        moved = new != self.plan
        self.plan, self.moves = new, self.moves + int(moved)
        return moved

    def to_dict(self) -> dict[str, Any]:
        return {"plan": {str(s): k for s, k in self.plan.items()}, "max_calls": self.max_calls,
                "ema": {str(s): v for s, v in self.ema.items()}, "moves": self.moves}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SplitPlacement":
        return cls({int(s): int(k) for s, k in data["plan"].items()}, int(data["max_calls"]),
                   {int(s): float(v) for s, v in data["ema"].items()}, int(data.get("moves", 0)))
