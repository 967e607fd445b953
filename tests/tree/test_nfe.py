"""Specification tests for NFE accounting (docs/method.md §10) and the Mix SDE window (docs/method.md §7.4).

Expected numbers come from the closed form ``nodes at depth d = R · Π_{split steps j < d} K_j``
(rollout calls = Σ_{d<T}, edges = Σ_{d≥1}), from plain-loop counts over the topology arrays, and
from the numbers written in docs/method.md §10.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from branchgrpo.tree.nfe import count_nfe, plan
from branchgrpo.tree.presets import method_config
from branchgrpo.tree.rollout import build_topology
from branchgrpo.tree.selection import EdgeSelection, select_edges
from branchgrpo.tree.spec import MethodConfig, SdeWindow, SelectionSpec, TreeSpec


def closed_form_nodes(steps: int, split_plan: dict[int, int], roots: int) -> list[int]:
    return [roots * math.prod(k for j, k in split_plan.items() if j < d) for d in range(steps + 1)]


def brute_nodes_per_group(topology, group_id: int) -> list[int]:
    return [sum(1 for g in grp.tolist() if g == group_id) for grp in topology.group]


def brute_distinct_parents(parent, mask) -> int:
    seen = set()
    for d in range(1, len(parent)):
        for n in range(parent[d].numel()):
            if bool(mask[d][n]):
                seen.add((d - 1, int(parent[d][n])))
    return len(seen)


SHAPES = [
    # (T, split plan, roots per prompt)
    (20, {0: 2, 3: 2, 6: 2, 9: 2}, 1),
    (20, {0: 3, 3: 3, 6: 3, 9: 3}, 1),
    (20, {0: 4, 3: 4, 6: 4, 9: 4}, 1),
    (20, {0: 3, 5: 2, 11: 4}, 1),
    (20, {0: 3, 5: 2, 11: 4}, 2),
    (12, {2: 2, 7: 3}, 3),
    (20, {0: 16}, 1),
    (20, {}, 16),
    (20, {19: 2}, 1),  # split at the last step
    (6, {0: 2, 5: 4}, 2),
    (1, {0: 2}, 1),
    (1, {0: 3}, 2),
    (1, {}, 4),
    (1, {}, 1),
    (5, {}, 1),  # a single chain: every advantage is 0, nothing is trained
]


@pytest.mark.parametrize("steps,split_plan,roots", SHAPES)
def test_plan_counts_match_closed_form(steps, split_plan, roots):
    config = MethodConfig(tree=TreeSpec(steps=steps, split_plan=dict(split_plan), roots_per_prompt=roots))
    nodes = closed_form_nodes(steps, split_plan, roots)
    result = plan(config)
    counts = result.counts
    assert result.nodes_per_depth == nodes
    assert counts.leaves == nodes[-1]
    assert counts.nodes == sum(nodes)
    assert counts.rollout_calls == sum(nodes[:steps])
    assert counts.edges == sum(nodes[1:])
    assert counts.sde_edges == sum(nodes[1:])  # every step SDE
    # with distinct random rewards, a depth is trained iff the prompt has >= 2 nodes there
    # (one node: A = 0, skipped); a trained depth needs one forward per parent
    trained_depths = [d for d in range(1, steps + 1) if nodes[d] >= 2]
    assert counts.trained_edges == sum(nodes[d] for d in trained_depths)
    assert counts.training_forwards == sum(nodes[d - 1] for d in trained_depths)
    assert result.trained_per_depth == [0] + [nodes[d] if d in trained_depths else 0 for d in range(1, steps + 1)]
    per_leaf = counts.per_leaf()
    assert per_leaf["rollout_calls"] == pytest.approx(sum(nodes[:steps]) / nodes[-1])
    assert per_leaf["edges"] == pytest.approx(sum(nodes[1:]) / nodes[-1])


@pytest.mark.parametrize("steps,split_plan,roots", SHAPES)
def test_topology_arrays_match_closed_form(steps, split_plan, roots):
    tree = TreeSpec(steps=steps, split_plan=dict(split_plan), roots_per_prompt=roots)
    topo = build_topology(tree, num_prompts=3)
    nodes = closed_form_nodes(steps, split_plan, roots)
    for g in range(3):
        assert brute_nodes_per_group(topo, g) == nodes
    # every node at depth d < T has exactly K_d children, all in its own group
    for d in range(1, steps + 1):
        k = split_plan.get(d - 1, 1)
        child_count = [0] * topo.parent[d - 1].numel()
        for n in range(topo.parent[d].numel()):
            p = int(topo.parent[d][n])
            child_count[p] += 1
            assert int(topo.group[d][n]) == int(topo.group[d - 1][p])
        assert child_count == [k] * topo.parent[d - 1].numel()
    assert topo.parent[0].tolist() == [-1] * (3 * roots)


def test_method_section_10_numbers():
    counts = plan(method_config("branchgrpo")).counts
    assert (counts.leaves, counts.rollout_calls, counts.edges, counts.nodes) == (16, 203, 218, 219)
    per_leaf = counts.per_leaf()
    assert per_leaf["rollout_calls"] == 12.6875
    assert per_leaf["edges"] == 13.625
    assert per_leaf["nodes"] == 13.6875  # the paper's "13.68"
    assert counts.trained_edges == 218

    widpru = plan(method_config("branchgrpo-widpru")).counts
    assert widpru.trained_edges == 138  # half of the 160 post-split edges pruned
    assert widpru.per_leaf()["trained_edges"] == 8.625
    assert (widpru.rollout_calls, widpru.edges) == (203, 218)  # selection never changes the rollout

    deppru = plan(method_config("branchgrpo-deppru")).counts
    assert deppru.trained_edges == 138
    assert deppru.per_leaf()["trained_edges"] == 8.625

    dance = plan(method_config("dancegrpo")).counts
    assert (dance.leaves, dance.rollout_calls, dance.edges, dance.nodes) == (16, 305, 320, 321)
    assert dance.trained_edges == 320 and dance.per_leaf()["edges"] == 20.0

    indep = plan(method_config("dancegrpo-indep")).counts
    assert (indep.leaves, indep.rollout_calls, indep.edges) == (16, 320, 320)

    tf = plan(method_config("dancegrpo-tf0.6")).counts
    assert tf.trained_edges == 12 * 16  # 12 of 20 steps (Table 1: NFE πθ 12)

    mix = plan(method_config("mixgrpo")).counts
    assert mix.trained_edges == 4 * 16 and mix.sde_edges == 4 * 16  # w = 4 SDE steps

    assert plan(method_config("branchgrpo-k3")).counts.leaves == 81
    assert plan(method_config("branchgrpo-k4")).counts.leaves == 256


def test_training_forwards_of_pruned_presets_closed_form():
    # parent_top1: all 1+2+2+2+4+4+4+8+8+8 = 43 parents up to the split edges, then one chain per
    # split parent (8) at each of the 10 later steps: 43 + 80 = 123
    assert plan(method_config("branchgrpo-widpru")).counts.training_forwards == 123
    # depth pruning of depths 10..14: parents of depths 1..9 (35) and of depths 15..20 (6·16)
    assert plan(method_config("branchgrpo-deppru")).counts.training_forwards == 35 + 96
    assert plan(method_config("branchgrpo")).counts.training_forwards == 203
    assert plan(method_config("dancegrpo")).counts.training_forwards == 305


@pytest.mark.parametrize("preset", ["branchgrpo-widpru", "branchgrpo-deppru", "dancegrpo-tf0.6", "branchgrpo-k3"])
@pytest.mark.parametrize("prompts", [1, 3])
def test_count_nfe_training_forwards_is_distinct_parents(preset, prompts):
    config = method_config(preset)
    topo = build_topology(config.tree, num_prompts=prompts)
    rng = random.Random(prompts)
    fused = [torch.tensor([rng.random() for _ in range(p.numel())], dtype=torch.float64) for p in topo.parent]
    edge_adv = [torch.tensor([rng.uniform(0.1, 1.0) for _ in range(p.numel())]) for p in topo.parent]
    sde = config.tree.sde_steps(0)
    sel = select_edges(
        config, topo.parent, topo.group, prompts, sde, fused, edge_adv, 0, torch.Generator().manual_seed(prompts)
    )
    counts = count_nfe(topo.parent, sde, sel, prompts)
    trained = sum(int(bool(x)) for m in sel.mask[1:] for x in m)
    assert counts.trained_edges == pytest.approx(trained / prompts)
    assert counts.training_forwards == pytest.approx(brute_distinct_parents(topo.parent, sel.mask) / prompts)
    nodes = [p.numel() for p in topo.parent]
    assert counts.rollout_calls == pytest.approx(sum(nodes[:-1]) / prompts)
    assert counts.edges == pytest.approx(sum(nodes[1:]) / prompts)


def test_count_nfe_random_masks():
    tree = TreeSpec(steps=7, split_plan={0: 3, 2: 2, 5: 3})
    topo = build_topology(tree, num_prompts=2)
    rng = random.Random(0)
    for _ in range(20):
        p_keep = rng.random()
        mask = [torch.zeros(0, dtype=torch.bool)] + [
            torch.tensor([rng.random() < p_keep for _ in range(p.numel())]) for p in topo.parent[1:]
        ]
        sde = [rng.random() < 0.7 for _ in range(7)]
        counts = count_nfe(topo.parent, sde, EdgeSelection(mask=mask), 2)
        assert counts.training_forwards == pytest.approx(brute_distinct_parents(topo.parent, mask) / 2)
        assert counts.trained_edges == pytest.approx(sum(int(m.sum()) for m in mask) / 2)
        sde_edges = sum(topo.parent[d].numel() for d in range(1, 8) if sde[d - 1])
        assert counts.sde_edges == pytest.approx(sde_edges / 2)


# ---------------------------------------------------------------------------------------------
# Mix: the SDE window moves with the training iteration (docs/method.md §7.4)
# ---------------------------------------------------------------------------------------------


def window_first_step(window: SdeWindow, steps: int, iteration: int) -> int:
    """SdeWindow docstring: a = min(start + stride·(k // advance_every), stop − size + 1)."""
    stop = steps - 1 if window.stop is None else window.stop
    moves = iteration // window.advance_every if window.advance_every > 0 else 0
    return min(window.start + window.stride * moves, stop - window.size + 1)


def test_mix_preset_window_literal_steps():
    tree = method_config("branchgrpo-mix").tree
    splits = {0, 3, 6, 9}
    cases = {
        0: {0, 1, 2, 3},
        24: {0, 1, 2, 3},
        25: {1, 2, 3, 4},
        26: {1, 2, 3, 4},
        130: {5, 6, 7, 8},
        399: {15, 16, 17, 18},
        400: {16, 17, 18, 19},
        10_000: {16, 17, 18, 19},  # clamped: the window ends at the last step
    }
    for iteration, window in cases.items():
        sde = tree.sde_steps(iteration)
        assert {i for i, s in enumerate(sde) if s} == window | splits, iteration


@pytest.mark.parametrize(
    "window,steps,split_plan",
    [
        (SdeWindow(size=4, start=0, advance_every=25, stride=1), 20, {0: 2, 3: 2, 6: 2, 9: 2}),
        (SdeWindow(size=3, start=2, advance_every=10, stride=2, stop=12), 15, {}),
        (SdeWindow(size=2, start=1, advance_every=0), 10, {4: 2}),
        (SdeWindow(size=5, start=3, advance_every=7, stride=3, stop=None), 20, {0: 3, 12: 2}),
        (SdeWindow(size=1, start=0, advance_every=1), 6, {2: 2}),
    ],
)
def test_sde_window_matches_docstring_formula(window, steps, split_plan):
    tree = TreeSpec(steps=steps, split_plan=dict(split_plan), sde_window=window)
    config = MethodConfig(tree=tree)
    nodes = closed_form_nodes(steps, split_plan, 1)
    for iteration in [0, 1, 6, 7, 9, 10, 24, 25, 35, 45, 70, 100, 1000]:
        a = window_first_step(window, steps, iteration)
        expected = [(a <= i < a + window.size) or i in split_plan for i in range(steps)]
        assert tree.sde_steps(iteration) == expected, iteration
        # the window stays inside [start, stop]
        stop = steps - 1 if window.stop is None else window.stop
        assert window.start <= a and a + window.size - 1 <= stop
        # the plan trains exactly the SDE edges of the prompt's multi-node depths
        result = plan(config, iteration=iteration)
        sde_edges = sum(nodes[i + 1] for i in range(steps) if expected[i])
        assert result.counts.sde_edges == sde_edges
        assert result.counts.trained_edges == sum(nodes[i + 1] for i in range(steps) if expected[i] and nodes[i + 1] >= 2)
        assert result.counts.rollout_calls == sum(nodes[:steps])  # the rollout never changes


def test_sde_window_literal_custom():
    tree = TreeSpec(steps=15, split_plan={}, sde_window=SdeWindow(size=3, start=2, advance_every=10, stride=2, stop=12))
    literal = {0: {2, 3, 4}, 9: {2, 3, 4}, 10: {4, 5, 6}, 35: {8, 9, 10}, 45: {10, 11, 12}, 500: {10, 11, 12}}
    for iteration, steps in literal.items():
        assert {i for i, s in enumerate(tree.sde_steps(iteration)) if s} == steps


def test_mix_plan_trains_only_sde_edges():
    config = method_config("branchgrpo-mix")
    nodes = closed_form_nodes(20, {0: 2, 3: 2, 6: 2, 9: 2}, 1)
    # iteration 0: window {0,1,2,3} and split steps {6, 9}: 2+2+2+4 + 8 + 16 edges
    assert plan(config, iteration=0).counts.trained_edges == 2 + 2 + 2 + 4 + 8 + 16
    # iteration 400: window {16..19} and split steps {0, 3, 6, 9}
    steps = {0, 3, 6, 9, 16, 17, 18, 19}
    result = plan(config, iteration=400)
    assert result.counts.trained_edges == sum(nodes[i + 1] for i in steps)
    assert result.trained_per_depth == [0] + [nodes[d] if (d - 1) in steps else 0 for d in range(1, 21)]
