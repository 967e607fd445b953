"""Which edges are trained (docs/method.md §7): masks per depth, one boolean per edge (= child node).

Selection never changes the rollout or the rewards; it only decides which edges get gradients.
Every rule is a vectorised mask; the final mask is their conjunction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from branchgrpo.tree.spec import MethodConfig, SelectionSpec, TreeSpec


@dataclass
class EdgeSelection:
    """Trained-edge masks per depth (``mask[0]`` is empty: roots have no edge) and why edges fell."""

    mask: list[Tensor]
    skipped: dict[str, int] = field(default_factory=dict)  # rule → edges it removed (may overlap)
    # Edges selected by every rule except the zero-advantage skip. The loss is normalised by this
    # count, so that skipping A = 0 edges (whose gradient is exactly zero) changes nothing.
    normaliser_edges: int = 0

    @property
    def trained_edges(self) -> int:
        return int(sum(int(m.sum()) for m in self.mask))


def ancestor_at(parent: list[Tensor], anchor_depth: int) -> list[Tensor | None]:
    """For each depth ``d ≥ anchor_depth``, the index of every node's ancestor at ``anchor_depth``."""
    out: list[Tensor | None] = [None] * len(parent)
    if anchor_depth < 0 or anchor_depth >= len(parent):
        return out
    out[anchor_depth] = torch.arange(parent[anchor_depth].numel())
    for d in range(anchor_depth + 1, len(parent)):
        out[d] = out[d - 1][parent[d]]
    return out


def _rank_within_group(values: Tensor, group: Tensor, descending: bool) -> Tensor:
    """Rank (0 = first) of every value inside its group, ties broken by index."""
    order = torch.argsort(values, descending=descending, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    sorted_group = group[order]
    first = torch.zeros_like(sorted_group)
    starts = torch.ones_like(sorted_group, dtype=torch.bool)
    starts[1:] = sorted_group[1:] != sorted_group[:-1]
    position = torch.arange(sorted_group.numel())
    first = torch.cummax(torch.where(starts, position, torch.zeros_like(position)), dim=0).values
    rank = torch.empty_like(order)
    rank[order] = position - first
    return rank


def width_keep_anchors(
    tree: TreeSpec,
    selection: SelectionSpec,
    parent: list[Tensor],
    group: list[Tensor],
    fused: list[Tensor],
    iteration: int = 0,
) -> Tensor | None:
    """Which post-split chains survive width pruning, as a mask over nodes at depth ``i* + 1``.

    A post-split chain is a node at depth ``i* + 1`` (a child of the last split in force at
    ``iteration``, see :meth:`TreeSpec.last_split_at`) with everything below it. ``parent_top1``
    keeps, per split parent, the child with the highest fused reward; ``extreme`` keeps the chains
    of the ``b`` best and ``b`` worst leaves of each group.
    """
    if selection.width_pruning == "none":
        return None
    last = tree.last_split_at(iteration)
    anchor = (last + 1) if last is not None else 0
    reward = fused[anchor]
    if selection.width_pruning == "parent_top1":
        index = parent[anchor]
        best = torch.full((parent[anchor - 1].numel(),), float("-inf"), dtype=reward.dtype)
        best = best.scatter_reduce(0, index, reward, reduce="amax", include_self=True)
        is_best = reward == best[index]
        # keep exactly one child per parent on ties: the first one
        position = torch.arange(reward.numel())
        first_best = torch.full_like(best, reward.numel(), dtype=torch.long)
        first_best = first_best.scatter_reduce(
            0, index, torch.where(is_best, position, reward.numel()), reduce="amin", include_self=True
        )
        return position == first_best[index]
    # extreme-b: rank the chains (one leaf each below the last split) within their group
    grp = group[anchor]
    top = _rank_within_group(reward, grp, descending=True) < selection.extreme_b
    bottom = _rank_within_group(reward, grp, descending=False) < selection.extreme_b
    return top | bottom


def repeat_index(parent: list[Tensor], edge_advantage: list[Tensor]) -> list[Tensor]:
    """How many edges directly above each edge carry the same advantage (0 = a new signal).

    ``run[d][n] = run[d−1][parent] + 1`` when the edge into ``n`` has exactly the advantage of the
    edge into its parent, else 0; depth 1 edges have no edge above them.
    """
    run = [torch.zeros(parent[0].numel(), dtype=torch.long)]
    for d in range(1, len(parent)):
        if d == 1:
            run.append(torch.zeros(parent[1].numel(), dtype=torch.long))
            continue
        same = edge_advantage[d] == edge_advantage[d - 1][parent[d]]
        run.append(torch.where(same, run[d - 1][parent[d]] + 1, torch.zeros_like(parent[d])))
    return run


def informative_edges(
    candidate: list[Tensor],
    window: range,
    parent: list[Tensor],
    group: list[Tensor],
    num_groups: int,
    edge_advantage: list[Tensor],
) -> list[Tensor]:
    """Train as many edges per group as the depth window would, picked by information (beyond the paper).

    The budget of a group is its candidate edges outside ``window`` (the count depth pruning keeps).
    Candidates are ranked by: first the edges that start a new advantage value along their path
    (:func:`repeat_index` ascending), then larger ``|A|``, then shallower depth, then node index;
    the first ``budget`` of each group are kept. Returns masks per depth (``[0]`` empty).
    """
    steps = len(parent) - 1
    depth = torch.cat([torch.full((parent[d].numel(),), d) for d in range(1, steps + 1)])
    node = torch.cat([torch.arange(parent[d].numel()) for d in range(1, steps + 1)])
    grp = torch.cat([group[d].long() for d in range(1, steps + 1)])
    is_candidate = torch.cat([candidate[d] for d in range(1, steps + 1)])
    in_window = (depth >= window.start) & (depth < window.stop)  # windows have step 1
    run = torch.cat(repeat_index(parent, edge_advantage)[1:])
    magnitude = torch.cat([edge_advantage[d].abs().double() for d in range(1, steps + 1)])
    budget = torch.zeros(num_groups, dtype=torch.long).index_add_(0, grp, (is_candidate & ~in_window).long())
    # lexicographic sort (last key first, stable): group, non-candidates last, run, −|A|, depth, node
    order = torch.arange(depth.numel())
    for key, descending in ((node, False), (depth, False), (magnitude, True), (run, False),
                            ((~is_candidate).long(), False), (grp, False)):
        order = order[torch.argsort(key[order], descending=descending, stable=True)]
    sorted_group = grp[order]
    starts = torch.ones_like(sorted_group, dtype=torch.bool)
    starts[1:] = sorted_group[1:] != sorted_group[:-1]
    position = torch.arange(order.numel())
    first = torch.cummax(torch.where(starts, position, torch.zeros_like(position)), dim=0).values
    rank = torch.empty_like(order)
    rank[order] = position - first
    keep_flat = is_candidate & (rank < budget[grp])
    keep = [torch.zeros(0, dtype=torch.bool)]
    offset = 0
    for d in range(1, steps + 1):
        keep.append(keep_flat[offset : offset + parent[d].numel()])
        offset += parent[d].numel()
    return keep


def select_edges(
    config: MethodConfig,
    parent: list[Tensor],
    group: list[Tensor],
    num_groups: int,
    sde: list[bool],
    fused: list[Tensor],
    edge_advantage: list[Tensor],
    iteration: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> EdgeSelection:
    """Masks of trained edges per depth (docs/method.md §7); all rules are applied as a conjunction.

    ``generator`` draws DanceGRPO's random step subset (``timestep_fraction < 1``): one generator,
    or one per group (then a group's draw does not depend on the other groups in the batch).
    """
    tree, selection = config.tree, config.selection
    steps = len(parent) - 1
    mask = [torch.zeros(0, dtype=torch.bool)] + [torch.ones(p.numel(), dtype=torch.bool) for p in parent[1:]]
    skipped: dict[str, int] = {}

    def apply(rule: str, depth: int, keep: Tensor) -> None:
        skipped[rule] = skipped.get(rule, 0) + int((mask[depth] & ~keep).sum())
        mask[depth] &= keep

    for d in range(1, steps + 1):
        if not sde[d - 1]:
            apply("ode_step", d, torch.zeros_like(mask[d]))
    if selection.depth_pruning is not None and selection.edges == "window":
        for d in selection.depth_pruning.window(iteration, tree):
            if 1 <= d <= steps:
                apply("depth_pruning", d, torch.zeros_like(mask[d]))
    keep_anchor = width_keep_anchors(tree, selection, parent, group, [f.cpu() for f in fused], iteration)
    if keep_anchor is not None:
        last = tree.last_split_at(iteration)
        anchor = (last + 1) if last is not None else 0
        ancestors = ancestor_at(parent, anchor)
        for d in range(anchor + 1, steps + 1):
            apply("width_pruning", d, keep_anchor[ancestors[d]])
    if selection.timestep_fraction < 1.0:
        chosen_steps = int(steps * selection.timestep_fraction)
        if isinstance(generator, (list, tuple)):
            draws = torch.stack([torch.rand(steps, generator=g, device=g.device).cpu() for g in generator])
        else:
            draws = torch.rand(num_groups, steps, generator=generator, device=generator.device if generator else "cpu")
        chosen = torch.zeros(num_groups, steps, dtype=torch.bool)
        chosen.scatter_(1, draws.cpu().argsort(dim=1)[:, :chosen_steps], True)
        for d in range(1, steps + 1):
            apply("timestep_fraction", d, chosen[group[d], d - 1])
    if selection.ignore_last:
        apply("ignore_last", steps, torch.zeros_like(mask[steps]))
    if selection.depth_pruning is not None and selection.edges == "informative":
        window = selection.depth_pruning.window(iteration, tree)
        keep = informative_edges(mask, window, parent, group, num_groups, [a.cpu() for a in edge_advantage])
        for d in range(1, steps + 1):
            apply("informative", d, keep[d])
    normaliser = int(sum(int(m.sum()) for m in mask))
    # With a KL term an A = 0 edge still has a gradient (the KL's), so the skip is exact only without it.
    if selection.skip_zero_advantage and config.update.kl_coef == 0:
        for d in range(1, steps + 1):
            apply("zero_advantage", d, edge_advantage[d].cpu() != 0)
    return EdgeSelection(mask=mask, skipped=skipped, normaliser_edges=normaliser)
