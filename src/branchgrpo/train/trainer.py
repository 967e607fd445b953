"""The training loop. One iteration reads like the algorithm (docs/method.md §4–8):

prompts → rollout trees → batched decode + rewards → fusion and advantages → edge selection →
micro-batched clipped updates → logging.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from branchgrpo.resources.auto import resolve_micro_batches
from branchgrpo.families import PolicyBundle
from branchgrpo.models.protocol import select_conditioning
from branchgrpo.rewards.base import Reward, RewardOutput, as_reward
from branchgrpo.train.components import (
    apply_speed_settings, build_policy, build_reward, compute_dtype, join_reward_chunks, resolve_device, score_rewards,
    use_master_weights, validate_job,
)
from branchgrpo.train.metrics import iteration_metrics
from branchgrpo.train.checkpoint import (
    TrainerState, find_resume, full_model_state, full_optimizer_state, full_state, load_checkpoint, save_checkpoint,
)
from branchgrpo.atomic import atomic_write_text
from branchgrpo.config import ConfigError, to_dict
from branchgrpo.train.config import TrainConfig, dump_config
from branchgrpo.train.distributed import DistributedContext, place_like
from branchgrpo.train.evaluation import evaluate, save_image_grid
from branchgrpo.train.logging import MetricsLogger, truncate_metrics
from branchgrpo.train.reward_worker import RewardWorker, start_reward_worker
from branchgrpo.train.signals import STOP_SIGNALS, StartupInterrupted, can_handle_signals, interrupt_on_stop_signals  # noqa: F401 (StartupInterrupted: re-exported)
from branchgrpo.train.streams import PromptSampler, RandomStream, iteration_generator
from branchgrpo.train.run_folder import RunFolder, Start, check_run_folder, plan_start
from branchgrpo.train.weights import NonFiniteWeightsError, atomic_save_safetensors, nonfinite_tensors, save_weights
from branchgrpo.tree.diversity_bonus import bonus_space, check_bonus_space, group_diversity_bonus
from branchgrpo.tree.dump import THUMBNAIL_KEY, dump_due, node_thumbnails, save_tree
from branchgrpo.tree.placement import SplitPlacement, rollout_calls, split_variance_shares
from branchgrpo.tree.rollout import RolloutTree, merge_trees, rollout
from branchgrpo.tree.scoring import score_tree
from branchgrpo.update import gather_training_edges, make_adamw, policy_update


@dataclass
class RunSummary:
    output_dir: str
    iterations: int
    eval_reward_start: float | None
    eval_reward_end: float | None
    seconds: float
    stopped_by_signal: str | None = None


class Trainer:
    """Holds the parts of a run; :meth:`run` executes it."""

    def __init__(self, config: TrainConfig, model: PolicyBundle | None = None, reward: Reward | None = None):
        """Parts are built from ``config`` unless given: ``model`` (a :class:`PolicyBundle`) and
        ``reward`` (a :class:`~branchgrpo.rewards.Reward` or a callable ``(images, prompts) -> [B]``).
        Whatever is given is recorded in the run's ``config.yaml`` (``model.family``, ``reward.name``),
        so ``eval``/``sample`` can rebuild it when it is registered (see docs/api.md). Nothing is written
        here: the job and its run folder are checked before any model loads (:func:`validate_job`,
        :func:`check_run_folder`); SIGTERM/SIGUSR1 during this start-up raise :class:`StartupInterrupted`."""
        with interrupt_on_stop_signals():
            self._build(config, model, reward)

    def _build(self, config: TrainConfig, model: PolicyBundle | None, reward: Reward | None) -> None:
        from branchgrpo.train.config import resolve_config, record_custom_parts

        if model is None:
            resolve_config(config)
        validate_job(config, custom_policy=model is not None, custom_reward=reward is not None)
        reward = as_reward(reward) if reward is not None else None
        record_custom_parts(config, model, reward)
        self.config = config
        if config.run.threads > 0:
            torch.set_num_threads(config.run.threads)
        self.dist = DistributedContext.initialise(
            resolve_device(config.run.device), parallel=config.run.parallel, cpu_offload=config.run.cpu_offload
        )
        self.device = self.dist.device(resolve_device(config.run.device))
        config.data.check_processes(self.dist.world_size)
        # a busy or protected run folder fails now, before minutes of model loading
        self._on_main(lambda: check_run_folder(config.run.output_dir, config.run.resume, config.run.overwrite))
        self.model: PolicyBundle = model or build_policy(config, self.device)
        resolve_micro_batches(config, self.device)  # a ready model skips build_policy; a no-op once resolved
        apply_speed_settings(config.model, self.model)
        self.reward: Reward = reward if reward is not None else build_reward(config, self.model, self.device)
        check_bonus_space(config.method.advantage, self.reward)
        self.compute_dtype = compute_dtype(config, self.device)
        use_master_weights(self.model, self.compute_dtype)
        self.dist.broadcast_module(self.model.trainable)
        if config.run.parallel == "fsdp":  # before the optimizer, so it holds only this rank's shards
            self.dist.shard(_shard_root(self.model), self.compute_dtype, cpu_offload=config.run.cpu_offload)
        self.reference = None
        if config.method.update.kl_coef > 0:  # validate_job made sure the run has LoRA
            from branchgrpo.models.lora import ReferenceVelocity

            self.reference = ReferenceVelocity(self.model.policy)
        params = [p for p in self.model.trainable.parameters() if p.requires_grad]
        update = config.method.update
        self.optimizer = make_adamw(params, update.learning_rate, update.weight_decay)
        self.sampler = PromptSampler(self.model.train_prompts, config.run.seed)
        self.output_dir = Path(config.run.output_dir)
        self.iteration = 0
        self.ema: dict[str, torch.Tensor] | None = None
        if config.run.ema_decay > 0:
            self.ema = {k: v.detach().float().clone() for k, v in self.model.trainable.state_dict().items()}
        self._stop_signal: str | None = None
        tree = config.method.tree
        self.placement: SplitPlacement | None = None
        if tree.adaptive_splits is not None:  # the configured plan is the cost ceiling of every move
            self.placement = SplitPlacement(dict(tree.split_plan),
                                            rollout_calls(tree.split_plan, tree.steps, tree.roots_per_prompt))

    def update_ema(self) -> None:
        """``ema ← d·ema + (1 − d)·θ`` over the trainable module's state (float32)."""
        if self.ema is None:
            return
        decay = self.config.run.ema_decay
        with torch.no_grad():
            for name, value in self.model.trainable.state_dict().items():
                self.ema[name].mul_(decay).add_(value.detach().float(), alpha=1.0 - decay)

    # -- one iteration ----------------------------------------------------------------------
    def step(self) -> dict:
        """One GRPO iteration; returns its metrics."""
        cfg, method, bundle = self.config, self.config.method, self.model
        it = self.iteration
        times: dict[str, float] = {}

        start = time.perf_counter()
        # every rank draws the same global prompts and keeps its contiguous share
        total = cfg.data.global_prompts(self.dist.world_size)
        local = total // self.dist.world_size
        first = self.dist.rank * local
        prompts = self.sampler.next(total)[first : first + local]
        groups = range(first, first + local)
        conditioning = bundle.encode_prompts(prompts)
        times["encode"] = time.perf_counter() - start

        if self.placement is not None:  # the split steps in force this iteration (config's tree is read everywhere)
            method.tree.split_plan = dict(self.placement.plan)
        bundle.policy.eval()
        rollout_and_score = self._rollout_while_scoring if cfg.reward.overlap else self._rollout_then_score
        tree, scored, bonus_points = rollout_and_score(prompts, conditioning, groups, times)

        start = time.perf_counter()
        leaf_rewards = scored.total.to(torch.float64)
        bonus = None
        if method.advantage.diversity_bonus > 0:  # docs/beyond-the-paper.md §5: trained on, never logged as reward
            space = tree.leaf_x0 if bonus_points is None else bonus_points
            bonus = group_diversity_bonus(space, tree.group[-1], method.advantage.diversity_bonus).cpu()
            leaf_rewards = leaf_rewards + bonus
        scores = score_tree(
            tree, leaf_rewards, method,
            generator=[iteration_generator(cfg.run.seed, it, RandomStream.SELECTION, g) for g in groups],
        )
        edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
        placed = self._place_splits(tree, scored.total) if self.placement is not None else {}
        bundle.policy.train()
        stats = policy_update(
            bundle.policy, self.optimizer, edges, conditioning, method,
            generator=iteration_generator(cfg.run.seed, it, RandomStream.UPDATE, self.dist.rank), sync=self.dist,
            reference_model=self.reference,
        )
        bundle.policy.eval()
        self.update_ema()
        times["train"] = time.perf_counter() - start

        if self.dist.is_main and cfg.run.dump_tree_every and it % cfg.run.dump_tree_every == 0:
            save_tree(self.output_dir / "trees" / f"iter_{it:06d}.safetensors", tree, scores, method, prompts=prompts,
                      extra_tensors={THUMBNAIL_KEY: node_thumbnails(tree, bundle.decode)})

        metrics = iteration_metrics(
            scored, tree, scores, edges, stats, times, method, self.dist,
            lr=self.optimizer.param_groups[0]["lr"], device=self.device, reward_name=self.reward.name,
            policy=bundle.policy, conditioning=conditioning,
        )
        metrics.update(placed)
        if bonus is not None:
            metrics.update(self.dist.mean({"diversity_bonus_std": float(bonus.std()) if bonus.numel() > 1 else 0.0}))
        metrics["iteration"] = it
        metrics["processes"] = self.dist.world_size
        self.iteration += 1
        return metrics

    def _place_splits(self, tree: RolloutTree, leaf_rewards: torch.Tensor) -> dict[str, float]:
        """Adaptive split placement (docs/beyond-the-paper.md §4): fold this iteration's variance
        shares of the split steps in force (summed over every rank's groups) into their moving
        averages, and every ``adaptive_splits.every`` iterations move the weakest split."""
        spec = self.config.method.tree
        steps = sorted(self.placement.plan)
        sums, groups = split_variance_shares(tree.parent, tree.group, leaf_rewards, tree.num_groups, steps)
        total = self.dist.sum(float(groups))
        shares = {s: self.dist.sum(float(v)) / total for s, v in zip(steps, sums.tolist())} if total > 0 else {}
        self.placement.observe(shares, spec.adaptive_splits.decay)
        if (self.iteration + 1) % spec.adaptive_splits.every == 0:
            self.placement.move(spec.steps, spec.roots_per_prompt)
        out = {f"placement/share_step_{s:02d}": v for s, v in shares.items()}
        out["placement/moves"] = float(self.placement.moves)
        return out

    # -- rollout and rewards ----------------------------------------------------------------
    def _rollout(self, conditioning, groups: range) -> RolloutTree:
        """Trees of prompt groups ``groups`` (global ids, one noise stream each; ``conditioning``: their rows)."""
        method, seed, it = self.config.method, self.config.run.seed, self.iteration
        return rollout(
            self.model.policy, conditioning, method.tree, len(groups), self.model.latent_shape,
            generator=[iteration_generator(seed, it, RandomStream.ROLLOUT, g) for g in groups], iteration=it,
            micro_batch=method.engine.rollout_micro_batch, device=self.device,
            keep_node_x0=self.dist.is_main and dump_due(it, self.config.run.dump_tree_every),  # for thumbnails
        )

    def _rollout_then_score(self, prompts: list[str], conditioning, groups: range,
                            times: dict[str, float]) -> tuple[RolloutTree, RewardOutput, torch.Tensor | None]:
        """Every prompt group rolled out at once, then its leaves decoded and scored (and :func:`bonus_space`d)."""
        start = time.perf_counter()
        tree = self._rollout(conditioning, groups)
        times["rollout"] = time.perf_counter() - start
        start = time.perf_counter()
        leaf_prompts = [prompts[int(g)] for g in tree.group[-1]]
        with torch.no_grad():
            outputs = self.model.decode(tree.leaf_x0)
        points = bonus_space(outputs, leaf_prompts, self.config.method.advantage, self.reward)
        scored = score_rewards(self.reward, outputs, leaf_prompts, tree.group[-1], self.config.reward.batch_size)
        times["reward"] = time.perf_counter() - start
        return tree, scored, points

    def _rollout_while_scoring(self, prompts: list[str], conditioning, groups: range,
                               times: dict[str, float]) -> tuple[RolloutTree, RewardOutput, torch.Tensor | None]:
        """``reward.overlap``: chunks of ``reward.overlap_chunk`` prompt groups rolled out and decoded
        one after another, each scored by the reward worker while the next rolls out; the chunks'
        trees are merged and their rewards joined, as the one-shot rollout and scoring give them. ``time/rollout``
        covers rollout and decoding; ``time/reward`` the scoring not hidden behind them."""
        start = time.perf_counter()
        trees, pending, points = [], [], []
        for first in range(0, len(prompts), self.config.reward.overlap_chunk):
            rows = torch.arange(first, min(first + self.config.reward.overlap_chunk, len(prompts)))
            chunk = self._rollout(select_conditioning(conditioning, rows), groups[first : first + len(rows)])
            with torch.no_grad():
                outputs = self.model.decode(chunk.leaf_x0)
            leaf_groups = chunk.group[-1] + first
            leaf_prompts = [prompts[int(g)] for g in leaf_groups]
            points.append(bonus_space(outputs, leaf_prompts, self.config.method.advantage, self.reward))
            pending.append(self._reward_worker.submit(outputs, leaf_prompts, leaf_groups))
            trees.append(chunk)
        tree = merge_trees(trees)
        times["rollout"] = time.perf_counter() - start
        start = time.perf_counter()
        scored = join_reward_chunks(self.reward, [result.result() for result in pending], tree.group[-1])
        times["reward"] = time.perf_counter() - start
        return tree, scored, (None if points[0] is None else torch.cat(points))

    @cached_property
    def _reward_worker(self) -> RewardWorker:
        """The worker of ``reward.overlap`` (``reward.worker``), started by the first iteration that needs it."""
        return start_reward_worker(self.config, self.reward, self.device)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, tag: str) -> float | None:
        """Held-out mean reward (rank 0 evaluates; the others wait and get None).

        A sharded (FSDP) model communicates in every forward, so there every rank runs the same
        evaluation and rank 0 alone records it.
        """
        if not (self.dist.is_main or self.dist.sharded):
            self.dist.barrier()
            return None
        result = self._evaluate(tag, write=self.dist.is_main)
        self.dist.barrier()
        return result if self.dist.is_main else None

    def _evaluate(self, tag: str, write: bool = True) -> float:
        cfg = self.config
        prompts = self.model.heldout_prompts
        if cfg.eval.max_prompts:
            prompts = prompts[: cfg.eval.max_prompts]
        result = evaluate(self.model, self.reward, prompts, cfg, device=self.device)
        self.last_eval = result  # the eval log row's diversity columns come from it
        if cfg.run.sample_grid_every and write:
            result.grid = save_image_grid(result.images, self.output_dir / "samples" / f"{tag}.png",
                                          columns=cfg.eval.samples_per_prompt, prompts=result.prompts,
                                          rewards=result.rewards)
        return result.mean_reward

    # -- checkpoints ------------------------------------------------------------------------
    def state(self, eval_start: float | None, eval_last: float | None) -> TrainerState:
        placement = self.placement.to_dict() if self.placement is not None else None
        return TrainerState(self.iteration, self.sampler.position, eval_start, eval_last, placement)

    def save_checkpoint(self, eval_start: float | None, eval_last: float | None) -> Path | None:
        """Every rank joins (the RNG states and, with FSDP, the tensors are gathered); rank 0 writes."""
        main = self.dist.is_main
        rng_states = self.dist.gather_objects(torch.get_rng_state())
        model_state = full_model_state(self.model.trainable, keep=main)
        optimizer_state = full_optimizer_state(self.optimizer, keep=main)
        ema = full_state(self.ema, keep=main) if self.ema is not None else None
        if not main:
            self.dist.barrier()
            return None
        path = save_checkpoint(
            self.output_dir / "checkpoints", self.state(eval_start, eval_last), model_state, optimizer_state,
            ema, keep=self.config.run.keep_checkpoints, rank_rng_states=rng_states,
        )
        self.dist.barrier()
        return path

    def restore(self, path: Path, verify: bool = True) -> TrainerState:
        state, ema = load_checkpoint(path, self.model.trainable, self.optimizer, rank=self.dist.rank, verify=verify)
        self.iteration = state.iteration
        self.sampler.position = state.prompt_position
        if self.placement is not None:
            if state.split_placement is None:
                raise FileNotFoundError(f"tree.adaptive_splits is set but checkpoint {path} holds no split placement "
                                        "(it was written by a run without it)")
            self.placement = SplitPlacement.from_dict(state.split_placement)
            self.config.method.tree.split_plan = dict(self.placement.plan)
        if self.ema is not None:
            if ema is None:
                raise FileNotFoundError(f"run.ema_decay > 0 but checkpoint {path} holds no EMA weights")
            self.ema = {k: place_like(v, self.ema[k], dtype=torch.float32) for k, v in ema.items()}
        return state

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signal.Signals(signum).name

    def _on_main(self, action, share: bool = True):
        """``action()`` on rank 0 only; every rank raises its ConfigError, or returns its result
        (``share=False``: the other ranks get None, e.g. for a lock only rank 0 may hold)."""
        result, error = None, None
        if self.dist.is_main:
            try:
                result = action()
            except ConfigError as err:
                error = err
        if self.dist.active:
            message = None if error is None else str(error)
            shared, message = self.dist.gather_objects((result if share else None, message))[0]
            if not self.dist.is_main:
                result = shared
                error = None if message is None else ConfigError("", message)
        if error is not None:
            raise error
        return result

    def check_finite(self, iteration: int) -> None:
        """Stop (every rank) when the update of ``iteration`` left NaN/Inf in the trained weights, before
        they reach a checkpoint, an evaluation or the next rollout (whose rewards would look broken)."""
        bad = nonfinite_tensors(self.model.trainable.state_dict())
        if not self.dist.any(bool(bad)):
            return
        update = self.config.method.update
        raise NonFiniteWeightsError(
            f"the update of iteration {iteration} made the weights non-finite "
            f"({'e.g. ' + bad[0] if bad else 'on another rank'}); method.update.learning_rate={update.learning_rate:g} "
            "too high? Lower it or set method.update.max_grad_norm; no checkpoint holds these weights (run.resume=auto "
            "continues from the newest one, written before this update)")

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Train to ``run.iterations``: resumable, checkpointed, stoppable by SIGTERM/SIGUSR1.

        Rank 0 owns the run folder for the whole run (:class:`RunFolder`: a lock; a second training
        on it fails at once). Nothing is written before the start has succeeded (the folder claimed,
        the checkpoint to resume from checked and loaded); then the folder is made ready: stale
        temporary files removed, an old run replaced (``run.overwrite``) or one that never reached a
        checkpoint started over, metric rows after the resumed checkpoint dropped.

        On SIGTERM or SIGUSR1 (Slurm's pre-emption warning) the current iteration finishes, a
        checkpoint is written and the run returns normally (exit 0 from the CLI). With several
        processes, rank 0 writes every file and a signal on any rank stops all of them together.
        An update that makes the weights non-finite stops the run (:class:`NonFiniteWeightsError`)
        before anything holds them.
        """
        started = time.perf_counter()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS if can_handle_signals()}
        try:
            folder = self._on_main(lambda: RunFolder.claim(self.output_dir), share=False)  # None on other ranks
            try:
                return self._run(folder, started)
            finally:
                if folder is not None:
                    folder.release()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self, folder: RunFolder | None) -> tuple[Path | None, float | None, float | None]:
        """Load the checkpoint to resume from (checked; reads only), then make the folder ready (rank 0).
        Returns the checkpoint and the evaluations it recorded."""
        cfg = self.config
        kind = self._on_main(lambda: plan_start(self.output_dir, cfg.run.resume, cfg.run.overwrite))
        resume_from = None
        if kind is Start.RESUME:
            found = self._on_main(lambda: find_resume(self.output_dir / "checkpoints", cfg.run.resume, set_aside=True))
            resume_from = None if found is None else Path(found)
        eval_start = eval_end = None
        if resume_from is not None:
            state = self.restore(resume_from, verify=not self.dist.is_main)
            eval_start, eval_end = state.eval_reward_start, state.eval_reward_last
        if folder is not None:  # the first writes
            folder.clean_stale()
            if kind in (Start.REPLACE, Start.START_OVER):
                cleared = folder.clear_outputs()
                if kind is Start.START_OVER and cleared:
                    _warn(f"{self.output_dir} holds a run that stopped before its first checkpoint: starting it over "
                          f"(its {', '.join(cleared)} replaced)")
            elif resume_from is not None:
                truncate_metrics(self.output_dir / "metrics.jsonl", self.iteration)
            # recorded without overwrite, so running the recorded config again never deletes this run
            atomic_write_text(self.output_dir / "config.yaml",
                              dump_config(replace(cfg, run=replace(cfg.run, overwrite=False))))
        return resume_from, eval_start, eval_end

    def _run(self, folder: RunFolder | None, started: float) -> RunSummary:
        cfg, main = self.config, self.dist.is_main
        resume_from, eval_start, eval_end = self._start(folder)
        logger = (
            MetricsLogger(self.output_dir, tensorboard=cfg.run.tensorboard, progress=cfg.run.progress,
                          total=cfg.run.iterations, initial=self.iteration,
                          wandb_project=cfg.run.wandb_project if cfg.run.wandb else None, config=to_dict(cfg))
            if main else None
        )
        try:
            if resume_from is None:
                eval_start = eval_end = self.evaluate(f"iter_{self.iteration:06d}")
                if logger:
                    logger.log_eval(self.iteration, eval_start, self.last_eval.diversity_metrics(), self.last_eval.grid)
            while self.iteration < cfg.run.iterations and not self._should_stop():
                metrics = self.step()
                if logger:
                    logger.log(metrics)
                self.check_finite(metrics["iteration"])
                done = self.iteration
                if (cfg.eval.every and done % cfg.eval.every == 0) or done == cfg.run.iterations:
                    eval_end = self.evaluate(f"iter_{done:06d}")
                    if logger:
                        logger.log_eval(done, eval_end, self.last_eval.diversity_metrics(), self.last_eval.grid)
                if cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0:
                    self.save_checkpoint(eval_start, eval_end)
            if self._stop_signal is not None:
                self.save_checkpoint(eval_start, eval_end)
                if logger:
                    logger.message(f"{self._stop_signal}: checkpoint written at iteration {self.iteration}; "
                                   "resume with run.resume=auto")
        finally:
            if logger:
                logger.close()
        if self._stop_signal is None:  # every rank joins the gathers, rank 0 writes
            weights = full_model_state(self.model.trainable, keep=main)
            ema = full_state(self.ema, keep=main) if self.ema is not None else None
            if main:
                save_weights(self.model.trainable, self.output_dir / "weights", state=weights)
                if ema is not None:
                    atomic_save_safetensors(ema, self.output_dir / "weights" / "ema.safetensors")
        summary = RunSummary(
            output_dir=str(self.output_dir),
            iterations=self.iteration,
            eval_reward_start=eval_start,
            eval_reward_end=eval_end,
            seconds=time.perf_counter() - started,
            stopped_by_signal=self._stop_signal,
        )
        if main:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
        self.dist.barrier()
        return summary

    def _should_stop(self) -> bool:
        """A stop signal on any rank stops every rank after the same iteration."""
        stop = self.dist.any(self._stop_signal is not None)
        if stop and self._stop_signal is None:
            self._stop_signal = "SIGTERM"
        return stop


def _warn(text: str) -> None:
    import sys

    print(f"branchgrpo: warning: {text}", file=sys.stderr)


def _shard_root(bundle: PolicyBundle) -> torch.nn.Module:
    """The module FSDP wraps: the transformer (of a LoRA run too: its frozen base is sharded as well)."""
    from branchgrpo.models.lora import LoraWeights

    trainable = bundle.trainable
    return trainable.transformer if isinstance(trainable, LoraWeights) else trainable


def train(config: TrainConfig) -> RunSummary:
    """Run a whole training job described by ``config``."""
    return Trainer(config).run()
