"""The compressed ODE tail inside the rollout (``tree.ode_tail``, docs/beyond-the-paper.md §7).

Checked against: the plain rollout (keeping every step with the Euler solver must change nothing,
bit for bit), a chain-at-a-time recomputation in float64 with :func:`dpm_solver_pp_step` on the
tail grid, the model's own row count, the planner's NFE and MixGRPO's moving window.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.ode_tail import dpm_solver_pp_step, tail_sigmas
from branchgrpo.tree.nfe import plan
from branchgrpo.tree.presets import method_config
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.scoring import score_tree
from branchgrpo.update import gather_training_edges
from policies import RowCounter, TinyMLPPolicy, tiny_conditioning

DIM, PROMPTS = 8, 3
SMALL_MIX = ["tree.steps=10", "tree.split_plan={0: 2, 2: 2}", "tree.sde_window={size: 2, start: 0, advance_every: 2}"]



@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    return TinyMLPPolicy(dim=DIM, seed=0)


def roll(policy, config, iteration=0, seed=0):
    return rollout(policy, tiny_conditioning(PROMPTS), config.tree, PROMPTS, (DIM,),
                   generator=torch.Generator().manual_seed(seed), iteration=iteration, micro_batch=7)


@torch.no_grad()
def test_keeping_every_step_with_euler_changes_nothing(policy):
    plain = roll(policy, method_config("branchgrpo-mix", SMALL_MIX))
    same = roll(policy, method_config("branchgrpo-mix", [*SMALL_MIX, "tree.ode_tail={keep: 1.0, order: 1}"]))
    assert same.tail_start == 3  # the window covers steps 0-1 and the last split is step 2
    assert torch.equal(same.latents[-1], plain.latents[-1]) and torch.equal(same.leaf_x0, plain.leaf_x0)
    for depth in range(same.tail_start + 1):
        assert torch.equal(same.latents[depth], plain.latents[depth]) and torch.equal(same.logp[depth], plain.logp[depth])
    assert same.rollout_calls == plain.rollout_calls
    # the depths inside the tail were never computed and say so
    for depth in range(same.tail_start + 1, 10):
        assert torch.isnan(same.latents[depth]).all()


@pytest.mark.parametrize("order", [1, 2])
@torch.no_grad()
def test_compressed_tail_against_a_chain_at_a_time_recomputation(policy, order):
    config = method_config("branchgrpo-mix", [*SMALL_MIX, f"tree.ode_tail={{keep: 0.4, order: {order}}}"])
    model = RowCounter(policy)
    tree = roll(model, config)
    first, calls = config.tree.ode_tail_at(0)
    assert (first, calls) == (3, 3)  # 7 tail steps kept at 0.4 -> round(2.8) = 3 calls
    grid = tail_sigmas(10, config.tree.shift, first, calls)
    cond = tiny_conditioning(PROMPTS)["prompt"]
    leaves = tree.latents[first].shape[0]
    for row in range(leaves):
        x = tree.latents[first][row : row + 1].double()
        c = {"prompt": cond[tree.group[first][row : row + 1]]}
        previous = None
        for j in range(calls):
            sigma, sigma_next = float(grid[j]), float(grid[j + 1])
            v = policy(x, torch.full((1,), sigma, dtype=torch.float64), c).double()
            x0 = x - sigma * v
            x = dpm_solver_pp_step(x, x0, sigma, sigma_next, previous if order == 2 else None)
            previous = (x0, sigma)
        assert torch.allclose(tree.latents[-1][row].double(), x[0], atol=1e-5), row
        assert torch.allclose(tree.leaf_x0[row].double(), x0[0], atol=1e-5), row
    # the model ran the frontier once per step before the tail and the leaves once per tail call
    nodes = tree.nodes_per_depth()
    assert sum(model.rows) == sum(nodes[:first]) + leaves * calls == tree.rollout_calls
    # the planner prices the same calls (per prompt)
    assert plan(config).counts.rollout_calls * PROMPTS == tree.rollout_calls


@pytest.mark.parametrize("iteration", [0, 3, 7, 100])
@torch.no_grad()
def test_mixgrpo_flash_tail_follows_the_window(policy, iteration):
    """MixGRPO's window [a, a + w) moves every τ iterations; the tail is every step after it."""
    window = "{size: 3, start: 0, advance_every: 2, stride: 1}"
    config = method_config("mixgrpo-flash", ["tree.steps=12", f"tree.sde_window={window}", "tree.split_plan={0: 4}"])
    a = min(iteration // 2, 12 - 3)
    expected = None if a + 3 >= 12 else (a + 3, max(1, int((12 - a - 3) * 0.4 + 0.5)))
    assert config.tree.ode_tail_at(iteration) == expected
    model = RowCounter(policy)
    tree = roll(model, config, iteration=iteration)
    assert tree.tail_start == (expected[0] if expected else None)
    # one trajectory up to and through the split step a, four chains for the window's other two steps
    per_prompt = (a + 1) + 4 * 2 + (4 * expected[1] if expected else 0)
    assert tree.rollout_calls == sum(model.rows) == PROMPTS * per_prompt


@pytest.mark.parametrize("iteration", [0, 60])
@torch.no_grad()
def test_trained_edges_never_touch_the_uncomputed_depths(policy, iteration):
    config = method_config("branchgrpo-mix-flash", ["tree.steps=12", "tree.sde_window.advance_every=20"])
    tree = roll(policy, config, iteration=iteration)
    rewards = torch.rand(tree.parent[-1].numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scores = score_tree(tree, rewards, config)
    edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
    assert edges.num_edges > 0
    assert torch.isfinite(edges.parent_latents).all() and torch.isfinite(edges.child_latents).all()
    assert scores.nfe.rollout_calls * PROMPTS == tree.rollout_calls


@pytest.mark.parametrize(
    "preset, overrides, field",
    [
        ("branchgrpo", ["tree.ode_tail={keep: 0.4}"], "tree.ode_tail"),
        ("branchgrpo-mix", ["tree.ode_tail.keep=0"], "tree.ode_tail.keep"),
        ("branchgrpo-mix", ["tree.ode_tail.keep=1.5"], "tree.ode_tail.keep"),
        ("branchgrpo-mix", ["tree.ode_tail.order=3"], "tree.ode_tail.order"),
        ("branchgrpo-adaptive-mix", ["tree.ode_tail.keep=0.4"], "tree.ode_tail"),
    ],
)
def test_bad_tails_are_refused_naming_the_field(preset, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        method_config(preset, overrides)


@torch.no_grad()
def test_held_out_sampling_ignores_the_tail(policy):
    """Evaluation measures the model at its normal sampler: the full schedule, whatever the method."""
    from branchgrpo.train.evaluation import sample

    bundle = SimpleNamespace(policy=policy, latent_shape=(DIM,), decode=lambda x: x.clone(),
                             encode_prompts=lambda prompts: tiny_conditioning(len(prompts)))
    images = []
    for preset in ("branchgrpo-mix", "branchgrpo-mix-flash"):
        tree = method_config(preset).tree
        images.append(sample(bundle, ["a", "b"], 3, tree, 0.3, seed=5, micro_batch=16, device=torch.device("cpu"))[0])
    assert torch.equal(images[0], images[1])
