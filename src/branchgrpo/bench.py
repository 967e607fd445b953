"""`branchgrpo bench`: the Table-1 methods measured side by side on one engine.

Every method trains the same model from the same weights with the same reward, prompts and
seeds; iterations are interleaved across methods (method A iteration k, method B iteration k, …)
so that machine drift affects all of them alike. Writes ``bench.csv``, ``bench.md``, ``bench.json``
and PNG plots of held-out reward against iteration and against training wall-clock. Every evaluation
also records the samples' diversity (:mod:`branchgrpo.diversity`); the table shows it at the end.

With ``seeds`` > 1 every method trains once per seed, all runs interleaved (every method × seed
advances one iteration in turn), and ``bench.md`` adds a learning-efficiency table: per method the
mean and 95 % Student-t interval over seeds of the reward at equal wall-clock, the seconds to the
reference's final reward, the area under reward-vs-seconds, the end diversity and the diversity
at the reference's final reward (:mod:`branchgrpo.bench_stats`); ``diversity_vs_reward.png`` plots
every evaluation's diversity against its reward. The cost table stays one run per method (the first seed).
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from branchgrpo.bench_combine import run_settings
from branchgrpo.bench_costs import PRICED_WORK, cost_lines, ideal_seconds, measured_over_ideal, seed_cost_ratios
from branchgrpo.bench_plots import diversity_plot, reward_plots, seed_plot
from branchgrpo.bench_stats import Interval, RunCurve, efficiency_lines, format_interval, learning_efficiency
from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import Trainer
from branchgrpo.tree.presets import TABLE1_PRESETS
from branchgrpo.update import TrainingEdges, edge_log_probs


@dataclass
class MethodRecord:
    """What one method did during the bench."""

    method: str
    iteration_times: list[float] = field(default_factory=list)  # rollout + reward + train, per iteration
    phase_times: dict[str, list[float]] = field(default_factory=dict)
    nfe_sums: dict[str, float] = field(default_factory=dict)  # per leaf, summed over iterations
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (iteration, train seconds, reward)
    diversity: list[dict[str, float | None]] = field(default_factory=list)  # per eval: diversity_pixel/_feature
    calls: dict[str, float] = field(default_factory=dict)  # absolute model calls summed over iterations
    seed: int = 0  # run.seed of this run
    iteration_calls: list[dict[str, float]] = field(default_factory=list)  # absolute model calls, per iteration

    def first(self, n: int) -> "MethodRecord":
        """This run's first ``n`` iterations (times, phase times and model calls; not its evaluations).

        The cost table reads the interleaved rounds only: after them an ``--equal-time`` bench lets the
        cheaper runs train on without the reference, so their later iterations sample another stretch
        of the machine's speed than the reference's did (on a shared VM that drifts by ±20 % over minutes)."""
        if n >= len(self.iteration_times) or len(self.iteration_calls) != len(self.iteration_times):
            return self
        calls: dict[str, float] = {}
        for row in self.iteration_calls[:n]:
            for key, value in row.items():
                calls[key] = calls.get(key, 0.0) + value
        return MethodRecord(self.method, iteration_times=self.iteration_times[:n],
                            phase_times={k: v[:n] for k, v in self.phase_times.items()},
                            calls=calls, seed=self.seed, iteration_calls=self.iteration_calls[:n])

    def unit_costs(self) -> dict[str, float]:
        """Seconds per unit of each counted work (:data:`branchgrpo.bench_costs.PRICED_WORK`: rollout
        call, training forward(+backward) row, scored sample, prompt group), measured in this method's
        own iterations: the phase's seconds over the units that phase handled."""
        return {work: sum(self.phase_times[phase]) / max(self.calls[work], 1.0)
                for work, phase in PRICED_WORK.items() if work in self.calls and phase in self.phase_times}

    @property
    def calls_per_iteration(self) -> dict[str, float]:
        """Each counted work's units in one iteration (mean over iterations, every prompt group of
        the iteration): what an iteration's time is spent on."""
        n = len(self.iteration_times)
        return {work: self.calls[work] / n for work in PRICED_WORK if work in self.calls}

    @property
    def nfe(self) -> dict[str, float]:
        """Per-leaf NFE counts averaged over this method's iterations."""
        return {k: v / len(self.iteration_times) for k, v in self.nfe_sums.items()}

    @property
    def train_seconds(self) -> float:
        return sum(self.iteration_times)

    def reward_at_seconds(self, seconds: float) -> float:
        """Held-out reward of the last evaluation at or before ``seconds`` of training."""
        value = self.evals[0][2]
        for _, t, reward in self.evals:
            if t <= seconds + 1e-9:
                value = reward
        return value

    def add_eval(self, trainer: Trainer, tag: str) -> None:
        """Evaluate ``trainer`` now: held-out reward at this many iterations and training seconds."""
        reward = trainer._evaluate(tag)
        self.evals.append((len(self.iteration_times), self.train_seconds, reward))
        metrics = trainer.last_eval.diversity_metrics()
        self.diversity.append({k: (v if math.isfinite(v) else None) for k, v in metrics.items()})

    def end_diversity(self, key: str) -> float | None:
        """``diversity_pixel`` or ``diversity_feature`` of the last evaluation (None: not measured)."""
        return self.diversity[-1].get(key) if self.diversity else None

    def seconds_to_reach(self, reward: float) -> float | None:
        for _, t, r in self.evals:
            if r >= reward:
                return t
        return None

    def curve(self) -> RunCurve:
        """This run's evaluations as a reward-vs-training-seconds curve (for :mod:`branchgrpo.bench_stats`)."""
        return RunCurve(self.seed, [e[1] for e in self.evals], [e[2] for e in self.evals],
                        self.end_diversity("diversity_feature"), self.end_diversity("diversity_pixel"),
                        [d.get("diversity_feature") for d in self.diversity] if self.diversity else None)

    @classmethod
    def from_saved(cls, method: str, saved: dict) -> "MethodRecord":
        """A run from :meth:`saved`'s dict (``bench.json``'s ``seeds``). Files from before per-iteration
        calls were kept spread the total calls evenly over the iterations; a run saved without cost
        fields (a ``--combine`` result) comes back with its evaluations only."""
        times = saved.get("iteration_times", [])
        calls = saved.get("calls", {})
        per_iteration = saved.get("iteration_calls") or (
            [{k: v / len(times) for k, v in calls.items()}] * len(times) if times else [])
        return cls(method, iteration_times=list(times), phase_times=saved.get("phase_times", {}), calls=calls,
                   evals=[tuple(e) for e in saved.get("evals", [])], diversity=saved.get("diversity", []),
                   seed=saved["seed"], iteration_calls=per_iteration)

    def saved(self) -> dict:
        """Everything this run measured, for ``bench.json``."""
        return {"seed": self.seed, "evals": self.evals, "diversity": self.diversity,
                "iteration_times": self.iteration_times, "phase_times": self.phase_times, "calls": self.calls,
                "iteration_calls": self.iteration_calls}


def reference_method(methods: list[str]) -> str:
    """What the ratios divide by: ``dancegrpo`` (tf = 1.0) when it ran, else the first method."""
    return "dancegrpo" if "dancegrpo" in methods else methods[0]


def measure_unit_costs(trainer: Trainer, repeats: int = 5) -> tuple[float, float]:
    """Seconds per rollout row (forward) and per training row (forward + backward) at the
    engine's micro-batch sizes, on the bench's own model."""
    gen, method = trainer.model, trainer.config.method
    prompts = gen.train_prompts[:1]
    cond = gen.encode_prompts(prompts)
    rows_roll, rows_train = method.engine.rollout_micro_batch, method.engine.train_micro_batch
    x = torch.randn(rows_roll, *gen.latent_shape, device=trainer.device)
    index = torch.zeros(rows_roll, dtype=torch.long)
    cond_rows = {k: v[index.to(v.device)] for k, v in cond.items()}
    sigmas = torch.full((rows_roll,), 0.5, device=trainer.device)

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    with torch.no_grad():
        roll = timed(lambda: gen.policy(x, sigmas, cond_rows)) / rows_roll
    edges = TrainingEdges(
        parent_latents=x[:rows_train], parent_sigma=torch.full((rows_train,), 0.5),
        parent_sigma_next=torch.full((rows_train,), 0.4), parent_prompt=torch.zeros(rows_train, dtype=torch.long),
        parent_step=torch.zeros(rows_train, dtype=torch.long), child_latents=x[:rows_train],
        edge_parent=torch.arange(rows_train), lp_old=torch.zeros(rows_train, device=trainer.device),
        advantage=torch.ones(rows_train, device=trainer.device), normaliser=float(rows_train),
    )
    counts = torch.ones(rows_train, dtype=torch.long)
    starts = torch.arange(rows_train)

    def train_step():
        lp, _, _, _ = edge_log_probs(gen.policy, edges, torch.arange(rows_train), cond, method, starts, counts)
        lp.sum().backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    train = timed(train_step) / rows_train
    return roll, train


def run_bench(
    methods: list[str],
    iterations: int,
    eval_every: int,
    out_dir: Path,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    make_trainer=None,
    equal_time: bool = False,
    seeds: int = 1,
    seconds: float = 0.0,
    variants: dict[str, tuple[str, list[str]]] | None = None,
) -> dict:
    """Train every method for ``iterations`` interleaved iterations; write the result files.

    Each method's config is ``config_file`` + its preset + ``overrides`` (the same for all) +
    ``run.seed``. ``seeds`` runs per method use ``run.seed`` = the configured seed + 0 … seeds − 1;
    every method × seed run advances one iteration in turn. With ``equal_time`` the runs then keep
    training, still interleaved, until each has spent the reference's (``dancegrpo``'s) training
    seconds with the same seed; ``seconds`` > 0 likewise trains every run to at least that many
    training seconds. ``variants`` maps a method label to ``(preset, extra overrides)`` (e.g. one
    learning-rate cell of ``benchmarks/sweep.py``); other labels are preset names.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_overrides = [f"run.output_dir={out_dir}", "run.dump_tree_every=0", "run.progress=false",
                      "run.tensorboard=false", *(overrides or [])]
    variants = variants or {}

    def config_for(label: str, seed: int | None = None):
        preset, extra = variants.get(label, (label, []))
        return load_train_config(config_file, preset, [*base_overrides, *extra,
                                                       *([] if seed is None else [f"run.seed={seed}"])])

    first_seed = config_for(methods[0]).run.seed
    seed_values = [first_seed + k for k in range(seeds)]
    trainers: dict[tuple[str, int], Trainer] = {}
    records: dict[tuple[str, int], MethodRecord] = {}
    base = None
    for seed in seed_values:  # seed-major: the interleaving order below
        for name in methods:
            config = config_for(name, seed)
            base = base or config
            trainers[(name, seed)] = make_trainer(config) if make_trainer else Trainer(config)
            records[(name, seed)] = MethodRecord(name, seed=seed)

    # before anything trains: adaptive split placement rewrites a run's tree.split_plan as it goes
    settings = {name: run_settings(trainers[(name, seed_values[0])].config) for name in methods}

    def tag(key: tuple[str, int], what: str) -> str:  # sample-grid file names; one seed keeps the old names
        return f"{key[0]}-{what}" if seeds == 1 else f"{key[0]}-seed{key[1]}-{what}"

    for key, trainer in trainers.items():
        records[key].add_eval(trainer, tag(key, "start"))
    reference = reference_method(methods)

    def step(key: tuple[str, int]) -> None:
        record = records[key]
        _record_step(record, trainers[key].step())
        done = len(record.iteration_times)
        if done % eval_every == 0:
            record.add_eval(trainers[key], tag(key, str(done)))

    for _ in range(iterations):
        for key in trainers:
            step(key)

    def budget(seed: int) -> float:
        return max(records[(reference, seed)].train_seconds if equal_time else 0.0, seconds)

    # cheaper runs go on training (still interleaved) up to the reference's seconds / the budget
    while behind := [key for key in trainers if records[key].train_seconds < budget(key[1])]:
        for key in behind:
            step(key)
    for key, record in records.items():  # a final evaluation where the last step was not an evaluation step
        done = len(record.iteration_times)
        if record.evals[-1][0] != done:
            record.add_eval(trainers[key], tag(key, str(done)))
    probe_costs = measure_unit_costs(next(iter(trainers.values())))
    by_method = {name: [records[(name, seed)] for seed in seed_values] for name in methods}
    return write_results({name: runs[0] for name, runs in by_method.items()}, methods, probe_costs, base,
                         iterations, out_dir, equal_time, seed_records=by_method, seconds=seconds,
                         variants={k: v for k, v in variants.items() if k in methods},
                         settings=settings)


def _record_step(record: MethodRecord, metrics: dict) -> None:
    record.iteration_times.append(metrics["time/iteration"])
    for phase in ("encode", "rollout", "reward", "train"):
        record.phase_times.setdefault(phase, []).append(metrics[f"time/{phase}"])
    leaves = metrics["nfe/leaves"]
    for key in ("rollout_calls", "trained_edges", "training_forwards"):  # per-leaf sums; averaged when written
        record.nfe_sums[key] = record.nfe_sums.get(key, 0.0) + metrics[f"nfe/{key}"] / leaves
    # nfe/* are per prompt group; the model ran them for every group of this process
    groups = metrics["nfe/rollout_calls_measured"] / metrics["nfe/rollout_calls"]
    calls = {"rollout_calls": float(metrics["nfe/rollout_calls_measured"]),
             "training_forwards": metrics["nfe/training_forwards"] * groups,
             "scored_samples": leaves * groups, "prompt_groups": groups}
    record.iteration_calls.append(calls)
    for key, value in calls.items():
        record.calls[key] = record.calls.get(key, 0.0) + value


def write_results(records, methods, probe_costs, base, iterations, out_dir: Path, equal_time: bool = False,
                  seed_records: dict[str, list[MethodRecord]] | None = None, seconds: float = 0.0,
                  variants: dict[str, tuple[str, list[str]]] | None = None,
                  settings: dict[str, dict] | None = None) -> dict:
    """``ideal_ratio`` prices every method's model calls at the reference's own measured cost per
    call (its rollout seconds per rollout call, its training seconds per training forward), so
    ``measured_over_ideal`` isolates what the tree engine adds beyond its model calls compared with
    the flat one. ``ideal_ratio_probe`` uses isolated full-micro-batch probes instead (shown for
    reference: warm-cache probes miss what real iterations pay, e.g. small early frontiers).

    ``records`` holds one run per method (the cost table); ``seed_records`` every seed's run
    (the learning-efficiency table; default: ``records`` as one seed)."""
    reference = reference_method(methods)
    seed_records = seed_records or {name: [records[name]] for name in methods}
    seed_values = [r.seed for r in seed_records[reference]]
    efficiency = learning_efficiency({name: [r.curve() for r in seed_records[name]] for name in methods}, reference)
    cost_over_seeds = seed_cost_ratios(seed_records, reference, iterations)
    # the cost columns: the interleaved rounds, where every run alternates with the reference's
    costed = {name: r.first(iterations) for name, r in records.items()}
    ref_costs = costed[reference].unit_costs()
    roll_cost, train_cost = ref_costs["rollout_calls"], ref_costs["training_forwards"]
    probed = {**ref_costs, "rollout_calls": probe_costs[0], "training_forwards": probe_costs[1]}

    ideal = ideal_seconds
    ref_time = statistics.median(costed[reference].iteration_times)
    ref_ideal, ref_probe = ideal(costed[reference], ref_costs), ideal(costed[reference], probed)
    budget = min(r.train_seconds for r in records.values())
    ref_final = records[reference].evals[-1][2]
    ref_diversity = records[reference].end_diversity("diversity_feature")

    def rounded(value: float | None, digits: int = 4) -> float | None:
        return None if value is None else round(value, digits)

    rows = []
    for name in methods:
        r, c = records[name], costed[name]
        median = statistics.median(c.iteration_times)
        reach = r.seconds_to_reach(ref_final)
        rows.append({
            "method": name,
            "iterations": len(r.iteration_times),
            "train_seconds": round(r.train_seconds, 2),
            "nfe_old_per_leaf": round(r.nfe["rollout_calls"], 4),
            "nfe_train_per_leaf": round(r.nfe["training_forwards"], 4),
            "trained_edges_per_leaf": round(r.nfe["trained_edges"], 4),
            "iter_time_s": round(median, 4),
            "time_ratio": round(median / ref_time, 4),
            "ideal_ratio": round(ideal(c, ref_costs) / ref_ideal, 4),
            "measured_over_ideal": round(measured_over_ideal(c, costed[reference]), 4),
            "ideal_ratio_probe": round(ideal(c, probed) / ref_probe, 4),
            "rollout_ms_per_call": round(c.unit_costs()["rollout_calls"] * 1e3, 4),
            "train_ms_per_forward": round(c.unit_costs()["training_forwards"] * 1e3, 4),
            "rollout_s": round(statistics.median(c.phase_times["rollout"]), 4),
            "train_s": round(statistics.median(c.phase_times["train"]), 4),
            "start_reward": round(r.evals[0][2], 4),
            "final_reward": round(r.evals[-1][2], 4),
            "reward_at_equal_time": round(r.reward_at_seconds(budget), 4),
            "seconds_to_reference_final": None if reach is None else round(reach, 2),
            "fraction_of_reference_time": None if reach is None else round(reach / records[reference].train_seconds, 4),
            "end_diversity_pixel": rounded(r.end_diversity("diversity_pixel")),
            "end_diversity_feature": rounded(r.end_diversity("diversity_feature")),
            "end_diversity_ratio": (rounded(r.end_diversity("diversity_feature") / ref_diversity)
                                    if r.end_diversity("diversity_feature") is not None and ref_diversity else None),
            "cost_iterations": len(c.iteration_times),  # the iterations the cost columns read
        })
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "bench.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.node()} torch {torch.__version__} "
                   f"threads={torch.get_num_threads()} cuda={torch.cuda.is_available()}",
        "iterations": iterations,
        "equal_time": equal_time,
        "prompts_per_iteration": base.data.prompts_per_iteration,
        "model": base.model.family,
        "unit_cost_rollout_row_s": roll_cost,
        "unit_cost_train_row_s": train_cost,
        "probe_cost_rollout_row_s": probe_costs[0],
        "probe_cost_train_row_s": probe_costs[1],
        "unit_cost_reward_sample_s": ref_costs.get("scored_samples"),
        "unit_cost_encode_group_s": ref_costs.get("prompt_groups"),
        "equal_time_budget_s": budget,
        "reference": reference,
        "seeds": seed_values,
        "seconds_budget": seconds,
        "method_overrides": {k: {"preset": v[0], "overrides": list(v[1])} for k, v in (variants or {}).items()},
        "settings": settings,  # per method: its resolved config but seed and folder (checked by --combine)
        "settings_at": "start",  # read before training (older benches: after, with adaptive splits moved)
    }
    per_iteration = {k: {"iteration_times": r.iteration_times, "phase_times": r.phase_times, "calls": r.calls,
                         "iteration_calls": r.iteration_calls} for k, r in records.items()}
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows, "evals": {k: r.evals for k, r in records.items()},
                                                    "diversity": {k: r.diversity for k, r in records.items()},
                                                    "per_iteration": per_iteration,
                                                    "learning_efficiency": efficiency,
                                                    "cost_over_seeds": cost_over_seeds,
                                                    "seeds": {k: [r.saved() for r in runs] for k, runs in seed_records.items()}},
                                                   indent=2))
    lines = [
        f"# branchgrpo bench — {meta['model']} world, {iterations} interleaved iterations"
        + (f" × {len(seed_values)} seeds" if len(seed_values) > 1 else "")
        + (f", then each method up to `{reference}`'s training seconds" if equal_time else "")
        + (f", then each run up to {seconds:g} training seconds" if seconds > 0 else ""),
        "",
        f"- date: {meta['date']}; machine: {meta['machine']}",
        *([f"- the cost table: the runs with seed {seed_values[0]}; the learning-efficiency table below: "
           f"seeds {', '.join(map(str, seed_values))}"] if len(seed_values) > 1 else []),
        f"- prompts per iteration: {meta['prompts_per_iteration']}; reference: `{reference}`",
        *[f"- `{label}`: preset `{v['preset']}` with "
          + (", ".join(f"`{o}`" for o in v["overrides"]) or "no extra overrides")
          for label, v in meta["method_overrides"].items()],
        f"- unit costs measured in `{reference}`'s iterations: one rollout call (forward) {roll_cost * 1e3:.3f} ms, "
        f"one training row (forward + backward) {train_cost * 1e3:.3f} ms (ratio {train_cost / roll_cost:.2f}); "
        f"isolated full-micro-batch probes: {probe_costs[0] * 1e3:.3f} ms and {probe_costs[1] * 1e3:.3f} ms "
        f"(ratio {probe_costs[1] / probe_costs[0]:.2f})"
        + (f"; one scored sample (reward phase) {ref_costs['scored_samples'] * 1e3:.3f} ms, one prompt group's "
           f"encoding {ref_costs['prompt_groups'] * 1e3:.3f} ms" if "prompt_groups" in ref_costs else ""),
        f"- `ideal_ratio` = (rollout calls × rollout cost + training forwards × training cost + scored samples × "
        f"reward cost + prompt groups × encode cost) of one iteration relative to `{reference}` with the in-run unit "
        f"costs (`ideal_ratio_probe`: the probes for the model calls); `time_ratio` = measured median iteration "
        f"time relative to `{reference}`",
        f"- the cost columns (from `iter_time_s` to `train_s`) read each run's first `cost_iterations` iterations, the "
        f"{iterations} interleaved rounds in which every run alternates with `{reference}`'s; `iterations`, "
        "`train_seconds` and the reward columns cover the whole run",
        *([f"- the measured/ideal target reads every seed's run against `{reference}`'s of the same seed (over the "
           "interleaved rounds) and judges the mean over seeds; one run's reading moves by several percent with the "
           "machine"] if len(seed_values) > 1 else []),
        f"- reward at equal wall-clock: the last held-out evaluation within {budget:.1f} s of training "
        "(the shortest total among the methods)",
        "- end diversity: at the last evaluation, the mean over held-out prompts of the mean pairwise distance "
        "among a prompt's samples, in pixels (RMS difference) and in fixed random-conv features (unit vectors, "
        f"0–2); `end_diversity_ratio` = feature diversity relative to `{reference}` (– with one sample per prompt)",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
    ]
    for row in rows:
        lines.append("| " + " | ".join("–" if v is None else str(v) for v in row.values()) + " |")
    lines += _target_lines({row["method"]: row for row in rows}, reference, cost_over_seeds)
    lines += ["", *efficiency_lines(efficiency)]
    if len(seed_values) > 1:
        lines += cost_lines(cost_over_seeds, reference, iterations)
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    reward_plots(records, out_dir)
    seed_plot(seed_records, out_dir)
    diversity_plot(seed_records, out_dir / "diversity_vs_reward.png")
    return {"meta": meta, "rows": rows, "learning_efficiency": efficiency, "cost_over_seeds": cost_over_seeds}


# Issue targets on the digits world: method → largest time_ratio to `dancegrpo`.
TIME_RATIO_TARGETS = {"branchgrpo": 0.70, "branchgrpo-widpru": 0.50, "branchgrpo-deppru": 0.50, "branchgrpo-mix": 0.35}


def _target_lines(rows: dict[str, dict], reference: str, cost_over_seeds: dict[str, dict] | None = None) -> list[str]:
    """The project's efficiency targets checked against this run (only those whose methods ran).

    With several seeds, measured/ideal is judged on its mean over the seeds (``cost_over_seeds``,
    :func:`branchgrpo.bench_costs.seed_cost_ratios`), shown with its interval and the first seed's run."""
    if reference != "dancegrpo":
        return []
    lines = ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, row in rows.items():
        over = (cost_over_seeds or {}).get(name)
        if over is not None and over["n"] > 1:
            value = over["mean"]
            shown = (f"{format_interval(Interval(over['mean'], over['low'], over['high'], over['n']), 3)} "
                     f"(mean over {over['n']} seeds; the cost table's run: {row['measured_over_ideal']})")
        else:
            value = shown = row["measured_over_ideal"]
        lines.append(f"| `{name}` measured/ideal ≤ 1.05 | {shown} | {'yes' if value <= 1.05 else 'no'} |")
    for name, limit in TIME_RATIO_TARGETS.items():
        if name in rows:
            ratio = rows[name]["time_ratio"]
            lines.append(f"| `{name}` time_ratio ≤ {limit} | {ratio} | {'yes' if ratio <= limit else 'no'} |")
    for name, row in rows.items():
        ratio = row["end_diversity_ratio"]
        if name != reference and ratio is not None:
            lines.append(f"| `{name}` end feature diversity ≥ 90% of `{reference}`'s | {ratio} | "
                         f"{'yes' if ratio >= 0.9 else 'no'} |")
    if "branchgrpo-deppru" in rows:
        row = rows["branchgrpo-deppru"]
        fraction = row["fraction_of_reference_time"]
        reached = fraction is not None and fraction <= 0.5 and row["final_reward"] >= rows[reference]["final_reward"]
        shown = "not reached" if fraction is None else f"{fraction} of the time, final {row['final_reward']}"
        lines.append(f"| `branchgrpo-deppru` reaches `dancegrpo`'s final reward ({rows[reference]['final_reward']}) "
                     f"in ≤ 50% of its wall-clock and ends at or above it | {shown} | {'yes' if reached else 'no'} |")
    return lines


__all__ = ["run_bench", "MethodRecord", "measure_unit_costs", "TABLE1_PRESETS"]
