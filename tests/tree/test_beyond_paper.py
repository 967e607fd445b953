"""Specification tests for the options beyond the paper (docs/beyond-the-paper.md).

Every expected value is built here node by node with Python loops over explicit parents, siblings
and paths (``statistics`` for means and stds), never with the scatter code under test.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest
import torch

from branchgrpo.bench_runs import read_variants
from branchgrpo.config import ConfigError
from branchgrpo.tree.advantages import depth_advantages, edge_advantages, fuse_rewards
from branchgrpo.tree.presets import method_config
from branchgrpo.tree.rollout import build_topology
from branchgrpo.tree.scoring import score_topology
from branchgrpo.tree.selection import select_edges
from branchgrpo.tree.sibling import sibling_advantages
from branchgrpo.tree.spec import AdvantageSpec, DepthPruning, MethodConfig, SelectionSpec, TreeSpec

FOREST_VARIANT = Path(__file__).resolve().parents[2] / "benchmarks" / "variants" / "forest-mix.yaml"

# A chain before the first split (steps 0-1, two roots per prompt), a 3-way and a 2-way split,
# and a chain after the last split.
TREE = TreeSpec(steps=7, split_plan={2: 3, 4: 2}, roots_per_prompt=2)


def random_tree(seed: int, num_prompts: int = 3, values=(0.0, 0.5, 1.0)):
    """Topology, fused rewards (β = 0.7 over random edge log-probs) from leaf rewards drawn from a
    small set, so that siblings and whole groups tie now and then."""
    topo = build_topology(TREE, num_prompts)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    logp = [torch.zeros(p.numel()) for p in topo.parent]
    logp[1:] = [torch.randn(p.numel(), generator=gen, dtype=torch.float64) for p in topo.parent[1:]]
    leaves = torch.tensor([rng.choice(values) for _ in range(topo.parent[-1].numel())], dtype=torch.float64)
    fused = fuse_rewards(topo.parent, logp, leaves, beta=0.7).reward
    return topo, fused, logp, leaves


def brute_sibling(parent, group, fused) -> list[list[float]]:
    """Sibling-mode advantages by walking explicit lists (the rule in docs/beyond-the-paper.md §1)."""
    steps = len(parent) - 1
    par = [[int(x) for x in p] for p in parent]
    grp = [[int(x) for x in g] for g in group]
    r = [[float(x) for x in f] for f in fused]

    def z(value, pool):
        if len(pool) < 2:
            return 0.0
        std = statistics.stdev(pool)  # sample std (K − 1)
        return 0.0 if std < 1e-6 else (value - statistics.fmean(pool)) / (std + 1e-8)

    def depthwise(d, n):
        return z(r[d][n], [r[d][m] for m in range(len(r[d])) if grp[d][m] == grp[d][n]])

    def siblings(d, n):
        return [c for c in range(len(par[d])) if par[d][c] == par[d][n]]

    out = [[depthwise(0, n) for n in range(len(r[0]))]]
    for d in range(1, steps + 1):
        row = []
        for n in range(len(r[d])):
            e, m = d, n  # walk up to the nearest split edge (the edge into m at depth e)
            while e >= 1 and len(siblings(e, m)) == 1:
                e, m = e - 1, par[e][m]
            if e >= 1:
                row.append(z(r[e][m], [r[e][c] for c in siblings(e, m)]))
            else:  # no split above: the depth-wise z-score (paper Eq. 4)
                row.append(depthwise(d, n))
        out.append(row)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_sibling_advantages_match_brute_force(seed):
    topo, fused, _, _ = random_tree(seed)
    got = sibling_advantages(fused, topo.parent, topo.group, topo.num_groups)
    expected = brute_sibling(topo.parent, topo.group, fused)
    for d, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float32), rtol=1e-6, atol=1e-6, msg=f"depth {d}")


def test_sibling_ties_and_chains_cover_every_case():
    """The seeds above exercise tied siblings (A = 0), chains before the first split (depth-wise)
    and chains below a split (inherited); a test that never reached a branch could not fail on it."""
    seen = {"tied": False, "untied": False}
    for seed in range(4):
        topo, fused, _, _ = random_tree(seed)
        # depth 5 is the last split: each child's fused reward is its one leaf's reward
        for p in range(fused[4].numel()):
            kids = [float(fused[5][c]) for c in range(fused[5].numel()) if int(topo.parent[5][c]) == p]
            seen["tied" if max(kids) - min(kids) < 1e-6 else "untied"] = True
    assert all(seen.values())


def test_sibling_mode_through_scoring_and_default_unchanged():
    topo, _, logp, leaves = random_tree(7)
    sde = [True] * TREE.steps
    default = score_topology(topo.parent, topo.group, topo.num_groups, sde, logp, 0, leaves, MethodConfig(tree=TREE))
    fused = fuse_rewards(topo.parent, logp, leaves, 1.0).reward
    for a, b in zip(default.node_advantage, depth_advantages(fused, topo.group, topo.num_groups)):
        assert torch.equal(a, b)  # default = depth-wise, bit for bit
    config = MethodConfig(tree=TREE, advantage=AdvantageSpec(mode="sibling", advantage_clip=0.5))
    scores = score_topology(topo.parent, topo.group, topo.num_groups, sde, logp, 0, leaves, config)
    expected = brute_sibling(topo.parent, topo.group, fused)
    for d in range(1, TREE.steps + 1):
        clipped = torch.tensor(expected[d], dtype=torch.float32).clamp(-0.5, 0.5)
        torch.testing.assert_close(scores.edge_advantage[d], clipped, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# informative edge selection
# ---------------------------------------------------------------------------------------------


def brute_informative(parent, group, candidate, window, edge_adv) -> set[tuple[int, int]]:
    """Per group: budget = candidates outside the window; rank candidates by (repeat count along
    the path, −|A|, depth, node) and keep the first ``budget``."""
    steps = len(parent) - 1
    adv = [[float(x) for x in a] for a in edge_adv]

    def repeats(d, n):
        count = 0
        while d >= 2 and adv[d][n] == adv[d - 1][int(parent[d][n])]:
            count, d, n = count + 1, d - 1, int(parent[d][n])
        return count

    chosen = set()
    for g in sorted({int(x) for x in group[-1]}):
        edges = [(d, n) for d in range(1, steps + 1) for n in range(parent[d].numel())
                 if int(group[d][n]) == g and bool(candidate[d][n])]
        budget = sum(1 for d, _ in edges if d not in window)
        ranked = sorted(edges, key=lambda e: (repeats(*e), -abs(adv[e[0]][e[1]]), e[0], e[1]))
        chosen |= set(ranked[:budget])
    return chosen


@pytest.mark.parametrize("mode", ["depthwise", "sibling"])
@pytest.mark.parametrize("extra", [{}, {"ignore_last": True}, {"width_pruning": "extreme", "extreme_b": 1}])
@pytest.mark.parametrize("iteration", [0, 3])
def test_informative_selection_matches_brute_force_ranking(mode, extra, iteration):
    topo, _, logp, leaves = random_tree(11 + iteration, values=(0.0, 0.25, 0.5, 0.75, 1.0))
    pruning = DepthPruning(size=2, slide_every=2)
    base = dict(skip_zero_advantage=False, depth_pruning=pruning, **extra)
    window_cfg = MethodConfig(tree=TREE, advantage=AdvantageSpec(mode=mode), selection=SelectionSpec(**base))
    info_cfg = MethodConfig(tree=TREE, advantage=AdvantageSpec(mode=mode),
                            selection=SelectionSpec(**base, edges="informative"))
    free_cfg = MethodConfig(tree=TREE, selection=SelectionSpec(**{**base, "depth_pruning": None}))
    sde = [True] * TREE.steps
    scores = score_topology(topo.parent, topo.group, topo.num_groups, sde, logp, iteration, leaves, window_cfg)
    fused = [f.float() for f in scores.fused.reward]
    args = (topo.parent, topo.group, topo.num_groups, sde, fused, scores.edge_advantage, iteration)
    window = select_edges(window_cfg, *args)
    informative = select_edges(info_cfg, *args)
    candidate = select_edges(free_cfg, *args).mask
    assert informative.trained_edges == window.trained_edges  # the same budget as the window
    assert informative.normaliser_edges == window.normaliser_edges
    got = {(d, n) for d in range(1, TREE.steps + 1) for n in range(topo.parent[d].numel())
           if bool(informative.mask[d][n])}
    expected = brute_informative(topo.parent, topo.group, candidate, set(pruning.window(iteration, TREE)),
                                 scores.edge_advantage)
    assert got == expected
    assert got != {(d, n) for d in range(1, TREE.steps + 1) for n in range(topo.parent[d].numel())
                   if bool(window.mask[d][n])}  # it is a different choice, not the window again


def test_presets_and_validation():
    assert method_config("branchgrpo-sibling").advantage.mode == "sibling"
    informative = method_config("branchgrpo-informative")
    assert informative.selection.edges == "informative"
    assert informative.selection.depth_pruning == method_config("branchgrpo-deppru").selection.depth_pruning
    for k in (3, 4):
        mix, plain = method_config(f"branchgrpo-k{k}-mix").tree, method_config(f"branchgrpo-k{k}").tree
        assert mix.split_plan == plain.split_plan
        assert mix.sde_window == method_config("branchgrpo-mix").tree.sde_window
    with pytest.raises(ConfigError, match="advantage.mode"):
        method_config("branchgrpo", ["advantage.mode=pairwise"])
    with pytest.raises(ConfigError, match="selection.edges"):
        method_config("branchgrpo", ["selection.edges=informative"])
    with pytest.raises(ConfigError, match="selection.edges"):
        method_config("branchgrpo", ["selection.edges=random"])


# ---------------------------------------------------------------------------------------------
# a forest: independent roots per prompt (§6)
# ---------------------------------------------------------------------------------------------


def forest_mix_config() -> MethodConfig:
    """The bench variant as the bench resolves it (benchmarks/variants/forest-mix.yaml)."""
    (preset, overrides), = read_variants(str(FOREST_VARIANT)).values()
    return method_config(preset, overrides)


def test_forest_mix_variant_is_mix_with_four_roots():
    forest, mix = forest_mix_config(), method_config("branchgrpo-mix")
    assert (forest.tree.roots_per_prompt, forest.tree.split_plan) == (4, {3: 2, 6: 2})
    assert forest.tree.sde_window == mix.tree.sde_window and forest.advantage == mix.advantage
    assert forest.tree.leaves_per_prompt() == mix.tree.leaves_per_prompt() == 16


@pytest.mark.parametrize("iteration", [0, 30, 200])
def test_forest_mix_groups_advantages_and_trained_edges_by_brute_force(iteration):
    """The variant's own tree: per prompt 4 roots × 2 × 2 = 16 leaves in one group; an edge before
    the first split is credited with its root's fused reward against the prompt's other roots; the
    trained edges are the window's steps plus the split steps, every node there."""
    config = forest_mix_config()
    spec = config.tree
    topo = build_topology(spec, num_prompts=3)
    gen = torch.Generator().manual_seed(iteration)
    sde = spec.sde_steps(iteration)
    logp = [torch.zeros(topo.parent[0].numel(), dtype=torch.float64)]  # ODE edges have log-prob 0
    logp += [torch.randn(p.numel(), generator=gen, dtype=torch.float64) * float(is_sde)
             for p, is_sde in zip(topo.parent[1:], sde)]
    leaves = torch.rand(topo.parent[-1].numel(), generator=gen, dtype=torch.float64)
    scores = score_topology(topo.parent, topo.group, topo.num_groups, sde, logp, iteration, leaves, config)
    par = [[int(x) for x in p] for p in topo.parent]

    def root_of(d, n):
        while d > 0:
            d, n = d - 1, par[d][n]
        return n

    leaf_prompt = [root_of(spec.steps, n) // 4 for n in range(len(par[-1]))]
    assert [leaf_prompt.count(g) for g in range(3)] == [16, 16, 16]
    assert [int(g) for g in topo.group[-1]] == leaf_prompt  # all of a prompt's leaves form one group
    fused = [[float(x) for x in f] for f in fuse_rewards(topo.parent, logp, leaves, beta=1.0).reward]
    clip = config.advantage.advantage_clip
    for d in (1, 2, 3):  # chains above the first split: one node per root
        for n in range(len(par[d])):
            root = root_of(d, n)
            pool = [fused[0][r] for r in range(len(par[0])) if r // 4 == root // 4]
            z = (fused[0][root] - statistics.fmean(pool)) / (statistics.stdev(pool) + 1e-8)
            assert float(scores.edge_advantage[d][n]) == pytest.approx(max(-clip, min(clip, z)), rel=1e-5, abs=1e-6)
    fused32 = [f.float() for f in scores.fused.reward]
    chosen = select_edges(config, topo.parent, topo.group, topo.num_groups, sde, fused32, scores.edge_advantage,
                          iteration)
    first = spec.sde_window.first_step(iteration, spec.steps)
    trained_steps = set(range(first, first + spec.sde_window.size)) | {3, 6}
    for d in range(1, spec.steps + 1):
        expected = (d - 1) in trained_steps
        assert bool(chosen.mask[d].all()) == expected and bool(chosen.mask[d].any()) == expected, d
    nodes_at = {d: len(par[d]) for d in range(spec.steps + 1)}
    assert chosen.trained_edges == sum(nodes_at[s + 1] for s in trained_steps)
