"""The policy update over trained edges (docs/method.md §7–8).

Trained edges are grouped by parent: one forward with gradients per distinct parent yields the
mean of every child's Gaussian, so a split with K trained children costs one forward, not K.
Parents are shuffled, split into ``updates_per_iteration`` optimizer steps, and micro-batched;
one micro-batch may mix steps and trees (σ and conditioning are per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from branchgrpo.loss import clipped_surrogate, gaussian_kl_same_std
from branchgrpo.models.protocol import Conditioning, VelocityModel, select_conditioning
from branchgrpo.sde import gaussian_log_prob
from branchgrpo.sde_flowgrpo import flowgrpo_kl
from branchgrpo.transitions import get_transition
from branchgrpo.tree.rollout import RolloutTree
from branchgrpo.tree.selection import EdgeSelection
from branchgrpo.tree.spec import MethodConfig


@dataclass
class TrainingEdges:
    """Trained edges as flat tensors, grouped by distinct parent (edges sorted by parent)."""

    parent_latents: Tensor  # [P, ...]
    parent_sigma: Tensor  # [P] σ of the parent's step
    parent_sigma_next: Tensor  # [P]
    parent_prompt: Tensor  # [P] prompt (conditioning row) of the parent
    parent_step: Tensor  # [P] step index
    child_latents: Tensor  # [E, ...]
    edge_parent: Tensor  # [E] index into the parents, non-decreasing
    lp_old: Tensor  # [E]
    advantage: Tensor  # [E]
    normaliser: float = 0.0  # loss = Σ_e L_e / normaliser (edges selected before the A = 0 skip)

    @property
    def num_parents(self) -> int:
        return int(self.parent_latents.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.child_latents.shape[0])

    def edges_per_parent(self) -> Tensor:
        return torch.bincount(self.edge_parent, minlength=self.num_parents)


def gather_training_edges(tree: RolloutTree, selection: EdgeSelection, edge_advantage: list[Tensor]) -> TrainingEdges:
    """Collect the selected edges of a rollout, one row per distinct parent (docs/method.md §7)."""
    parts: dict[str, list[Tensor]] = {k: [] for k in TrainingEdges.__dataclass_fields__}
    offset = 0
    for d in range(1, len(tree.parent)):
        children = torch.nonzero(selection.mask[d], as_tuple=False).flatten()
        if children.numel() == 0:
            continue
        parents, local = torch.unique(tree.parent[d][children], return_inverse=True)
        device = tree.latents[d].device
        step = d - 1
        parts["parent_latents"].append(tree.latents[d - 1][parents.to(device)])
        parts["parent_sigma"].append(torch.full((parents.numel(),), float(tree.sigmas[step])))
        parts["parent_sigma_next"].append(torch.full((parents.numel(),), float(tree.sigmas[step + 1])))
        parts["parent_prompt"].append(tree.group[d - 1][parents])
        parts["parent_step"].append(torch.full((parents.numel(),), step, dtype=torch.long))
        parts["child_latents"].append(tree.latents[d][children.to(device)])
        parts["edge_parent"].append(local + offset)
        parts["lp_old"].append(tree.logp[d][children.to(device)])
        parts["advantage"].append(edge_advantage[d][children.to(edge_advantage[d].device)])
        offset += parents.numel()
    if offset == 0:
        shape = tuple(tree.latents[0].shape[1:])
        empty = torch.zeros(0, *shape, device=tree.latents[0].device)
        return TrainingEdges(
            parent_latents=empty, parent_sigma=torch.zeros(0), parent_sigma_next=torch.zeros(0),
            parent_prompt=torch.zeros(0, dtype=torch.long), parent_step=torch.zeros(0, dtype=torch.long),
            child_latents=empty, edge_parent=torch.zeros(0, dtype=torch.long),
            lp_old=torch.zeros(0), advantage=torch.zeros(0), normaliser=0.0,
        )
    parts.pop("normaliser")
    edges = TrainingEdges(**{k: torch.cat(v) for k, v in parts.items()})
    edges.normaliser = float(max(selection.normaliser_edges, edges.num_edges))
    return edges


@dataclass
class UpdateStats:
    """What one iteration's update did; averages are over trained edges."""

    loss: float = 0.0
    ratio_mean: float = 1.0
    ratio_max_deviation_first_step: float = 0.0  # max |ρ − 1| before the first optimizer step
    clip_fraction: float = 0.0
    kl: float = 0.0
    grad_norms: list[float] = field(default_factory=list)
    optimizer_steps: int = 0
    trained_edges: int = 0
    training_forwards: int = 0
    nonfinite_micro_batches: int = 0
    skipped_steps: int = 0  # optimizer steps skipped because some process had non-finite gradients


def _edge_rows(starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Edge indices of a set of parents (edges are contiguous per parent) and each edge's slot."""
    slot = torch.arange(counts.numel()).repeat_interleave(counts)
    offsets = torch.cumsum(counts, 0) - counts
    rows = starts.repeat_interleave(counts) + torch.arange(int(counts.sum())) - offsets.repeat_interleave(counts)
    return rows, slot


def edge_log_probs(
    model: VelocityModel,
    edges: TrainingEdges,
    parents: Tensor,
    conditioning: Conditioning,
    config: MethodConfig,
    starts: Tensor,
    counts: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward for ``parents``; log-probs of all their trained children under ``θ``.

    Returns ``(lp_new [e], edge_rows [e], mean [p, ...], std [p])``.
    """
    device = edges.parent_latents.device
    x = edges.parent_latents[parents.to(device)]
    sigma = edges.parent_sigma[parents].to(device)
    sigma_next = edges.parent_sigma_next[parents].to(device)
    velocity = model(x, sigma, select_conditioning(conditioning, edges.parent_prompt[parents]))
    mean, std, _ = get_transition(config.tree.transition)(x, velocity, sigma, sigma_next, config.tree.eta, sde=True)
    rows, slot = _edge_rows(starts[parents], counts[parents])
    slot = slot.to(device)
    lp_new = gaussian_log_prob(
        edges.child_latents[rows.to(device)], mean[slot], std[slot], config.tree.logprob_reduction
    )
    return lp_new, rows, mean, std


class GradientSync:
    """How gradients meet across processes. This base class is the single-process case (no-ops);
    the trainer's distributed helper overrides it with torch.distributed reductions, so the core
    never imports torch.distributed.

    ``sharded``: the model reduces gradients itself inside every backward (FSDP), so
    :meth:`gradients` does nothing, every process must run the same number of forwards and
    backwards, and parameters and gradients may be DTensors (only this process's shard is local).
    """

    sharded: bool = False

    def sum(self, value: float) -> float:
        """Sum of ``value`` over all processes."""
        return value

    def max(self, value: float) -> float:
        """Largest ``value`` over all processes."""
        return value

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is true on any process."""
        return flag

    def gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over all processes (in place)."""

    def padded(self, micro_batches: list[Tensor]) -> list[Tensor | None]:
        """``micro_batches`` with ``None`` appended up to the largest count of any process when the
        model is sharded (it communicates in every forward/backward, so every process runs as many)."""
        if not self.sharded:
            return list(micro_batches)
        return list(micro_batches) + [None] * (int(self.max(len(micro_batches))) - len(micro_batches))

    def finite_gradients(self, params: list[torch.nn.Parameter], poisoned: bool = False) -> bool:
        """Sum the gradients over processes if every process's are finite; False (nothing summed) if
        any process has a non-finite gradient or reported ``poisoned`` (a non-finite micro-batch that a
        sharded model already reduced). Parameters without a gradient get zeros, so every process joins
        the reduction with the same tensors."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        local_bad = poisoned or not all_finite([_local(p.grad) for p in params])
        if self.any(local_bad):
            return False
        self.gradients(params)
        return True


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, with one host sync for the lot (a LoRA on a
    full-size transformer has about a thousand gradient tensors; one ``isfinite`` check and sync
    each cost more than the optimizer step). The max-norm is NaN or inf exactly when some element
    is, and unlike the 2-norm it cannot overflow on large finite values."""
    tensors = [t for t in tensors if t.numel()]  # the max-norm of nothing is undefined
    if not tensors:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf)))


def _local(tensor: Tensor) -> Tensor:
    """This process's shard of a DTensor (duck-typed, so the core needs no torch.distributed)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _padding_pass(
    model: VelocityModel, reference_model: VelocityModel | None, edges: TrainingEdges, conditioning: Conditioning
) -> None:
    """A forward (and reference forward) and a backward whose gradient is exactly zero.

    A sharded model communicates inside every forward and backward, so a process with fewer
    micro-batches than another runs these until the counts match; the sum of gradients is
    unchanged.
    """
    latents = edges.parent_latents
    x = torch.zeros((1, *latents.shape[1:]), device=latents.device, dtype=latents.dtype)
    sigma = torch.ones(1, device=latents.device)
    rows = select_conditioning(conditioning, torch.zeros(1, dtype=torch.long))
    velocity = model(x, sigma, rows)
    if reference_model is not None:
        reference_model(x, sigma, rows)
    (velocity.sum() * 0.0).backward()


def _micro_batch_terms(
    model: VelocityModel,
    reference_model: VelocityModel | None,
    edges: TrainingEdges,
    parents: Tensor,
    conditioning: Conditioning,
    config: MethodConfig,
    starts: Tensor,
    counts: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-edge clipped surrogate, ratio and KL-to-reference of one micro-batch of ``parents``
    (docs/method.md §8); the KL is zero without a reference model."""
    update = config.update
    lp_new, rows, mean, std = edge_log_probs(model, edges, parents, conditioning, config, starts, counts)
    # each tensor indexed on its own device: lp_old lives with the tree (the GPU), the advantages
    # with the scores (the CPU); a CUDA index into a CPU tensor is an error
    lp_old = edges.lp_old[rows.to(edges.lp_old.device)].to(lp_new.device)
    advantage = edges.advantage[rows.to(edges.advantage.device)].to(lp_new.device)
    loss_e, ratio, _ = clipped_surrogate(lp_new, lp_old, advantage, update.clip_range)
    if reference_model is None:
        return loss_e, ratio, torch.zeros_like(loss_e)
    with torch.no_grad():
        device = edges.parent_latents.device
        x = edges.parent_latents[parents.to(device)]
        sigma = edges.parent_sigma[parents].to(device)
        ref_v = reference_model(x, sigma, select_conditioning(conditioning, edges.parent_prompt[parents]))
        sigma_next = edges.parent_sigma_next[parents].to(device)
        ref_mean, _, _ = get_transition(config.tree.transition)(x, ref_v, sigma, sigma_next, config.tree.eta, sde=True)
    if update.kl_form == "flowgrpo":
        kl_parent = flowgrpo_kl(mean, ref_mean, sigma, sigma_next, config.tree.eta, config.tree.logprob_reduction)
    else:
        kl_parent = gaussian_kl_same_std(mean, ref_mean, std, config.tree.logprob_reduction)
    return loss_e, ratio, kl_parent.repeat_interleave(counts[parents].to(kl_parent.device))


def _clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the total gradient norm to ``max_norm`` (0: measure only); returns the norm before clipping
    (NaN when not finite). Both calls handle DTensor gradients (the norm is over all shards)."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return norm if math.isfinite(norm) else float("nan")


def make_adamw(params: list[torch.nn.Parameter], learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel where it has one for these parameters (plain floating-point
    tensors on CPU or CUDA; not FSDP's DTensors): one kernel for the whole step instead of a loop over
    parameter tensors, the same update up to float rounding. Its fixed cost per optimizer step is
    what a tree method, with a few dozen training rows per step, pays on top of its model calls."""
    fused = bool(params) and all(
        type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def policy_update(
    model: VelocityModel,
    optimizer: torch.optim.Optimizer,
    edges: TrainingEdges,
    conditioning: Conditioning,
    config: MethodConfig,
    generator: torch.Generator | None = None,
    reference_model: VelocityModel | None = None,
    sync: GradientSync | None = None,
) -> UpdateStats:
    """Clipped GRPO updates over the trained edges of one iteration (docs/method.md §8).

    The trained parents are shuffled (``update.shuffle_edges``) and split into
    ``update.updates_per_iteration`` optimizer steps; within a step the loss is the mean over its
    edges (over all processes), accumulated over micro-batches of ``engine.train_micro_batch``
    parents. Skipped zero-advantage edges still count in that mean (``edges.normaliser``): they
    contribute exactly zero gradient, so skipping them is an exact speed-up. A micro-batch whose
    loss is not finite is skipped and counted; if any process ends a step with non-finite
    gradients, every process skips that optimizer step (and counts it), so none waits on another.
    With a sharded model (``sync.sharded``, FSDP) gradients are reduced inside backward, before
    they can be checked, so a non-finite micro-batch on any process skips the whole step.
    """
    update = config.update
    sync = sync or GradientSync()
    stats = UpdateStats(trained_edges=edges.num_edges, training_forwards=edges.num_parents)
    if update.kl_coef > 0 and reference_model is None:
        raise ValueError("update.kl_coef > 0 needs a reference model (pass reference_model=...)")
    counts = edges.edges_per_parent()
    starts = torch.cumsum(counts, 0) - counts
    order = (
        torch.randperm(edges.num_parents, generator=generator)
        if update.shuffle_edges
        else torch.arange(edges.num_parents)
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    totals = {"loss": 0.0, "ratio": 0.0, "clipped": 0.0, "kl": 0.0}
    scale = edges.normaliser / edges.num_edges if edges.num_edges else 1.0
    reference = reference_model if update.kl_coef > 0 else None
    for step_index, chunk in enumerate(torch.tensor_split(order, update.updates_per_iteration)):
        step_normaliser = sync.sum(float(counts[chunk].sum()) * scale)
        if step_normaliser == 0:
            continue
        optimizer.zero_grad(set_to_none=True)
        poisoned = False  # sharded only: a non-finite micro-batch's gradient is already reduced
        for parents in sync.padded([p for p in chunk.split(config.engine.train_micro_batch) if p.numel()]):
            if parents is None:
                _padding_pass(model, reference, edges, conditioning)
                continue
            loss_e, ratio, kl_e = _micro_batch_terms(model, reference, edges, parents, conditioning, config,
                                                     starts, counts)
            objective = (loss_e + update.kl_coef * kl_e).sum() / step_normaliser
            if not torch.isfinite(objective):
                stats.nonfinite_micro_batches += 1
                if sync.sharded:  # keep the collectives in step; the step is skipped below
                    objective.backward()
                    poisoned = True
                continue
            objective.backward()
            ratio = ratio.detach()
            if step_index == 0:
                deviation = float((ratio - 1).abs().max())
                stats.ratio_max_deviation_first_step = max(stats.ratio_max_deviation_first_step, deviation)
            totals["loss"] += float(loss_e.detach().sum())
            totals["ratio"] += float(ratio.sum())
            totals["clipped"] += float(((ratio - 1).abs() > update.clip_range).sum())
            totals["kl"] += float(kl_e.detach().sum())
        if not sync.finite_gradients(params, poisoned):
            optimizer.zero_grad(set_to_none=True)
            stats.skipped_steps += 1
            continue
        stats.grad_norms.append(_clip_gradients(params, update.max_grad_norm))
        optimizer.step()
        stats.optimizer_steps += 1
    n = max(edges.num_edges, 1)
    stats.loss = totals["loss"] / n
    stats.ratio_mean = totals["ratio"] / n if edges.num_edges else 1.0
    stats.clip_fraction = totals["clipped"] / n
    stats.kl = totals["kl"] / n
    return stats
