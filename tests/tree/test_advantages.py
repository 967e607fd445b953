"""Specification tests for reward fusion (docs/method.md §5, paper Eq. 3) and depth-wise advantages (§6).

Expected values are brute force written plainly here: for every node, walk every leaf up the
parent arrays, collect the leaves below the node and their path log-prob sums, and apply the
softmax / z-score formulas with Python floats. The code under test uses scatter recursions.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from branchgrpo.tree.advantages import depth_advantages, edge_advantages, fuse_rewards
from branchgrpo.tree.presets import method_config
from branchgrpo.tree.rollout import build_topology
from branchgrpo.tree.spec import TreeSpec


# ---------------------------------------------------------------------------------------------
# tree construction and brute force
# ---------------------------------------------------------------------------------------------


def random_irregular_tree(seed: int, depth: int, roots_per_group: list[int], max_children: int = 3):
    """Parent/group arrays of a random tree batch: every node has 1..max_children children.

    Node order at every depth is shuffled, so children of one parent are not contiguous.
    """
    rng = random.Random(seed)
    groups0 = [g for g, r in enumerate(roots_per_group) for _ in range(r)]
    rng.shuffle(groups0)
    parent = [[-1] * len(groups0)]
    group = [groups0]
    for _ in range(depth):
        kids = []
        for p in range(len(parent[-1])):
            kids += [p] * rng.randint(1, max_children)
        rng.shuffle(kids)
        parent.append(kids)
        group.append([group[-1][p] for p in kids])
    return (
        [torch.tensor(p, dtype=torch.long) for p in parent],
        [torch.tensor(g, dtype=torch.long) for g in group],
    )


def random_logp(parent, seed: int, ode_depths=()):
    """Edge log-probs per depth; depth 0 (roots) and ODE depths are 0."""
    gen = torch.Generator().manual_seed(seed)
    out = [torch.zeros(parent[0].numel())]
    for d in range(1, len(parent)):
        lp = torch.randn(parent[d].numel(), generator=gen)
        out.append(torch.zeros_like(lp) if d in ode_depths else lp)
    return out


def leaf_paths(parent, logp):
    """For every leaf: its ancestor at each depth and S(ancestor at d → leaf) at each depth."""
    depth = len(parent) - 1
    paths = []
    for leaf in range(parent[depth].numel()):
        anc = [0] * (depth + 1)
        score = [0.0] * (depth + 1)
        anc[depth] = leaf
        for d in range(depth, 0, -1):
            score[d - 1] = score[d] + float(logp[d][anc[d]])
            anc[d - 1] = int(parent[d][anc[d]])
        paths.append((anc, score))
    return paths


def brute_fusion(parent, logp, leaf_rewards, beta):
    """Per depth lists of (fused reward, entropy, log-partition), by enumeration of leaves."""
    depth = len(parent) - 1
    paths = leaf_paths(parent, logp)
    rewards, entropies, log_zs = [], [], []
    for d in range(depth + 1):
        r_d, h_d, z_d = [], [], []
        for n in range(parent[d].numel()):
            below = [(beta * score[d], float(leaf_rewards[leaf])) for leaf, (anc, score) in enumerate(paths) if anc[d] == n]
            assert below, "every node has a leaf below it"
            peak = max(x for x, _ in below)
            unnorm = [math.exp(x - peak) for x, _ in below]
            total = sum(unnorm)
            w = [u / total for u in unnorm]
            r_d.append(sum(wi * r for wi, (_, r) in zip(w, below)))
            h_d.append(-sum(wi * math.log(wi) for wi in w if wi > 0))
            z_d.append(peak + math.log(total))
        rewards.append(r_d)
        entropies.append(h_d)
        log_zs.append(z_d)
    return rewards, entropies, log_zs


def brute_depth_advantages(fused, group, std_floor=0.0):
    out = []
    for values, grp in zip(fused, group):
        values = [float(v) for v in values]
        grp = [int(g) for g in grp]
        adv = [0.0] * len(values)
        for g in set(grp):
            members = [i for i, gi in enumerate(grp) if gi == g]
            if len(members) == 1:
                continue
            mean = sum(values[i] for i in members) / len(members)
            std = math.sqrt(sum((values[i] - mean) ** 2 for i in members) / (len(members) - 1))
            if std < 1e-6:
                continue
            std = max(std, std_floor)
            for i in members:
                adv[i] = (values[i] - mean) / (std + 1e-8)
        out.append(adv)
    return out


def assert_lists_close(got, expected, rel=1e-9, abs_=1e-9):
    assert len(got) == len(expected)
    for d, (g, e) in enumerate(zip(got, expected)):
        g = [float(x) for x in g]
        assert len(g) == len(e), d
        for i, (a, b) in enumerate(zip(g, e)):
            assert a == pytest.approx(b, rel=rel, abs=abs_), (d, i, a, b)


TREE_CASES = [
    # (seed, depth, roots per group): several groups, several roots per group, uneven branching
    (0, 4, [1]),
    (1, 4, [2, 1, 3]),
    (2, 5, [1, 1]),
    (3, 3, [3, 2]),
]


def regular_uneven_topology():
    """K = 3 and K = 2 mixed, 2 roots per prompt, 3 prompts (a shape of the real engine)."""
    spec = TreeSpec(steps=6, split_plan={0: 3, 2: 2, 4: 3}, roots_per_prompt=2)
    return build_topology(spec, num_prompts=3)


# ---------------------------------------------------------------------------------------------
# fusion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,depth,roots", TREE_CASES)
def test_fuse_beta_zero_is_plain_mean_of_leaves_below(seed, depth, roots):
    parent, _ = random_irregular_tree(seed, depth, roots)
    logp = random_logp(parent, seed)  # nonzero log-probs must not matter at β = 0
    gen = torch.Generator().manual_seed(seed + 100)
    leaf_r = torch.randn(parent[-1].numel(), generator=gen, dtype=torch.float64)
    fused = fuse_rewards(parent, logp, leaf_r, beta=0.0)
    paths = leaf_paths(parent, logp)
    for d in range(depth + 1):
        expected = []
        for n in range(parent[d].numel()):
            below = [float(leaf_r[leaf]) for leaf, (anc, _) in enumerate(paths) if anc[d] == n]
            expected.append(sum(below) / len(below))
        assert_lists_close([fused.reward[d]], [expected], rel=1e-12, abs_=1e-12)
        # uniform weights: entropy = log(#leaves below)
        counts = [sum(1 for anc, _ in paths if anc[d] == n) for n in range(parent[d].numel())]
        assert_lists_close([fused.entropy[d]], [[math.log(c) for c in counts]], rel=1e-10, abs_=1e-10)


@pytest.mark.parametrize("seed,depth,roots", TREE_CASES)
@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0, -1.5])
def test_fuse_general_beta_matches_path_softmax(seed, depth, roots, beta):
    parent, _ = random_irregular_tree(seed, depth, roots)
    logp = random_logp(parent, seed + 1, ode_depths=(2,))  # an ODE depth contributes 0
    gen = torch.Generator().manual_seed(seed + 200)
    leaf_r = torch.rand(parent[-1].numel(), generator=gen, dtype=torch.float64)
    fused = fuse_rewards(parent, logp, leaf_r, beta=beta)
    rewards, entropies, log_zs = brute_fusion(parent, logp, leaf_r, beta)
    assert_lists_close(fused.reward, rewards)
    assert_lists_close(fused.entropy, entropies)
    assert_lists_close(fused.log_partition, log_zs)
    # leaves: their own reward, zero entropy
    assert torch.allclose(fused.reward[-1].double(), leaf_r)
    assert torch.all(fused.entropy[-1] == 0)


def test_fuse_on_engine_topology_k3_k2_mixed():
    topo = regular_uneven_topology()
    logp = random_logp(topo.parent, 9)
    gen = torch.Generator().manual_seed(9)
    leaf_r = torch.randn(topo.parent[-1].numel(), generator=gen, dtype=torch.float64)
    assert leaf_r.numel() == 3 * 2 * 3 * 2 * 3
    for beta in (0.0, 1.0, 4.0):
        fused = fuse_rewards(topo.parent, logp, leaf_r, beta)
        rewards, entropies, _ = brute_fusion(topo.parent, logp, leaf_r, beta)
        assert_lists_close(fused.reward, rewards)
        assert_lists_close(fused.entropy, entropies)


@pytest.mark.parametrize("seed,depth,roots", TREE_CASES)
def test_fuse_large_beta_picks_path_argmax_leaf(seed, depth, roots):
    parent, _ = random_irregular_tree(seed, depth, roots)
    logp = random_logp(parent, seed + 2)
    gen = torch.Generator().manual_seed(seed + 300)
    leaf_r = torch.randn(parent[-1].numel(), generator=gen, dtype=torch.float64)
    beta = 1e7
    fused = fuse_rewards(parent, logp, leaf_r, beta=beta)
    paths = leaf_paths(parent, logp)
    for d in range(depth + 1):
        for n in range(parent[d].numel()):
            below = sorted(((score[d], leaf) for leaf, (anc, score) in enumerate(paths) if anc[d] == n), reverse=True)
            if len(below) > 1:
                # the runner-up's weight is exp(−β·gap); make sure the gap makes it negligible
                assert beta * (below[0][0] - below[1][0]) > 50
            best_leaf = below[0][1]
            assert float(fused.reward[d][n]) == pytest.approx(float(leaf_r[best_leaf]), abs=1e-9)
            assert float(fused.entropy[d][n]) < 1e-9


def test_fuse_float64_output_of_float32_inputs_and_entropy_ratio():
    topo = build_topology(TreeSpec(steps=5, split_plan={0: 2, 2: 3}), num_prompts=4)
    logp = random_logp(topo.parent, 12)
    leaf_r = torch.rand(topo.parent[-1].numel(), generator=torch.Generator().manual_seed(12))  # float32
    fused = fuse_rewards(topo.parent, logp, leaf_r, beta=0.0)
    assert fused.root_entropy_ratio() == pytest.approx(1.0, abs=1e-12)  # uniform weights
    fused = fuse_rewards(topo.parent, logp, leaf_r, beta=2.0)
    _, entropies, _ = brute_fusion(topo.parent, logp, leaf_r, 2.0)
    expected = sum(entropies[0]) / len(entropies[0]) / math.log(6)  # 6 leaves per root
    assert fused.root_entropy_ratio() == pytest.approx(expected, rel=1e-9)
    assert 0.0 < fused.root_entropy_ratio() < 1.0


# ---------------------------------------------------------------------------------------------
# depth-wise advantages
# ---------------------------------------------------------------------------------------------


def _hand_depths():
    """Per-depth values and groups exercising every branch of the z-score rule."""
    group = [
        torch.tensor([0, 1, 2]),  # one node per group: all zero
        torch.tensor([0, 1, 0, 1, 2, 2]),
        torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3]),  # group 3 has a single node
        torch.tensor([1, 0, 1, 0, 1, 0, 2, 2]),
    ]
    fused = [
        torch.tensor([0.3, 0.7, 0.1], dtype=torch.float64),
        torch.tensor([0.1, 0.9, 0.4, 0.2, 0.5, 0.5], dtype=torch.float64),  # group 2 constant
        torch.tensor([0.1, 0.5, 0.2, 1.0, 1.0 + 4e-7, 1.0 - 3e-7, 2.0, 2.0 + 3e-6, 2.0, 7.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0, 3.0, -2.0, 0.5, 0.25, 8.0, -8.0], dtype=torch.float64),
    ]
    return fused, group


def test_depth_advantages_brute_force_z_scores():
    fused, group = _hand_depths()
    adv = depth_advantages(fused, group, num_groups=4)
    assert all(a.dtype == torch.float32 for a in adv)
    expected = brute_depth_advantages(fused, group)
    assert_lists_close(adv, expected, rel=1e-6, abs_=1e-6)
    # the rules the hand data exercises
    assert torch.all(adv[0] == 0)  # |N_d| = 1 per group
    assert adv[1][4] == 0 and adv[1][5] == 0  # constant group
    assert torch.all(adv[2][3:6] == 0)  # std ≈ 3.5e-7 < 1e-6
    assert adv[2][6] != 0  # std ≈ 1.7e-6 ≥ 1e-6 is normalised
    assert adv[2][9] == 0  # single node of group 3
    # two nodes: ±1/√2 whatever the gap
    assert float(adv[3][6]) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert float(adv[3][7]) == pytest.approx(-1 / math.sqrt(2), rel=1e-6)


def test_depth_advantages_unbiased_std_closed_form():
    # values 1, 2, 3, 4: mean 2.5, unbiased std √(5/3)
    adv = depth_advantages([torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)], [torch.zeros(4, dtype=torch.long)], 1)
    std = math.sqrt(5 / 3)
    for i, v in enumerate([1.0, 2.0, 3.0, 4.0]):
        assert float(adv[0][i]) == pytest.approx((v - 2.5) / (std + 1e-8), rel=1e-6)


@pytest.mark.parametrize("seed,depth,roots", TREE_CASES)
def test_fusion_then_advantages_match_brute_force(seed, depth, roots):
    parent, group = random_irregular_tree(seed, depth, roots)
    logp = random_logp(parent, seed + 3)
    gen = torch.Generator().manual_seed(seed + 400)
    leaf_r = torch.rand(parent[-1].numel(), generator=gen, dtype=torch.float64)
    fused = fuse_rewards(parent, logp, leaf_r, beta=1.0)
    adv = depth_advantages(fused.reward, group, num_groups=len(roots))
    rewards, _, _ = brute_fusion(parent, logp, leaf_r, 1.0)
    assert_lists_close(adv, brute_depth_advantages(rewards, group), rel=1e-5, abs_=1e-5)


def test_engine_topology_advantages_match_brute_force():
    topo = regular_uneven_topology()
    logp = random_logp(topo.parent, 5)
    leaf_r = torch.rand(topo.parent[-1].numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fused = fuse_rewards(topo.parent, logp, leaf_r, beta=1.0)
    adv = depth_advantages(fused.reward, topo.group, topo.num_groups)
    rewards, _, _ = brute_fusion(topo.parent, logp, leaf_r, 1.0)
    expected = brute_depth_advantages(rewards, topo.group)
    assert_lists_close(adv, expected, rel=1e-5, abs_=1e-5)
    # two roots per prompt: depth 0 is normalised too (±1/√2), so no depth is all zero
    assert all(bool(torch.any(a != 0)) for a in adv)


def test_depth_advantages_never_mix_groups():
    parent, group = random_irregular_tree(21, 4, [2, 3, 1])
    gen = torch.Generator().manual_seed(21)
    fused = [torch.rand(p.numel(), generator=gen, dtype=torch.float64) for p in parent]
    before = depth_advantages(fused, group, num_groups=3)
    changed = []
    for values, grp in zip(fused, group):
        values = values.clone()
        in_g1 = grp == 1
        values[in_g1] = 100.0 * torch.randn(int(in_g1.sum()), generator=gen, dtype=torch.float64) + 50.0
        changed.append(values)
    after = depth_advantages(changed, group, num_groups=3)
    for d in range(len(parent)):
        for g in (0, 2):
            keep = group[d] == g
            assert torch.equal(before[d][keep], after[d][keep])
        assert_lists_close([after[d]], [brute_depth_advantages([changed[d]], [group[d]])[0]], rel=1e-5, abs_=1e-5)


def test_depth_advantages_group_affine_invariance():
    # z-scores of one group are invariant to a positive affine map of that group's rewards
    group = [torch.tensor([0, 0, 0, 1, 1, 1, 1])]
    base = torch.tensor([0.1, 0.4, 0.2, 0.9, 0.3, 0.5, 0.6], dtype=torch.float64)
    moved = base.clone()
    moved[3:] = 3.0 * moved[3:] - 7.0
    a = depth_advantages([base], group, 2)[0]
    b = depth_advantages([moved], group, 2)[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_depth_advantages_std_floor():
    group = [torch.tensor([0, 0, 1, 1, 1])]
    fused = [torch.tensor([0.500, 0.501, 0.0, 2.0, 4.0], dtype=torch.float64)]
    plain = depth_advantages(fused, group, 2)[0]
    # two nodes with a tiny gap still give ±1/√2 without a floor
    assert float(plain[0]) == pytest.approx(-1 / math.sqrt(2), rel=1e-4)
    floored = depth_advantages(fused, group, 2, std_floor=0.5)[0]
    # group 0: std 7.07e-4 raised to 0.5 → ∓0.0005/0.5; group 1: std 2 > floor, unchanged
    assert float(floored[0]) == pytest.approx(-0.0005 / (0.5 + 1e-8), rel=1e-4)
    assert float(floored[1]) == pytest.approx(0.0005 / (0.5 + 1e-8), rel=1e-4)
    assert torch.allclose(floored[2:], plain[2:])
    assert_lists_close([floored], brute_depth_advantages(fused, group, std_floor=0.5), rel=1e-5, abs_=1e-6)
    # random data against the brute force with a floor in the middle of the stds
    parent, grp = random_irregular_tree(31, 3, [3, 2])
    gen = torch.Generator().manual_seed(31)
    values = [torch.rand(p.numel(), generator=gen, dtype=torch.float64) * (d + 1) for d, p in enumerate(parent)]
    got = depth_advantages(values, grp, 2, std_floor=0.8)
    assert_lists_close(got, brute_depth_advantages(values, grp, std_floor=0.8), rel=1e-5, abs_=1e-5)


def test_edge_advantages_clip():
    gen = torch.Generator().manual_seed(41)
    nodes = [torch.empty(0)] + [(torch.rand(30, generator=gen) - 0.5) * 24 for _ in range(3)]
    for clip in (5.0, 2.5):
        edges = edge_advantages(nodes, clip)
        assert len(edges) == len(nodes)
        for d in range(len(nodes)):
            for i in range(nodes[d].numel()):
                v = float(nodes[d][i])
                expected = clip if v > clip else (-clip if v < -clip else v)
                assert float(edges[d][i]) == expected


def test_outlier_z_score_is_clipped_at_a_max():
    # one outlier among n equal values: z = (n − 1)/√n = 39/√40 ≈ 6.17 > 5; the others −1/√40
    n = 40
    fused = [torch.tensor([1.0] + [0.0] * (n - 1), dtype=torch.float64)]
    node = depth_advantages(fused, [torch.zeros(n, dtype=torch.long)], 1)
    assert float(node[0][0]) == pytest.approx((n - 1) / math.sqrt(n), rel=1e-5)
    edge = edge_advantages(node, 5.0)
    assert float(edge[0][0]) == 5.0
    assert float(edge[0][1]) == pytest.approx(-1 / math.sqrt(n), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# DanceGRPO is a tree shape (docs/method.md §9)
# ---------------------------------------------------------------------------------------------


def test_dancegrpo_edge_advantages_are_group_z_scores():
    cfg = method_config("dancegrpo")
    topo = build_topology(cfg.tree, num_prompts=3)
    leaves = topo.parent[-1].numel()
    assert leaves == 48
    gen = torch.Generator().manual_seed(51)
    leaf_r = torch.rand(leaves, generator=gen, dtype=torch.float64)
    logp = random_logp(topo.parent, 51)
    fused = fuse_rewards(topo.parent, logp, leaf_r, cfg.advantage.fusion_beta)
    node = depth_advantages(fused.reward, topo.group, topo.num_groups, cfg.advantage.std_floor)
    edge = edge_advantages(node, cfg.advantage.advantage_clip)

    # independent: the leaf's prompt by walking up to the root, z-score with numpy (ddof = 1)
    steps = len(topo.parent) - 1
    paths = leaf_paths(topo.parent, logp)
    prompt_of_leaf = [int(topo.group[0][anc[0]]) for anc, _ in paths]
    z = np.zeros(leaves)
    r = leaf_r.numpy()
    for g in range(3):
        idx = [i for i in range(leaves) if prompt_of_leaf[i] == g]
        assert len(idx) == 16
        z[idx] = (r[idx] - r[idx].mean()) / (r[idx].std(ddof=1) + 1e-8)
    for d in range(1, steps + 1):
        assert edge[d].numel() == 48
        seen = set()
        for leaf, (anc, _) in enumerate(paths):
            node_at_d = anc[d]
            seen.add(node_at_d)
            assert float(edge[d][node_at_d]) == pytest.approx(z[leaf], rel=1e-5, abs=1e-6), (d, leaf)
        assert len(seen) == 48  # one leaf per node below the split
    assert torch.all(node[0] == 0)  # one root per prompt
