"""Frontier-batched rollout of branching trees (docs/method.md §4).

A batch of trees is held as flat tensors per depth: ``parent[d]`` indexes depth ``d − 1``,
``group[d]`` is the prompt (advantage group) of each node. At every step the whole frontier of
all trees goes through the model in micro-batches; nodes are never visited one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from branchgrpo.models.protocol import Conditioning, VelocityModel, select_conditioning
from branchgrpo.ode_tail import dpm_solver_pp_step, tail_sigmas
from branchgrpo.sde import correlated_split_noise, gaussian_log_prob, sigma_schedule
from branchgrpo.transitions import get_transition
from branchgrpo.tree.spec import TreeSpec


@dataclass
class TreeTopology:
    """Shape of a batch of trees: per-depth parent indices and group ids (depth 0 = roots)."""

    parent: list[Tensor]  # parent[d]: [N_d] long, index into depth d − 1 (−1 for roots)
    group: list[Tensor]  # group[d]: [N_d] long, prompt / advantage-group id
    num_groups: int

    @property
    def steps(self) -> int:
        return len(self.parent) - 1

    def nodes_per_depth(self) -> list[int]:
        return [int(p.numel()) for p in self.parent]


def build_topology(spec: TreeSpec, num_prompts: int = 1, iteration: int = 0) -> TreeTopology:
    """Parent/group arrays of ``num_prompts`` groups of ``spec.roots_per_prompt`` trees each,
    split as :meth:`TreeSpec.split_plan_at` says at training ``iteration``.

    Children of one parent are contiguous; their order is the order of the parents.
    """
    group = torch.arange(num_prompts).repeat_interleave(spec.roots_per_prompt)
    parents = [torch.full((group.numel(),), -1, dtype=torch.long)]
    groups = [group]
    for k in spec.branching(iteration):
        parent = torch.arange(groups[-1].numel()).repeat_interleave(k)
        parents.append(parent)
        groups.append(groups[-1][parent])
    return TreeTopology(parent=parents, group=groups, num_groups=num_prompts)


@dataclass
class RolloutTree(TreeTopology):
    """A sampled batch of trees: topology plus latents and edge log-probs per depth."""

    spec: TreeSpec
    iteration: int
    sigmas: Tensor  # [T + 1] float64 schedule
    sde: list[bool]  # sde[i]: whether step i (edges into depth i + 1) is stochastic
    latents: list[Tensor]  # latents[d]: [N_d, ...] float32
    logp: list[Tensor]  # logp[d]: [N_d] float32 log-prob of the edge into each node (0: root, ODE)
    leaf_x0: Tensor  # [N_T, ...] x̂0 predicted at the last step from each leaf's parent
    node_x0: list[Tensor] | None  # node_x0[d]: x̂0 predicted at node d (d < T), if kept
    rollout_calls: int  # denoiser rows evaluated (docs/method.md §10: F)
    # the compressed ODE tail (TreeSpec.ode_tail): its first step and σ grid. The depths strictly
    # between that step's node and the leaves were never computed: their latents (and node_x0) are NaN
    tail_start: int | None = None
    tail_sigmas: Tensor | None = None

    def step_of_depth(self, depth: int) -> int:
        """Step index of the edge into a node at ``depth`` (= depth − 1)."""
        return depth - 1


def evaluate_frontier(
    model: VelocityModel,
    latents: Tensor,
    sigma: float,
    prompt_index: Tensor,
    conditioning: Conditioning,
    micro_batch: int,
) -> Tensor:
    """Velocities for a whole frontier ``[N, ...]`` at one σ, in micro-batches of rows."""
    outputs = []
    for start in range(0, latents.shape[0], micro_batch):
        rows = slice(start, start + micro_batch)
        batch = latents[rows]
        sigmas = torch.full((batch.shape[0],), float(sigma), dtype=torch.float32, device=batch.device)
        cond = select_conditioning(conditioning, prompt_index[rows])
        outputs.append(model(batch, sigmas, cond).float())
    return torch.cat(outputs, dim=0)


class NoiseSource:
    """``N(0, I)`` draws for rows that are grouped by prompt (groups are contiguous at every depth).

    With one generator all rows come from it. With one generator per group, each group's rows come
    from its own generator, so a group's tree does not depend on which other groups share the batch:
    a prompt gives the same tree whether it is rolled out alone, with others, or on another rank.
    """

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator], num_groups: int):
        self.generators = list(generator) if isinstance(generator, (list, tuple)) else None
        self.generator = generator if self.generators is None else self.generators[0]
        if self.generators is not None and len(self.generators) != num_groups:
            raise ValueError(f"got {len(self.generators)} generators for {num_groups} prompt groups; pass one per group")

    def randn(self, rows_per_group: Tensor, shape: tuple[int, ...], device) -> Tensor:
        """``[sum(rows_per_group), *shape]`` noise, group by group."""
        if self.generators is None:
            total = int(rows_per_group.sum())
            return torch.randn((total, *shape), generator=self.generator, device=self.generator.device).to(device)
        parts = [
            torch.randn((int(n), *shape), generator=g, device=g.device).to(device)
            for g, n in zip(self.generators, rows_per_group.tolist())
        ]
        return torch.cat(parts, dim=0)

    def shared(self, rows: int, shape: tuple[int, ...], device) -> Tensor:
        """One draw of ``rows`` shared by every group (``shared_root_noise``)."""
        return torch.randn((rows, *shape), generator=self.generator, device=self.generator.device).to(device)


def _step_noise(
    spec: TreeSpec, parent_groups: Tensor, k: int, num_groups: int, shape: tuple[int, ...], noise: NoiseSource, device
) -> Tensor:
    """``ξ`` for all children of one step, ``[num_parents · k, ...]`` (docs/method.md §4)."""
    parents_per_group = torch.bincount(parent_groups, minlength=num_groups)
    if k == 1 or spec.split_noise == "independent":
        return noise.randn(parents_per_group * k, shape, device)
    if spec.split_noise == "legacy_independent":
        # The authors' code: independent noise times s, log-prob still under the unscaled std.
        return spec.split_noise_scale * noise.randn(parents_per_group * k, shape, device)
    shared = noise.randn(parents_per_group, shape, device).repeat_interleave(k, dim=0)
    own = noise.randn(parents_per_group * k, shape, device)
    return correlated_split_noise(shared, own, spec.split_noise_scale)


def _integrate_tail(
    model: VelocityModel, x: Tensor, sigmas: Tensor, prompt_index: Tensor, conditioning: Conditioning,
    micro_batch: int, order: int, transition, eta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the ODE tail from ``x`` (the whole frontier, one chain per row) over ``sigmas``: order 1
    is the rollout's own ODE transition on that grid, order 2 DPM-Solver++(2M) (:mod:`branchgrpo.ode_tail`).
    Returns the final latents, the x̂0 of the last call and the x̂0 of the first."""
    previous: tuple[Tensor, float] | None = None
    first_x0 = last_x0 = x
    for j in range(sigmas.numel() - 1):
        sigma, sigma_next = float(sigmas[j]), float(sigmas[j + 1])
        velocity = evaluate_frontier(model, x, sigma, prompt_index, conditioning, micro_batch)
        mean, _, x0 = transition(x, velocity, sigma, sigma_next, eta, sde=False)
        x = mean if order == 1 else dpm_solver_pp_step(x.float(), x0, sigma, sigma_next, previous)
        previous = (x0, sigma)
        if j == 0:
            first_x0 = x0
        last_x0 = x0
    return x, last_x0, first_x0


@torch.no_grad()
def rollout(
    model: VelocityModel,
    conditioning: Conditioning,
    spec: TreeSpec,
    num_prompts: int,
    latent_shape: tuple[int, ...],
    *,
    generator: torch.Generator | Sequence[torch.Generator],
    iteration: int = 0,
    micro_batch: int = 64,
    device: torch.device | str | None = None,
    keep_node_x0: bool = False,
) -> RolloutTree:
    """Sample one tree group per prompt; every frontier is evaluated batched (docs/method.md §4).

    Args:
        model: velocity model (see :class:`VelocityModel`); conditioning: rows per prompt.
        latent_shape: shape of one latent (without batch dim).
        generator: source of all noise (one, or one per prompt group; see :class:`NoiseSource`);
            the same seeds give the same trees whatever ``micro_batch`` is.
        iteration: training iteration (moves the Mix SDE window, and with it the split of a
            ``split_at_window_start`` tree).
    """
    noise = NoiseSource(generator, num_prompts)
    device = torch.device(device) if device is not None else noise.generator.device
    topology = build_topology(spec, num_prompts, iteration)
    sigmas = sigma_schedule(spec.steps, spec.shift)
    sde = spec.sde_steps(iteration)
    branching = spec.branching(iteration)
    transition = get_transition(spec.transition)
    tail = spec.ode_tail_at(iteration)
    grid = tail_sigmas(spec.steps, spec.shift, tail[0], tail[1]) if tail is not None else None

    roots = topology.parent[0].numel()
    shape = tuple(latent_shape)
    if spec.shared_root_noise:
        x = noise.shared(spec.roots_per_prompt, shape, device).repeat(num_prompts, *([1] * len(shape)))
    else:
        x = noise.randn(torch.bincount(topology.group[0], minlength=num_prompts), shape, device)
    latents = [x.float()]
    logps = [torch.zeros(roots, device=device)]
    node_x0: list[Tensor] = []
    rollout_calls = 0
    leaf_x0 = x
    for i in range(spec.steps):
        x = latents[i]
        if tail is not None and i == tail[0]:
            # every node from here is a chain to its leaf (no split, no SDE step)
            final, leaf_x0, first_x0 = _integrate_tail(model, x, grid, topology.group[i], conditioning, micro_batch,
                                                       spec.ode_tail.order, transition, spec.eta)
            rollout_calls += x.shape[0] * tail[1]
            skipped = torch.full_like(x, float("nan"))
            for depth in range(i + 1, spec.steps + 1):
                latents.append(final if depth == spec.steps else skipped)
                logps.append(torch.zeros(x.shape[0], device=device))
            if keep_node_x0:
                node_x0 += [first_x0] + [skipped] * (spec.steps - 1 - i)
            break
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        velocity = evaluate_frontier(
            model, x, sigma, topology.group[i], conditioning, micro_batch
        )
        rollout_calls += x.shape[0]
        mean, std, x0_pred = transition(x, velocity, sigma, sigma_next, spec.eta, sde=sde[i])
        parent = topology.parent[i + 1].to(device)
        child_mean = mean.repeat_interleave(branching[i], dim=0) if branching[i] > 1 else mean
        if sde[i]:
            xi = _step_noise(spec, topology.group[i], branching[i], num_prompts, shape, noise, device)
            child = child_mean + std * xi
            logp = gaussian_log_prob(child, child_mean, std, spec.logprob_reduction)
        else:
            child = child_mean
            logp = torch.zeros(child.shape[0], device=device)
        latents.append(child)
        logps.append(logp)
        if keep_node_x0:
            node_x0.append(x0_pred)
        if i == spec.steps - 1:
            leaf_x0 = x0_pred[parent]
    return RolloutTree(
        parent=topology.parent,
        group=topology.group,
        num_groups=num_prompts,
        spec=spec,
        iteration=iteration,
        sigmas=sigmas,
        sde=sde,
        latents=latents,
        logp=logps,
        leaf_x0=leaf_x0,
        node_x0=node_x0 if keep_node_x0 else None,
        rollout_calls=rollout_calls,
        tail_start=tail[0] if tail is not None else None,
        tail_sigmas=grid,
    )


def merge_trees(trees: Sequence[RolloutTree]) -> RolloutTree:
    """One :class:`RolloutTree` of the prompt groups of ``trees``, in order (chunk ``j``'s groups
    follow chunk ``j − 1``'s): per depth, nodes are concatenated, parents and groups offset.

    A batched rollout keeps every group's nodes contiguous at every depth, so merging the rollouts
    of consecutive prompt chunks (each with its groups' own generators) gives the batched rollout's
    layout; its values too when the model's rows do not depend on their batch mates.
    """
    if not trees:
        raise ValueError("merge_trees needs at least one tree")
    first = trees[0]
    for tree in trees[1:]:
        if (tree.spec != first.spec or tree.iteration != first.iteration or tree.sde != first.sde
                or not torch.equal(tree.sigmas, first.sigmas) or tree.tail_start != first.tail_start):
            raise ValueError("merge_trees: the trees come from different specs, iterations or schedules")
        if (tree.node_x0 is None) != (first.node_x0 is None):
            raise ValueError("merge_trees: some trees kept node_x0 and some did not")
    depths = len(first.parent)
    parents, groups = [], []
    for d in range(depths):
        node_offset, group_offset = 0, 0
        parent_parts, group_parts = [], []
        for tree in trees:
            parent = tree.parent[d]
            parent_parts.append(parent if d == 0 else parent + node_offset)
            group_parts.append(tree.group[d] + group_offset)
            node_offset += int(tree.parent[d - 1].numel()) if d > 0 else 0
            group_offset += tree.num_groups
        parents.append(torch.cat(parent_parts))
        groups.append(torch.cat(group_parts))
    node_x0 = None
    if first.node_x0 is not None:
        node_x0 = [torch.cat([tree.node_x0[d] for tree in trees]) for d in range(len(first.node_x0))]
    return RolloutTree(
        parent=parents,
        group=groups,
        num_groups=sum(tree.num_groups for tree in trees),
        spec=first.spec,
        iteration=first.iteration,
        sigmas=first.sigmas,
        sde=list(first.sde),
        latents=[torch.cat([tree.latents[d] for tree in trees]) for d in range(depths)],
        logp=[torch.cat([tree.logp[d] for tree in trees]) for d in range(depths)],
        leaf_x0=torch.cat([tree.leaf_x0 for tree in trees]),
        node_x0=node_x0,
        rollout_calls=sum(tree.rollout_calls for tree in trees),
        tail_start=first.tail_start,
        tail_sigmas=first.tail_sigmas,
    )


def split_noise_correlation(split_noise_scale: float) -> float:
    """Sibling correlation ``1/(1 + s²)`` of the correlated split noise."""
    return 1.0 / (1.0 + split_noise_scale**2)


__all__ = [
    "TreeTopology",
    "RolloutTree",
    "build_topology",
    "evaluate_frontier",
    "rollout",
    "merge_trees",
    "NoiseSource",
    "split_noise_correlation",
]
