"""`mixgrpo` follows MixGRPO's sliding-window schedule (docs/method.md §7.4, §9).

MixGRPO (Li et al. 2025, Algorithm 1) samples a flat group of G images per prompt; only the steps
of a window of ``w`` steps are SDE (and trained), the rest are ODE. The window's left edge ``l``
starts at ``start`` and, every ``advance_every`` training iterations, moves ``stride`` steps, never
past the last start that keeps the whole window inside the schedule (``T − w``). Before the window
every step is ODE, so a group that shares its root noise is one trajectory up to ``l`` and branches
there: G · w trained edges at every iteration, never the step-0 split edges once the window moved.

The reference here simulates that schedule iteration by iteration (no closed form shared with
:class:`~branchgrpo.tree.spec.SdeWindow`), and the rollout is checked on a tiny velocity model
by recomputing every edge by hand: ODE edges are the deterministic Euler step, SDE edges are not.
"""

from __future__ import annotations

import math

import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.tree.nfe import plan
from branchgrpo.tree.presets import list_presets, method_config
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.scoring import score_tree
from policies import RowCounter, TinyMLPPolicy, tiny_conditioning
from test_rollout import hand_log_prob, hand_sigmas, hand_transition


def mixgrpo_window_start(iteration: int, steps: int, size: int, advance_every: int, stride: int, start: int = 0) -> int:
    """MixGRPO's progressive window, simulated: after every ``advance_every``-th completed training
    iteration the left edge moves ``stride`` steps, clamped at the last valid start ``T − w``."""
    left = start
    for done in range(1, iteration + 1):
        if advance_every and done % advance_every == 0:
            left = min(left + stride, steps - size)
    return left


def expected_iteration(iteration: int, steps: int, size: int, advance_every: int, stride: int, group: int,
                       start: int = 0) -> dict:
    """What one prompt's iteration costs under MixGRPO's schedule, counted from the window alone."""
    left = mixgrpo_window_start(iteration, steps, size, advance_every, stride, start)
    window = set(range(left, left + size))
    nodes = [1 if d <= left else group for d in range(steps + 1)]  # one shared ODE trajectory up to l
    return {
        "left": left,
        "sde_steps": sorted(window),
        "nodes_per_depth": nodes,
        "rollout_calls": (left + 1) + group * (steps - left - 1),  # one row per step up to l, then G
        "trained_per_depth": [0] + [group if (d - 1) in window else 0 for d in range(1, steps + 1)],
        "trained_edges": group * size,  # MixGRPO trains every sample at every window step
        # MixGRPO runs G·w training forwards; here the G children of the split at l share one parent
        "training_forwards": group * size - (group - 1),
    }


# (overrides, steps T, window w, advance_every τ, stride, group G, window start)
SCHEDULES = [
    ([], 20, 4, 25, 1, 16, 0),  # the preset as shipped
    (["tree.steps=12", "tree.sde_window={size: 3, start: 1, advance_every: 5, stride: 2}", "tree.split_plan={0: 8}"],
     12, 3, 5, 2, 8, 1),
    (["tree.sde_window.size=5"], 20, 5, 25, 1, 16, 0),  # Table 1's "(20,5)" reading
]
ITERATIONS = [0, 1, 24, 25, 26, 49, 50, 100, 399, 400, 401, 10_000]


@pytest.mark.parametrize("overrides,steps,size,every,stride,group,start", SCHEDULES)
@pytest.mark.parametrize("iteration", ITERATIONS)
def test_plan_follows_mixgrpo_window(overrides, steps, size, every, stride, group, start, iteration):
    config = method_config("mixgrpo", overrides)
    expected = expected_iteration(iteration, steps, size, every, stride, group, start)
    result = plan(config, iteration=iteration).to_json()
    assert result["sde_steps"] == expected["sde_steps"]
    assert result["nodes_per_depth"] == expected["nodes_per_depth"]
    assert result["trained_per_depth"] == expected["trained_per_depth"]
    assert result["trained_edges"] == expected["trained_edges"]
    assert result["training_forwards"] == expected["training_forwards"]
    assert result["rollout_calls"] == expected["rollout_calls"]
    assert result["sde_edges"] == result["trained_edges"]  # nothing outside the window is SDE
    assert config.tree.split_plan_at(iteration) == {expected["left"]: group}


def test_issue_numbers_at_iteration_100():
    """The window sits at steps 4–7: 64 trained edges (was 80: the step-0 split stayed SDE)."""
    result = plan(method_config("mixgrpo"), iteration=100)
    assert result.counts.trained_edges == 64
    assert [i for i, s in enumerate(result.sde_steps) if s] == [4, 5, 6, 7]
    assert result.trained_per_depth[1] == 0


def test_past_the_end_of_the_schedule_the_window_stays_at_the_last_steps():
    config = method_config("mixgrpo")
    last = [plan(config, iteration=k).to_json() for k in (400, 401, 1_000, 100_000)]
    for result in last:
        assert result["sde_steps"] == [16, 17, 18, 19]
        assert result["trained_edges"] == 64
        assert result == {**last[0], "iteration": result["iteration"]}


def test_other_window_presets_keep_their_splits():
    """The rule is opt-in: a tree with several splits (BranchGRPO-Mix) keeps them, always SDE."""
    for name in list_presets():
        tree = method_config(name).tree
        if name not in ("mixgrpo", "mixgrpo-flash"):
            assert not tree.split_at_window_start, name
            assert tree.split_plan_at(100) == tree.split_plan
    mix = method_config("branchgrpo-mix").tree
    assert [i for i, s in enumerate(mix.sde_steps(100)) if s] == [0, 3, 4, 5, 6, 7, 9]


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["tree.sde_window=null"], "tree.split_at_window_start"),
        (["tree.split_plan={0: 4, 3: 2}"], "tree.split_at_window_start"),
        (["tree.split_plan={}", "tree.roots_per_prompt=16"], "tree.split_at_window_start"),
    ],
)
def test_split_at_window_start_needs_a_window_and_one_split(overrides, field):
    with pytest.raises(ConfigError, match=field):
        method_config("mixgrpo", overrides)


# ---------------------------------------------------------------------------------------------
# the real rollout on a tiny velocity model
# ---------------------------------------------------------------------------------------------

DIM, STEPS, SIZE, EVERY, GROUP, PROMPTS = 8, 8, 3, 2, 4, 2



@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    return TinyMLPPolicy(dim=DIM, seed=0)


@pytest.mark.parametrize("iteration", [0, 1, 2, 5, 9, 100])
@torch.no_grad()
def test_rollout_is_stochastic_exactly_in_the_window(policy, iteration):
    window = f"{{size: {SIZE}, start: 0, advance_every: {EVERY}, stride: 1}}"
    overrides = [f"tree.steps={STEPS}", f"tree.sde_window={window}", f"tree.split_plan={{0: {GROUP}}}"]
    config = method_config("mixgrpo", overrides)
    expected = expected_iteration(iteration, STEPS, SIZE, EVERY, 1, GROUP)
    cond = tiny_conditioning(PROMPTS)
    model = RowCounter(policy)
    tree = rollout(model, cond, config.tree, PROMPTS, (DIM,), generator=torch.Generator().manual_seed(iteration),
                   iteration=iteration, micro_batch=1024)
    assert tree.nodes_per_depth() == [PROMPTS * n for n in expected["nodes_per_depth"]]
    assert model.rows == [PROMPTS * n for n in expected["nodes_per_depth"][:-1]]  # one call per step
    assert tree.rollout_calls == PROMPTS * expected["rollout_calls"]

    sigmas = hand_sigmas(STEPS, config.tree.shift)
    stochastic = []
    for step in range(STEPS):
        parents = tree.latents[step][tree.parent[step + 1]]
        prompt = tree.group[step + 1]
        velocity = policy(parents, torch.full((parents.shape[0],), sigmas[step]), {"prompt": cond["prompt"][prompt]})
        m_ode, mu, std, _ = hand_transition(parents, velocity, sigmas[step], sigmas[step + 1], config.tree.eta)
        child = tree.latents[step + 1].double()
        is_ode = torch.allclose(child, m_ode, atol=1e-5, rtol=0)
        if is_ode:
            assert torch.all(tree.logp[step + 1] == 0)
        else:
            # an SDE edge: Gaussian noise around the SDE mean, its log-prob as the engine reports it
            assert (child - m_ode).abs().max() > 100 * 1e-5
            for row in range(child.shape[0]):
                lp = hand_log_prob(child[row], mu[row], std, config.tree.logprob_reduction)
                assert math.isclose(float(tree.logp[step + 1][row]), lp, rel_tol=1e-4, abs_tol=1e-4)
        stochastic.append(not is_ode)
    assert [i for i, s in enumerate(stochastic) if s] == expected["sde_steps"]
    # the group branches at the window's first step: its children are distinct samples
    left = expected["left"]
    first = tree.latents[left + 1].view(PROMPTS, GROUP, DIM)
    assert torch.cdist(first[0], first[0]).add(torch.eye(GROUP) * 1e9).min() > 1e-3

    leaf_rewards = torch.rand(tree.parent[-1].numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scores = score_tree(tree, leaf_rewards, config)
    assert [int(m.sum()) for m in scores.selection.mask] == [PROMPTS * n for n in expected["trained_per_depth"]]
    assert scores.nfe.trained_edges == expected["trained_edges"]
    assert scores.nfe.training_forwards == expected["training_forwards"]
