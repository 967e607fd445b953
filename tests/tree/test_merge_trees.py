"""merge_trees: the rollouts of consecutive prompt chunks, merged, are the batched rollout."""

import pytest
import torch
from policies import tiny_flux, tiny_flux_conditioning

from branchgrpo.tree.rollout import RolloutTree, build_topology, merge_trees, rollout
from branchgrpo.tree.spec import SdeWindow, TreeSpec

PROMPTS = 3


def generators(groups):
    return [torch.Generator().manual_seed(1000 + g) for g in groups]


def roll(policy, conditioning, spec, shape, groups, iteration=0):
    """The rollout of prompt groups ``groups`` (a range), each with its own generator.

    ``micro_batch=1``: every row goes through the model alone, so a row's velocity cannot depend
    on which other rows share its call (the tiny FLUX on MKL differs by ~1e-7 with other batch mates).
    """
    rows = torch.arange(groups.start, groups.stop)
    return rollout(
        policy, {k: v[rows] for k, v in conditioning.items()}, spec, len(rows), shape,
        generator=generators(groups), iteration=iteration, micro_batch=1, keep_node_x0=True,
    )


def assert_same_tree(merged: RolloutTree, batched: RolloutTree) -> None:
    assert merged.num_groups == batched.num_groups
    assert merged.rollout_calls == batched.rollout_calls
    assert merged.sde == batched.sde and merged.iteration == batched.iteration and merged.spec == batched.spec
    assert torch.equal(merged.sigmas, batched.sigmas)
    for name in ("parent", "group", "latents", "logp", "node_x0"):
        ours, theirs = getattr(merged, name), getattr(batched, name)
        assert len(ours) == len(theirs), name
        for depth, (a, b) in enumerate(zip(ours, theirs)):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}[{depth}] differs"
    assert torch.equal(merged.leaf_x0, batched.leaf_x0)


SPECS = {
    "two-roots-two-splits": TreeSpec(steps=4, split_plan={0: 2, 2: 2}, roots_per_prompt=2),
    "sde-window": TreeSpec(steps=5, split_plan={1: 2, 3: 2}, sde_window=SdeWindow(size=2)),
}


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_merged_chunk_rollouts_are_the_batched_rollout_bit_for_bit(spec_name):
    spec = SPECS[spec_name]
    policy, info = tiny_flux(seed=0)
    conditioning = tiny_flux_conditioning(PROMPTS)
    shape = (info["tokens"], info["channels"])
    batched = roll(policy, conditioning, spec, shape, range(PROMPTS), iteration=3)
    for chunks in ([1, 1, 1], [2, 1], [1, 2]):
        parts, start = [], 0
        for size in chunks:
            parts.append(roll(policy, conditioning, spec, shape, range(start, start + size), iteration=3))
            start += size
        assert_same_tree(merge_trees(parts), batched)


def test_merged_topology_is_build_topology_of_all_groups():
    """The layout alone, against :func:`build_topology` (no model involved)."""
    spec = TreeSpec(steps=4, split_plan={0: 3, 1: 2}, roots_per_prompt=2)
    policy, info = tiny_flux(seed=0)
    conditioning = tiny_flux_conditioning(3)
    shape = (info["tokens"], info["channels"])
    merged = merge_trees([roll(policy, conditioning, spec, shape, range(g, g + 1)) for g in range(3)])
    expected = build_topology(spec, 3)
    for depth in range(spec.steps + 1):
        assert torch.equal(merged.parent[depth], expected.parent[depth])
        assert torch.equal(merged.group[depth], expected.group[depth])
    # every non-root node's parent is a node of the same group
    for depth in range(1, spec.steps + 1):
        assert torch.equal(merged.group[depth - 1][merged.parent[depth]], merged.group[depth])


def test_merging_trees_of_different_iterations_is_refused():
    spec = TreeSpec(steps=4, split_plan={0: 2}, sde_window=SdeWindow(size=1))
    policy, info = tiny_flux(seed=0)
    conditioning = tiny_flux_conditioning(2)
    shape = (info["tokens"], info["channels"])
    first = roll(policy, conditioning, spec, shape, range(0, 1), iteration=0)
    later = roll(policy, conditioning, spec, shape, range(1, 2), iteration=1)
    with pytest.raises(ValueError, match="different specs, iterations or schedules"):
        merge_trees([first, later])
    with pytest.raises(ValueError, match="at least one tree"):
        merge_trees([])
