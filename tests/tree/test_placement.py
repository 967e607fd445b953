"""Adaptive split placement (docs/beyond-the-paper.md §4): the variance shares against a brute-force
walk over explicit leaves and ancestors with ``statistics``; the law of total variance (one root:
the shares of all splits sum to 1); rollout calls against ``branchgrpo plan``'s numbers; the move
rule case by case; the config's refusals; the trainer moving a split and resuming it exactly."""

from __future__ import annotations

import json
import random
import statistics

import pytest
import torch
from test_trainer import brightness_reward, tiny_generator

from branchgrpo.config import ConfigError
from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import Trainer
from branchgrpo.tree.placement import SplitPlacement, next_split_plan, rollout_calls, split_variance_shares
from branchgrpo.tree.rollout import build_topology
from branchgrpo.tree.spec import TreeSpec

TREES = [TreeSpec(steps=7, split_plan={2: 3, 4: 2}, roots_per_prompt=1),
         TreeSpec(steps=7, split_plan={0: 2, 3: 2, 6: 2}, roots_per_prompt=2)]


def brute_shares(parent, group, leaves, steps):
    """Per split step, the sum over groups with leaf variance of
    mean over the group's leaves of (m(ancestor at s+1) − m(ancestor at s))² / pvariance(group)."""
    par = [[int(x) for x in p] for p in parent]
    depth = len(par) - 1

    def ancestor(leaf, d):
        node = leaf
        for e in range(depth, d, -1):
            node = par[e][node]
        return node

    def mean_under(d, node):
        return statistics.fmean(leaves[i] for i in range(len(leaves)) if ancestor(i, d) == node)

    out, live = [0.0] * len(steps), 0
    for g in sorted({int(x) for x in group[-1]}):
        members = [i for i in range(len(leaves)) if int(group[-1][i]) == g]
        var = statistics.pvariance([leaves[i] for i in members])
        if var <= 1e-12:
            continue
        live += 1
        for j, s in enumerate(steps):
            jumps = [(mean_under(s + 1, ancestor(i, s + 1)) - mean_under(s, ancestor(i, s))) ** 2 for i in members]
            out[j] += statistics.fmean(jumps) / var
    return out, live


@pytest.mark.parametrize("tree", TREES, ids=["one-root", "two-roots"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variance_shares_match_brute_force(tree, seed):
    topo = build_topology(tree, 3)
    rng = random.Random(seed)
    n = topo.parent[-1].numel()
    leaves = [rng.choice([0.0, 0.25, 1.0]) for _ in range(n)]
    leaves[: n // 3] = [0.5] * (n // 3)  # the first prompt's leaves all tie: no variance, left out
    steps = sorted(tree.split_plan)
    got, live = split_variance_shares(topo.parent, topo.group, torch.tensor(leaves), topo.num_groups, steps)
    expected, expected_live = brute_shares(topo.parent, topo.group, leaves, steps)
    assert live == expected_live == 2
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if tree.roots_per_prompt == 1:  # law of total variance: every unit of variance is decided at some split
        assert float(got.sum()) == pytest.approx(live, rel=1e-12)
    else:  # part of it is decided between the roots
        assert float(got.sum()) < live


def test_a_split_that_decides_everything_takes_the_whole_share():
    """Leaves differ only by the choice at step 4: its share is 1, step 2's is 0."""
    tree = TREES[0]
    topo = build_topology(tree, 1)
    depth5 = topo.parent[5]  # depth-5 node -> its depth-4 node; the step-4 split made depth 5
    child_rank = [0] * depth5.numel()
    seen = {}
    for i, p in enumerate(depth5.tolist()):
        child_rank[i] = seen.get(p, 0)
        seen[p] = child_rank[i] + 1
    leaf_to_5 = topo.parent[-1].tolist()  # depth 7 -> 6
    leaves = [float(child_rank[topo.parent[6][leaf_to_5[i]]]) for i in range(topo.parent[-1].numel())]
    got, live = split_variance_shares(topo.parent, topo.group, torch.tensor(leaves), 1, [2, 4])
    assert live == 1 and got.tolist() == pytest.approx([0.0, 1.0], abs=1e-12)


@pytest.mark.parametrize("plan,calls", [({0: 2, 3: 2, 6: 2, 9: 2}, 203), ({0: 3, 3: 3, 6: 3, 9: 3}, 928),
                                        ({0: 4, 3: 4, 6: 4, 9: 4}, 2813), ({0: 16}, 305)])
def test_rollout_calls_are_plans_numbers(plan, calls):
    """``branchgrpo plan --preset branchgrpo / -k3 / -k4 / dancegrpo``: 203, 928, 2813, 305 per prompt."""
    assert rollout_calls(plan, 20) == calls


def test_rollout_calls_equal_the_built_tree():
    for tree in TREES:
        topo = build_topology(tree, 1)
        assert rollout_calls(tree.split_plan, tree.steps, tree.roots_per_prompt) == sum(
            p.numel() for p in topo.parent[:-1])


PLAN = {0: 2, 3: 2, 6: 2, 9: 2}
CEILING = rollout_calls(PLAN, 20)


def test_the_weakest_split_moves_to_an_untried_neighbour_later_first():
    ema = {0: 0.4, 3: 0.3, 6: 0.2, 9: 0.1}  # step 9 is weakest; 1/4 beats 0.1, and 10 costs fewer calls
    assert next_split_plan(PLAN, ema, 20, CEILING) == {0: 2, 3: 2, 6: 2, 10: 2}


def test_a_move_never_costs_more_calls_than_the_ceiling():
    ema = {0: 0.4, 3: 0.3, 6: 0.2, 9: 0.1, 10: 0.0}  # later is known worse; earlier (8) costs more
    assert rollout_calls({0: 2, 3: 2, 6: 2, 8: 2}, 20) > CEILING
    assert next_split_plan(PLAN, ema, 20, CEILING) == PLAN
    assert next_split_plan(PLAN, ema, 20, 10**6) == {0: 2, 3: 2, 6: 2, 8: 2}


def test_no_move_when_both_neighbours_were_worse_or_taken():
    ema = {0: 0.1, 1: 0.05, 3: 0.3, 6: 0.3, 9: 0.3}
    assert next_split_plan(PLAN, ema, 20, CEILING) == PLAN  # step 0: 1 was worse, -1 does not exist
    tight = {0: 2, 1: 2}
    assert next_split_plan(tight, {0: 0.9, 1: 0.1, 2: 0.05}, 5, 10**6) == tight  # 0 taken, 2 worse


def test_a_known_better_neighbour_wins_and_ties_break_to_the_earlier_weakest():
    ema = {0: 0.2, 3: 0.2, 6: 0.3, 9: 0.3, 4: 0.6, 2: 0.9, 1: 0.1}
    # weakest: steps 0 and 3 tie at 0.2, the earlier (0) is taken; its free neighbour 1 (0.1) is worse
    assert next_split_plan(PLAN, ema, 20, 10**6) == PLAN
    ema[0] = 0.25  # now 3 is weakest: 4 (0.6) and 2 (0.9) both beat it, 2 the more
    assert next_split_plan(PLAN, ema, 20, 10**6) == {0: 2, 2: 2, 6: 2, 9: 2}


def test_nothing_moves_before_every_split_was_seen():
    assert next_split_plan(PLAN, {0: 0.1}, 20, CEILING) == PLAN


def test_placement_state_round_trips_and_averages():
    state = SplitPlacement(dict(PLAN), CEILING)
    state.observe({0: 0.4, 3: 0.3, 6: 0.2, 9: 0.1}, decay=0.5)
    state.observe({0: 0.2, 3: 0.3, 6: 0.2, 9: 0.3}, decay=0.5)
    assert state.ema == pytest.approx({0: 0.3, 3: 0.3, 6: 0.2, 9: 0.2})
    assert state.move(20) and state.plan == {0: 2, 3: 2, 7: 2, 9: 2} and state.moves == 1
    again = SplitPlacement.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state


@pytest.mark.parametrize("override,field", [
    ("tree.adaptive_splits.every=0", "adaptive_splits.every"),
    ("tree.adaptive_splits.decay=1.0", "adaptive_splits.decay"),
    ("split_plan={}", "adaptive_splits"),
])
def test_bad_settings_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_train_config(None, "branchgrpo", ["tree.adaptive_splits.every=2", override])


def test_mixgrpo_flat_group_cannot_move_its_split():
    with pytest.raises(ConfigError, match="adaptive_splits"):
        load_train_config(None, "mixgrpo", ["tree.adaptive_splits.every=2"])


COMMON = ["run.progress=false", "run.tensorboard=false", "run.dump_tree_every=0", "run.device=cpu",
          "data.prompts_per_iteration=2", "eval.samples_per_prompt=1", "eval.every=0", "tree.steps=6",
          "split_plan=0:2,3:2", "run.checkpoint_every=2", "update.learning_rate=1e-3",
          "tree.adaptive_splits={every: 1, decay: 0.5}"]


def trainer(out, *overrides):
    config = load_train_config(None, "branchgrpo", [f"run.output_dir={out}", *COMMON, *overrides])
    return Trainer(config, model=tiny_generator(), reward=brightness_reward)


def test_trainer_moves_splits_as_the_rule_says_and_resumes_the_placement_exactly(tmp_path):
    straight = trainer(tmp_path / "straight", "run.iterations=4")
    expected = SplitPlacement({0: 2, 3: 2}, rollout_calls({0: 2, 3: 2}, 6))
    plans = []
    for _ in range(4):
        plan = dict(straight.placement.plan)
        metrics = straight.step()
        plans.append(plan)
        assert metrics["nfe/rollout_calls_measured"] == 2 * rollout_calls(plan, 6)  # rolled out with the plan in force
        shares = {s: metrics[f"placement/share_step_{s:02d}"] for s in plan}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)  # one root: the splits share everything
        expected.observe(shares, 0.5)
        expected.move(6)
        assert straight.placement == expected  # the rule, applied to the logged shares
    assert straight.config.method.tree.split_plan == plans[-1]  # the plan the last iteration rolled out with
    # with two splits the weakest holds under half the variance, below the untried prior of 1/2,
    # and either neighbour costs fewer calls: the first iteration moves a split
    assert expected.moves >= 1 and plans[1] != plans[0]

    a, b = tmp_path / "a", tmp_path / "b"
    uninterrupted = trainer(a, "run.iterations=4")
    uninterrupted.run()
    trainer(b, "run.iterations=2").run()
    resumed = trainer(b, "run.iterations=4", "run.resume=auto")
    resumed.run()
    assert resumed.placement == uninterrupted.placement  # plan, moving averages and moves
    rows = {}
    for out in (a, b):
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rows[out] = {r["iteration"]: r for r in lines if "reward_mean" in r}
    for it in (2, 3):
        for key in ("reward_mean", "loss", "placement/moves"):
            assert rows[a][it][key] == pytest.approx(rows[b][it][key], rel=1e-6, abs=1e-9), (it, key)
