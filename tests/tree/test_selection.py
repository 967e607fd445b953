"""Specification tests for edge selection (docs/method.md §7): every rule against a brute-force enumeration.

The expected masks are built here node by node, walking the parent arrays with Python loops; the
depth-pruning windows are written out as literal depth sets derived from the DepthPruning
docstring (window ``[a, a+size)`` / ``(a−size, a]``, ``a = start ± k // slide_every``, clamped at
``stop``).
"""

from __future__ import annotations

import random

import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.tree.rollout import build_topology
from branchgrpo.tree.selection import select_edges
from branchgrpo.tree.spec import DepthPruning, MethodConfig, SelectionSpec, TreeSpec


# ---------------------------------------------------------------------------------------------
# helpers (plain loops)
# ---------------------------------------------------------------------------------------------


def ancestor(parent, depth: int, node: int, target: int) -> int:
    for d in range(depth, target, -1):
        node = int(parent[d][node])
    return node


def children(parent, depth: int, p: int) -> list[int]:
    """Nodes at ``depth`` whose parent (at depth − 1) is ``p``."""
    return [c for c in range(parent[depth].numel()) if int(parent[depth][c]) == p]


class Batch:
    """A tree batch with distinct leaf rewards, fused rewards (uniform mean, by enumeration) and
    nonzero random edge advantages."""

    def __init__(self, tree: TreeSpec, num_prompts: int, seed: int):
        topo = build_topology(tree, num_prompts)
        self.parent, self.group, self.num_groups = topo.parent, topo.group, topo.num_groups
        self.steps = len(self.parent) - 1
        rng = random.Random(seed)
        leaves = self.parent[-1].numel()
        self.leaf_reward = [rng.random() for _ in range(leaves)]
        fused = []
        for d in range(self.steps + 1):
            sums = [0.0] * self.parent[d].numel()
            counts = [0] * self.parent[d].numel()
            for leaf in range(leaves):
                a = ancestor(self.parent, self.steps, leaf, d)
                sums[a] += self.leaf_reward[leaf]
                counts[a] += 1
            fused.append(torch.tensor([s / c for s, c in zip(sums, counts)], dtype=torch.float64))
        self.fused = fused
        self.edge_adv = [torch.zeros(self.parent[0].numel())] + [
            torch.tensor([rng.choice([-1, 1]) * (0.1 + rng.random()) for _ in range(p.numel())])
            for p in self.parent[1:]
        ]
        self.sde = [True] * self.steps

    def select(self, config: MethodConfig, iteration: int = 0, generator=None, sde=None, edge_adv=None):
        return select_edges(
            config, self.parent, self.group, self.num_groups, self.sde if sde is None else sde, self.fused,
            self.edge_adv if edge_adv is None else edge_adv, iteration, generator,
        )

    def all_true(self):
        return [[True] * p.numel() for p in self.parent]


def assert_mask(selection, expected):
    assert len(selection.mask) == len(expected)
    assert selection.mask[0].numel() == 0  # roots have no edge
    for d in range(1, len(expected)):
        got = [bool(x) for x in selection.mask[d]]
        assert got == expected[d], f"depth {d}"
    assert selection.trained_edges == sum(sum(e) for e in expected[1:])


def cfg(tree: TreeSpec, **selection) -> MethodConfig:
    selection.setdefault("skip_zero_advantage", False)
    return MethodConfig(tree=tree, selection=SelectionSpec(**selection))


# ---------------------------------------------------------------------------------------------
# rules one by one
# ---------------------------------------------------------------------------------------------


def test_everything_trained_when_no_rule_applies():
    tree = TreeSpec(steps=6, split_plan={0: 3, 3: 2})
    b = Batch(tree, 2, seed=0)
    assert_mask(b.select(cfg(tree)), b.all_true())


def test_zero_advantage_edges_are_skipped():
    tree = TreeSpec(steps=6, split_plan={0: 3, 2: 3})
    b = Batch(tree, 3, seed=1)
    rng = random.Random(1)
    adv = [a.clone() for a in b.edge_adv]
    zeros = 0
    for d in range(1, len(adv)):
        for n in range(adv[d].numel()):
            if rng.random() < 0.3:
                adv[d][n] = 0.0
                zeros += 1
    expected = b.all_true()
    for d in range(1, len(adv)):
        expected[d] = [float(adv[d][n]) != 0.0 for n in range(adv[d].numel())]
    sel = b.select(cfg(tree, skip_zero_advantage=True), edge_adv=adv)
    assert_mask(sel, expected)
    assert sel.skipped["zero_advantage"] == zeros
    # off: zero-advantage edges are trained
    assert_mask(b.select(cfg(tree, skip_zero_advantage=False), edge_adv=adv), b.all_true())


def test_zero_advantage_trunk_before_first_split_is_skipped():
    """Real advantages: depths where each prompt has one node carry A = 0 (docs/method.md §7.1)."""
    from branchgrpo.tree.advantages import depth_advantages, edge_advantages

    tree = TreeSpec(steps=7, split_plan={3: 2, 5: 3})
    b = Batch(tree, 2, seed=2)
    adv = edge_advantages(depth_advantages(b.fused, b.group, b.num_groups), 5.0)
    sel = b.select(cfg(tree, skip_zero_advantage=True), edge_adv=adv)
    expected = b.all_true()
    for d in range(1, b.steps + 1):
        per_group = {}
        for n in range(b.parent[d].numel()):
            g = int(b.group[d][n])
            per_group[g] = per_group.get(g, 0) + 1
        expected[d] = [per_group[int(b.group[d][n])] >= 2 for n in range(b.parent[d].numel())]
    assert [any(e) for e in expected[1:]] == [False] * 3 + [True] * 4  # the trunk: depths 1..3
    assert_mask(sel, expected)


def test_ode_steps_are_never_trained():
    tree = TreeSpec(steps=8, split_plan={0: 2, 4: 3})
    b = Batch(tree, 2, seed=3)
    sde = [True, False, False, True, True, False, True, False]
    expected = b.all_true()
    for d in range(1, b.steps + 1):
        if not sde[d - 1]:
            expected[d] = [False] * b.parent[d].numel()
    sel = b.select(cfg(tree), sde=sde)
    assert_mask(sel, expected)
    assert sel.skipped["ode_step"] == sum(b.parent[d].numel() for d in range(1, 9) if not sde[d - 1])


BRANCH = TreeSpec(steps=20, split_plan={0: 2, 3: 2, 6: 2, 9: 2})  # last split 9 → default start 10

DEPTH_CASES = [
    # (DepthPruning, iteration, pruned depths written out by hand)
    (DepthPruning(size=5), 0, range(10, 15)),
    (DepthPruning(size=5), 29, range(10, 15)),
    (DepthPruning(size=5), 30, range(11, 16)),
    (DepthPruning(size=5), 65, range(12, 17)),
    (DepthPruning(size=5), 180, range(16, 21)),  # start 16: last depth 20 = T
    (DepthPruning(size=5), 1000, range(16, 21)),  # would pass T: clamped
    (DepthPruning(size=4), 0, range(10, 14)),
    (DepthPruning(size=4, slide_every=0), 10_000, range(10, 14)),  # fixed window
    (DepthPruning(size=5, stop=17), 60, range(12, 17)),
    (DepthPruning(size=5, stop=17), 90, range(13, 18)),
    (DepthPruning(size=5, stop=17), 120, range(13, 18)),  # clamped at stop
    (DepthPruning(start=3, size=2, slide_every=7), 20, range(5, 7)),
    (DepthPruning(start=12, size=3, direction="earlier", slide_every=10), 0, range(10, 13)),
    (DepthPruning(start=12, size=3, direction="earlier", slide_every=10), 10, range(9, 12)),
    (DepthPruning(start=12, size=3, direction="earlier", slide_every=10), 95, range(1, 4)),
    (DepthPruning(start=12, size=3, direction="earlier", slide_every=10), 500, range(1, 4)),  # clamped at 1
    (DepthPruning(start=12, size=3, direction="earlier", slide_every=10, stop=5), 60, range(5, 8)),
    (DepthPruning(start=12, size=3, direction="earlier", slide_every=10, stop=5), 95, range(5, 8)),
    (DepthPruning(start=None, size=2, direction="earlier", slide_every=5), 12, range(7, 9)),  # a = 10 − 2
]


@pytest.mark.parametrize("pruning,iteration,window", DEPTH_CASES)
def test_depth_pruning_window(pruning, iteration, window):
    config = cfg(BRANCH, depth_pruning=pruning)
    b = Batch(BRANCH, 2, seed=4)
    expected = b.all_true()
    for d in window:
        expected[d] = [False] * b.parent[d].numel()
    sel = b.select(config, iteration=iteration)
    assert_mask(sel, expected)
    assert sel.skipped["depth_pruning"] == sum(b.parent[d].numel() for d in window)


def brute_parent_top1(b: Batch, last_split: int):
    anchor = last_split + 1
    kept = set()
    for p in range(b.parent[last_split].numel()):
        kids = children(b.parent, anchor, p)
        best = kids[0]
        for c in kids[1:]:
            if float(b.fused[anchor][c]) > float(b.fused[anchor][best]):
                best = c
        kept.add(best)
    expected = b.all_true()
    for d in range(anchor + 1, b.steps + 1):
        expected[d] = [ancestor(b.parent, d, n, anchor) in kept for n in range(b.parent[d].numel())]
    return expected, kept


@pytest.mark.parametrize(
    "tree,prompts",
    [
        (TreeSpec(steps=7, split_plan={0: 2, 3: 3}), 3),
        (TreeSpec(steps=6, split_plan={1: 3, 2: 3}), 2),
        (TreeSpec(steps=8, split_plan={0: 3, 4: 2}, roots_per_prompt=2), 2),
        (TreeSpec(steps=5, split_plan={0: 2, 4: 3}), 2),  # split at the last step: nothing after it
        (BRANCH, 2),
    ],
)
def test_width_pruning_parent_top1(tree, prompts):
    b = Batch(tree, prompts, seed=5)
    sel = b.select(cfg(tree, width_pruning="parent_top1"))
    expected, kept = brute_parent_top1(b, tree.last_split_step)
    assert_mask(sel, expected)
    # one chain kept per split parent; post-split edges shrink by the factor K of the last split
    k = tree.split_plan[tree.last_split_step]
    assert len(kept) == b.parent[tree.last_split_step].numel()
    post = sum(b.parent[d].numel() for d in range(tree.last_split_step + 2, b.steps + 1))
    assert sel.skipped.get("width_pruning", 0) == post - post // k
    if tree is BRANCH:
        assert sel.trained_edges == 138 * prompts  # docs/method.md §10: half of the 160 post-split edges


def test_width_pruning_parent_top1_ties_keep_exactly_one_best_child():
    tree = TreeSpec(steps=5, split_plan={0: 2, 2: 3})
    b = Batch(tree, 1, seed=6)
    anchor = 3
    fused = [f.clone() for f in b.fused]
    for p in range(b.parent[2].numel()):
        kids = children(b.parent, anchor, p)
        fused[anchor][kids[1]] = fused[anchor][kids[2]] = 5.0 + p  # two tied best children
    b.fused = fused
    sel = b.select(cfg(tree, width_pruning="parent_top1"))
    for p in range(b.parent[2].numel()):
        kids = children(b.parent, anchor, p)
        kept_kids = [c for c in kids if bool(sel.mask[anchor + 1][children(b.parent, anchor + 1, c)[0]])]
        assert len(kept_kids) == 1 and kept_kids[0] in (kids[1], kids[2])
        # the whole chain below the kept child is kept, and only it
        for d in range(anchor + 1, b.steps + 1):
            for n in range(b.parent[d].numel()):
                a = ancestor(b.parent, d, n, anchor)
                if a in kids:
                    assert bool(sel.mask[d][n]) == (a == kept_kids[0])


def brute_extreme(b: Batch, anchor: int, extreme_b: int):
    """Keep the post-split chains of the b best and b worst leaves of each group."""
    kept = set()
    for g in range(b.num_groups):
        leaves = [leaf for leaf in range(b.parent[-1].numel()) if int(b.group[-1][leaf]) == g]
        leaves.sort(key=lambda leaf: b.leaf_reward[leaf])
        chosen = leaves if len(leaves) <= 2 * extreme_b else leaves[:extreme_b] + leaves[-extreme_b:]
        kept |= {ancestor(b.parent, b.steps, leaf, anchor) for leaf in chosen}
    expected = b.all_true()
    for d in range(anchor + 1, b.steps + 1):
        expected[d] = [ancestor(b.parent, d, n, anchor) in kept for n in range(b.parent[d].numel())]
    return expected, kept


@pytest.mark.parametrize("extreme_b", [1, 2, 4, 5, 9])
@pytest.mark.parametrize(
    "tree,prompts",
    [
        (TreeSpec(steps=6, split_plan={0: 3, 2: 3}), 3),  # 9 chains per group
        (TreeSpec(steps=7, split_plan={1: 2, 3: 3}, roots_per_prompt=2), 2),  # 12 chains per group
    ],
)
def test_width_pruning_extreme_b(tree, prompts, extreme_b):
    b = Batch(tree, prompts, seed=7 + extreme_b)
    sel = b.select(cfg(tree, width_pruning="extreme", extreme_b=extreme_b))
    anchor = tree.last_split_step + 1
    expected, kept = brute_extreme(b, anchor, extreme_b)
    assert_mask(sel, expected)
    chains = tree.leaves_per_prompt()
    assert len(kept) == prompts * min(chains, 2 * extreme_b)


@pytest.mark.parametrize("fraction,steps", [(0.6, 20), (0.3, 20), (0.55, 20), (0.25, 10), (0.05, 20), (0.99, 10)])
def test_timestep_fraction(fraction, steps):
    tree = TreeSpec(steps=steps, split_plan={0: 4})
    prompts = 4
    b = Batch(tree, prompts, seed=8)
    config = cfg(tree, timestep_fraction=fraction)
    sel = b.select(config, generator=torch.Generator().manual_seed(8))
    chosen_count = int(steps * fraction)
    trained_steps_per_group = []
    for g in range(prompts):
        trained_steps = set()
        for d in range(1, steps + 1):
            flags = [bool(sel.mask[d][n]) for n in range(b.parent[d].numel()) if int(b.group[d][n]) == g]
            assert all(flags) or not any(flags), "all edges of a group at a step share the draw"
            if all(flags):
                trained_steps.add(d - 1)
        assert len(trained_steps) == chosen_count
        trained_steps_per_group.append(frozenset(trained_steps))
    assert sel.trained_edges == prompts * 4 * chosen_count
    # random per group (docs/method.md §7.5: a random fraction of steps); groups differ unless all steps chosen
    if 0 < chosen_count < steps - 1:
        assert len(set(trained_steps_per_group)) > 1
    # same generator seed → same draw
    again = b.select(config, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(sel.mask, again.mask))


def test_ignore_last():
    tree = TreeSpec(steps=6, split_plan={0: 2, 5: 3})
    b = Batch(tree, 2, seed=9)
    expected = b.all_true()
    expected[6] = [False] * b.parent[6].numel()
    sel = b.select(cfg(tree, ignore_last=True))
    assert_mask(sel, expected)
    assert sel.skipped["ignore_last"] == b.parent[6].numel()


# ---------------------------------------------------------------------------------------------
# all rules together: a conjunction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", ["parent_top1", "extreme"])
@pytest.mark.parametrize("iteration", [0, 40, 400])
def test_rules_combine_as_a_conjunction(width, iteration):
    tree = TreeSpec(steps=12, split_plan={0: 3, 2: 2, 4: 3})
    b = Batch(tree, 3, seed=10 + iteration)
    rng = random.Random(iteration)
    adv = [a.clone() for a in b.edge_adv]
    for d in range(1, len(adv)):
        for n in range(adv[d].numel()):
            if rng.random() < 0.2:
                adv[d][n] = 0.0
    sde = [True] * 12
    sde[7] = sde[10] = False
    pruning = DepthPruning(size=2, slide_every=20, stop=11)  # start 5; a = 5, 7, 10 (clamped)
    config = cfg(
        tree, skip_zero_advantage=True, depth_pruning=pruning, width_pruning=width, extreme_b=2, ignore_last=True
    )
    sel = b.select(config, iteration=iteration, sde=sde, edge_adv=adv)

    window = {0: {5, 6}, 40: {7, 8}, 400: {10, 11}}[iteration]
    if width == "parent_top1":
        width_mask, _ = brute_parent_top1(b, 4)
    else:
        width_mask, _ = brute_extreme(b, 5, 2)
    expected = b.all_true()
    for d in range(1, 13):
        for n in range(b.parent[d].numel()):
            expected[d][n] = (
                sde[d - 1]
                and float(adv[d][n]) != 0.0
                and d not in window
                and width_mask[d][n]
                and d != 12
            )
    assert_mask(sel, expected)


# ---------------------------------------------------------------------------------------------
# width pruning without a split
# ---------------------------------------------------------------------------------------------


def test_parent_top1_without_split_is_rejected_or_runs():
    """MethodConfig accepts width pruning on a split-free tree when roots_per_prompt > 1. Then
    either the config must be rejected with a ConfigError, or selection must run (there are no
    post-split chains grouped by a split parent; every root is its own chain). A crash inside
    select_edges is neither."""
    tree = TreeSpec(steps=4, split_plan={}, roots_per_prompt=4)
    try:
        config = cfg(tree, width_pruning="parent_top1")
    except ConfigError:
        return
    b = Batch(tree, 2, seed=11)
    sel = b.select(config)
    assert sel.mask[0].numel() == 0
    assert all(m.numel() == 8 for m in sel.mask[1:])
