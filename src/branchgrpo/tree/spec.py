"""What a method is: the tree it samples, how it scores edges, which edges it trains (docs/method.md §4–9).

Each concern is one dataclass; :class:`MethodConfig` composes them. All validation happens in
``__post_init__`` and raises :class:`~branchgrpo.config.ConfigError` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from branchgrpo.config import ConfigError
from branchgrpo.ode_tail import tail_calls

SplitNoise = Literal["correlated", "independent", "legacy_independent"]


MAX_LEAVES_PER_PROMPT = 4096  # 16 leaves is the paper's tree; 256 (K = 4 at 4 steps) its largest
MAX_STEPS = 1000  # the paper samples with 16-20 steps; per-step arrays must stay small


@dataclass
class SdeWindow:
    """A window of SDE steps that moves with the training iteration (MixGRPO, docs/method.md §7.4).

    At iteration ``k`` the window covers steps ``[a, a + size)`` with
    ``a = min(start + stride·(k // advance_every), stop − size + 1)``.
    """

    size: int = 4  # number of SDE steps in the window (w)
    start: int = 0  # first step of the window at iteration 0
    advance_every: int = 25  # training iterations between moves (τ); 0 = the window never moves
    stride: int = 1  # steps the window advances per move
    stop: int | None = None  # last step the window may cover; None = the last step

    def validate(self, steps: int) -> None:
        stop = steps - 1 if self.stop is None else self.stop
        if not 1 <= self.size <= steps:
            raise ConfigError("tree.sde_window.size", f"must be in 1..{steps} (tree.steps), got {self.size}")
        if not 0 <= stop <= steps - 1:
            raise ConfigError("tree.sde_window.stop", f"must be in 0..{steps - 1}, got {self.stop}")
        if not 0 <= self.start <= stop - self.size + 1:
            raise ConfigError(
                "tree.sde_window.start",
                f"must be in 0..{stop - self.size + 1} so the window fits before stop={stop}, got {self.start}",
            )
        if self.advance_every < 0:
            raise ConfigError("tree.sde_window.advance_every", f"must be >= 0, got {self.advance_every}")
        if self.stride < 1:
            raise ConfigError("tree.sde_window.stride", f"must be >= 1, got {self.stride}")

    def first_step(self, iteration: int, steps: int) -> int:
        stop = steps - 1 if self.stop is None else self.stop
        moves = iteration // self.advance_every if self.advance_every > 0 else 0
        return min(self.start + self.stride * moves, stop - self.size + 1)


@dataclass
class AdaptiveSplits:
    """Adaptive split placement (docs/beyond-the-paper.md §4): every ``every`` iterations the split
    whose moving-average share of the group's reward variance is smallest moves one step to a free
    neighbour that has shown, or may show, a larger share, never costing more rollout calls than
    ``split_plan``. K, leaves and group size stay; the plan in force is saved with checkpoints."""

    every: int = 10  # iterations between moves
    decay: float = 0.9  # moving-average decay of each step's variance share

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError("tree.adaptive_splits.every", f"must be >= 1 (iterations between moves), got {self.every}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError("tree.adaptive_splits.decay", f"must be in [0, 1), got {self.decay}")


@dataclass
class OdeTail:
    """Integrate the ODE steps after the last SDE step in fewer model calls (docs/beyond-the-paper.md
    §7; MixGRPO-Flash): no edge there is trained, only the sample at its end is scored. Training
    rollouts only; held-out evaluation samples the full schedule."""

    keep: float = 0.4  # fraction of the tail's steps kept as model calls (round(n·keep), >= 1)
    order: int = 2  # 1: Euler on the coarser grid; 2: DPM-Solver++(2M), first order at its first and last step

    def validate(self) -> None:
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise ConfigError("tree.ode_tail.keep", f"must be in (0, 1] (fraction of the tail's steps kept), got {keep!r}")
        if self.order not in (1, 2):
            raise ConfigError("tree.ode_tail.order", f"must be 1 (Euler) or 2 (DPM-Solver++ 2M), got {self.order!r}")


@dataclass
class TreeSpec:
    """The rollout tree (docs/method.md §2–4): schedule, SDE noise, split plan, roots and SDE/ODE pattern."""

    steps: int = 20  # denoising steps T
    shift: float = 3.0  # schedule shift (FLUX: 3)
    eta: float = 0.3  # SDE noise level η; std of step i is η·√Δ_i
    split_plan: dict[int, int] = field(default_factory=lambda: {0: 2, 3: 2, 6: 2, 9: 2})  # {step: K}
    split_noise: SplitNoise = "correlated"  # sibling noise: paper's construction, iid, or authors' code
    split_noise_scale: float = 4.0  # s: sibling correlation 1/(1+s²) ("correlated" mode)
    roots_per_prompt: int = 1  # independent root noises per prompt; all roots of a prompt form one group
    shared_root_noise: bool = False  # the same root noise for every prompt of a batch
    sde_window: SdeWindow | None = None  # None: every step SDE; else only split steps + window
    # A flat group (one split) with an SDE window: the split moves to the window's first step at
    # every iteration (MixGRPO; see split_plan_at). split_plan then gives K only, not the step.
    split_at_window_start: bool = False
    # None: the split steps are split_plan's at every iteration (the paper); else they move
    # toward the steps that decide most of the reward variance (docs/beyond-the-paper.md §4)
    adaptive_splits: AdaptiveSplits | None = None
    # None: every step costs one model call per node; else the ODE steps after the last SDE step are
    # integrated in fewer calls (docs/beyond-the-paper.md §7; MixGRPO-Flash)
    ode_tail: OdeTail | None = None
    logprob_reduction: Literal["mean", "sum"] = "mean"  # reduction of the per-edge log-prob
    transition: Literal["flowsde", "flowgrpo"] = "flowsde"  # SDE: docs/method.md §3 (constant η) or Flow-GRPO's σ-dependent noise (η = a)

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError("tree.steps", f"must be in 1..{MAX_STEPS:,} (each step is a model call per sample), "
                              f"got {self.steps:,}")
        if self.shift <= 0:
            raise ConfigError("tree.shift", f"must be > 0, got {self.shift}")
        if self.eta < 0:
            raise ConfigError("tree.eta", f"must be >= 0, got {self.eta}")
        if not isinstance(self.split_plan, dict):
            raise ConfigError("tree.split_plan", "must be a mapping {step: K}, e.g. {0: 2, 3: 2}")
        for step, k in self.split_plan.items():
            if not isinstance(step, int) or not 0 <= step < self.steps:
                raise ConfigError(
                    "tree.split_plan", f"split step {step!r} out of range; steps must be in 0..{self.steps - 1}"
                )
            if not isinstance(k, int) or k < 2:
                raise ConfigError("tree.split_plan", f"branching factor K at step {step} must be an integer >= 2, got {k!r}")
        if self.split_noise_scale < 0:
            raise ConfigError("tree.split_noise_scale", f"must be >= 0, got {self.split_noise_scale}")
        if self.roots_per_prompt < 1:
            raise ConfigError("tree.roots_per_prompt", f"must be >= 1, got {self.roots_per_prompt}")
        leaves = self.roots_per_prompt
        for k in self.split_plan.values():
            leaves *= int(k)
        if leaves > MAX_LEAVES_PER_PROMPT:
            raise ConfigError("tree.split_plan", f"gives {leaves:,} leaves per prompt (roots_per_prompt × the "
                              f"product of K); at most {MAX_LEAVES_PER_PROMPT:,}: every leaf is a full sample held in "
                              "memory, decoded and scored")
        if self.split_plan and self.eta == 0:
            raise ConfigError("tree.eta", "must be > 0 when the tree splits (siblings would be identical)")
        if self.sde_window is not None:
            self.sde_window.validate(self.steps)
        if self.split_at_window_start:
            if self.sde_window is None:
                raise ConfigError("tree.split_at_window_start", "needs an SDE window (tree.sde_window) to follow")
            if len(self.split_plan) != 1:
                raise ConfigError(
                    "tree.split_at_window_start",
                    f"needs a flat group: exactly one split step in tree.split_plan, got {self.split_plan or '{}'}",
                )
        if self.adaptive_splits is not None:
            self.adaptive_splits.validate()
            if not self.split_plan:
                raise ConfigError("tree.adaptive_splits", "needs split steps to move: tree.split_plan is empty")
            if self.split_at_window_start:
                raise ConfigError("tree.adaptive_splits", "cannot move splits that follow the SDE window "
                                  "(tree.split_at_window_start: MixGRPO's flat group)")
        if self.ode_tail is not None:
            self.ode_tail.validate()
            if self.sde_window is None and self.eta > 0:
                raise ConfigError("tree.ode_tail", "every step is SDE without tree.sde_window, so there is no ODE tail "
                                  "to compress; set tree.sde_window (e.g. preset branchgrpo-mix or mixgrpo)")
            if self.adaptive_splits is not None:
                raise ConfigError("tree.ode_tail", "cannot be combined with tree.adaptive_splits: the placement's "
                                  "rollout-call budget counts every tail step")
        self.split_plan = dict(sorted(self.split_plan.items()))

    def split_plan_at(self, iteration: int = 0) -> dict[int, int]:
        """The split plan in force at a training iteration (docs/method.md §7.4, §9).

        ``split_plan`` itself, unless ``split_at_window_start``: then the group's one split sits at
        the SDE window's first step ``a_k``. Steps before ``a_k`` are ODE, hence deterministic, so
        the samples of a group that shares its root noise are one trajectory up to ``a_k`` (one
        denoiser row per step) and branch there, as MixGRPO's flat group does.
        """
        if not self.split_at_window_start:
            return self.split_plan
        (k,) = self.split_plan.values()
        return {self.sde_window.first_step(iteration, self.steps): k}

    def last_split_at(self, iteration: int = 0) -> int | None:
        """The last split step in force at a training iteration (None: the tree never splits)."""
        plan = self.split_plan_at(iteration)
        return max(plan) if plan else None

    @property
    def last_split_step(self) -> int | None:
        """The last split step at iteration 0 (see :meth:`last_split_at`)."""
        return self.last_split_at(0)

    def branching(self, iteration: int = 0) -> list[int]:
        """``K_i`` for every step at a training iteration (1 where the step does not split)."""
        plan = self.split_plan_at(iteration)
        return [plan.get(i, 1) for i in range(self.steps)]

    def sde_steps(self, iteration: int = 0) -> list[bool]:
        """Whether each step is SDE at this training iteration (split steps always are)."""
        if self.sde_window is None:
            return [self.eta > 0] * self.steps
        first = self.sde_window.first_step(iteration, self.steps)
        window = range(first, first + self.sde_window.size)
        plan = self.split_plan_at(iteration)
        return [(i in window or i in plan) and self.eta > 0 for i in range(self.steps)]

    def ode_tail_at(self, iteration: int = 0) -> tuple[int, int] | None:
        """``(first step, model calls)`` of the compressed ODE tail at a training iteration: the steps
        after the last SDE or split step, run in ``round(n·keep)`` calls; None without
        ``ode_tail`` or when the last step is stochastic."""
        if self.ode_tail is None:
            return None
        sde, branching = self.sde_steps(iteration), self.branching(iteration)
        stochastic = [i for i in range(self.steps) if sde[i] or branching[i] > 1]
        first = (max(stochastic) + 1) if stochastic else 0
        if first >= self.steps:
            return None
        return first, tail_calls(self.steps - first, self.ode_tail.keep)

    def leaves_per_prompt(self) -> int:
        leaves = self.roots_per_prompt
        for k in self.split_plan.values():
            leaves *= k
        return leaves


@dataclass
class AdvantageSpec:
    """Reward fusion and depth-wise normalisation (docs/method.md §5–6)."""

    fusion_beta: float = 1.0  # β of the path-log-prob softmax; 0 = uniform mean of leaf rewards
    std_floor: float = 0.0  # floor on the per-depth std, in reward units (0 = none); acts on shallow depths first
    advantage_clip: float = 5.0  # A_max: edge advantages are clipped to ±A_max
    # depthwise: z-score per group and depth (paper Eq. 4); sibling: a split child against its
    # siblings, chain edges inherit the split edge above (docs/beyond-the-paper.md §1)
    mode: Literal["depthwise", "sibling"] = "depthwise"
    # λ of the intra-group diversity bonus added to each leaf's reward before fusion, in the
    # reward's units (docs/beyond-the-paper.md §5); 0 = off
    diversity_bonus: float = 0.0
    # where the bonus measures distance: the final latents, the decoded leaves averaged to
    # diversity_image_size² pixels (zero-mean pixel noise averages out), or the reward model's own
    # image embedding (unit vectors; rewards that declare one: digits, clip, pickscore, hps)
    diversity_space: Literal["latent", "image", "reward"] = "latent"
    # pixels per side of the decoded leaves in diversity_space=image (area averaging)
    diversity_image_size: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ("depthwise", "sibling"):
            raise ConfigError("advantage.mode", f"must be 'depthwise' or 'sibling', got {self.mode!r}")
        if self.std_floor < 0:
            raise ConfigError("advantage.std_floor", f"must be >= 0, got {self.std_floor}")
        if self.advantage_clip <= 0:
            raise ConfigError("advantage.advantage_clip", f"must be > 0, got {self.advantage_clip}")
        bonus = self.diversity_bonus
        if isinstance(bonus, bool) or not isinstance(bonus, (int, float)) or not (math.isfinite(bonus) and bonus >= 0):
            raise ConfigError("advantage.diversity_bonus", f"must be a finite number >= 0 (0 = off), got {self.diversity_bonus!r}")
        if self.diversity_space not in ("latent", "image", "reward"):
            raise ConfigError("advantage.diversity_space",
                              f"must be 'latent', 'image' or 'reward', got {self.diversity_space!r}")
        size = self.diversity_image_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError("advantage.diversity_image_size", f"must be an integer >= 1 (pixels per side), got {size!r}")


@dataclass
class DepthPruning:
    """Skip edges whose child depth lies in a window that slides with training (docs/method.md §7.2).

    At iteration ``k`` the window is ``[a, a + size)`` (direction ``later``) or ``(a − size, a]``
    (``earlier``) with ``a = start ± k // slide_every``, clamped so it never passes ``stop``.
    """

    start: int | None = None  # first pruned depth at iteration 0; None = depth after the last split
    size: int = 5  # depths in the window (paper text: 4; Table 1's 8.625 NFE implies 5 at T=20)
    direction: Literal["later", "earlier"] = "later"  # which way the window slides
    slide_every: int = 30  # training iterations between one-depth moves; 0 = fixed
    stop: int | None = None  # farthest depth the window may reach; None = T (later) or 1 (earlier)

    def window(self, iteration: int, tree: TreeSpec) -> range:
        start = self.start
        if start is None:
            last = tree.last_split_at(iteration)
            start = (last + 1) if last is not None else 1
        moves = iteration // self.slide_every if self.slide_every > 0 else 0
        if self.direction == "later":
            stop = tree.steps if self.stop is None else self.stop
            first = min(start + moves, stop - self.size + 1)
            return range(first, first + self.size)
        stop = 1 if self.stop is None else self.stop
        last_depth = max(start - moves, stop + self.size - 1)
        return range(last_depth - self.size + 1, last_depth + 1)

    def validate(self, tree: TreeSpec) -> None:
        if not 1 <= self.size <= tree.steps:
            raise ConfigError("selection.depth_pruning.size", f"must be in 1..{tree.steps}, got {self.size}")
        if self.slide_every < 0:
            raise ConfigError("selection.depth_pruning.slide_every", f"must be >= 0, got {self.slide_every}")
        for name in ("start", "stop"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= tree.steps:
                raise ConfigError(
                    f"selection.depth_pruning.{name}", f"must be a depth in 1..{tree.steps} (or null), got {value}"
                )
        window = self.window(0, tree)
        if window.start < 1 or window.stop - 1 > tree.steps:
            raise ConfigError(
                "selection.depth_pruning",
                f"window depths {window.start}..{window.stop - 1} fall outside 1..{tree.steps}",
            )


@dataclass
class SelectionSpec:
    """Which edges get gradients (docs/method.md §7); the rollout and rewards never change."""

    skip_zero_advantage: bool = True  # exact: A = 0 edges carry no gradient (off when update.kl_coef > 0)
    depth_pruning: DepthPruning | None = None  # None = off
    width_pruning: Literal["none", "parent_top1", "extreme"] = "none"  # after the last split: none, parent_top1 (train one child per parent: WidPru) or extreme (Extreme-b)
    extreme_b: int = 4  # Extreme-b: keep the post-split chains of the b best and b worst leaves
    timestep_fraction: float = 1.0  # DanceGRPO: train this fraction of the steps (random per tree)
    ignore_last: bool = False  # DanceGRPO: never train the last step
    # window: depth_pruning skips its window of depths (docs/method.md §7.2); informative: train as
    # many edges as the window keeps, chosen by the information their advantage carries
    # (docs/beyond-the-paper.md §2)
    edges: Literal["window", "informative"] = "window"

    def __post_init__(self) -> None:
        if self.edges not in ("window", "informative"):
            raise ConfigError("selection.edges", f"must be 'window' or 'informative', got {self.edges!r}")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ConfigError("selection.timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        if self.extreme_b < 1:
            raise ConfigError("selection.extreme_b", f"must be >= 1, got {self.extreme_b}")


@dataclass
class UpdateSpec:
    """The clipped GRPO update (docs/method.md §8) and its semantics per iteration."""

    clip_range: float = 1e-3  # ε of the ratio clip
    kl_coef: float = 0.0  # β_KL of the optional KL-to-reference term (0 = off, no reference forward)
    kl_form: Literal["gaussian", "flowgrpo"] = "gaussian"  # true Gaussian KL, or Flow-GRPO's scale (× Δσ)
    updates_per_iteration: int = 1  # optimizer steps per iteration; trained edges split evenly among them
    max_grad_norm: float = 1.0  # gradient-norm clip (0 = off)
    learning_rate: float = 1e-5  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    shuffle_edges: bool = True  # shuffle trained edges (by shared parent) before micro-batching

    def __post_init__(self) -> None:
        if self.clip_range <= 0:
            raise ConfigError("update.clip_range", f"must be > 0, got {self.clip_range}")
        if self.kl_coef < 0:
            raise ConfigError("update.kl_coef", f"must be >= 0, got {self.kl_coef}")
        if self.updates_per_iteration < 1:
            raise ConfigError("update.updates_per_iteration", f"must be >= 1, got {self.updates_per_iteration}")
        if self.max_grad_norm < 0:
            raise ConfigError("update.max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        if self.learning_rate <= 0:
            raise ConfigError("update.learning_rate", f"must be > 0, got {self.learning_rate}")


@dataclass
class EngineSpec:
    """How the work is batched; changes speed and memory, never results (up to float rounding)."""

    # auto: at startup, the largest power of two whose planned working set fits free CUDA memory (docs/plan.md)
    rollout_micro_batch: int | Literal["auto"] = 64  # frontier rows per denoiser call during rollout (or auto)
    train_micro_batch: int | Literal["auto"] = 16  # distinct parents (forwards with gradients) per training micro-batch (or auto)

    def __post_init__(self) -> None:
        for name in ("rollout_micro_batch", "train_micro_batch"):
            value = getattr(self, name)
            if value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"engine.{name}", f"must be an integer >= 1 or 'auto', got {value!r}")


@dataclass
class MethodConfig:
    """One GRPO method = tree + advantage + selection + update (+ batching)."""

    name: str = "branchgrpo"  # the method's name, recorded in metrics and tree dumps
    tree: TreeSpec = field(default_factory=TreeSpec)
    advantage: AdvantageSpec = field(default_factory=AdvantageSpec)
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    update: UpdateSpec = field(default_factory=UpdateSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)

    def __post_init__(self) -> None:
        if self.selection.depth_pruning is not None:
            self.selection.depth_pruning.validate(self.tree)
        if self.selection.edges == "informative" and self.selection.depth_pruning is None:
            raise ConfigError(
                "selection.edges",
                "'informative' takes its edge budget from selection.depth_pruning's window, which is off; "
                "set selection.depth_pruning (e.g. preset branchgrpo-deppru) or use 'window'",
            )
        width = self.selection.width_pruning
        if width == "parent_top1" and self.tree.last_split_step is None:
            raise ConfigError(
                "selection.width_pruning",
                "parent_top1 groups chains by their parent at the last split, but tree.split_plan is empty; "
                "use 'extreme' or 'none'",
            )
        if width == "extreme" and self.tree.last_split_step is None and self.tree.roots_per_prompt == 1:
            raise ConfigError(
                "selection.width_pruning", "needs more than one chain per prompt (a split or roots_per_prompt > 1)"
            )
