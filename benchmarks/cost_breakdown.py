"""Where an iteration's seconds go, per method: why ``measured / ideal`` exceeds 1 for the cheap methods.

``branchgrpo bench``'s ``ideal_ratio`` prices only model calls (rollout calls and training forwards,
at ``dancegrpo``'s own cost per call); everything else an iteration does is attributed to the tree
engine. This script splits an iteration of each method into timed parts, by wrapping the functions
the trainer calls (behaviour unchanged):

- encode, rollout, reward (the trainer's own phase timers);
- scoring and edge gathering (``score_tree``, ``gather_training_edges``);
- training forwards (``_micro_batch_terms``: also records how many rows each micro-batch carried),
  backward + loss bookkeeping (the rest of ``policy_update``), gradient clipping and optimizer steps;
- what is left of the trainer's train phase (EMA, metrics).

Methods step interleaved, one iteration each in turn, on the digits world; the first ``--warmup``
iterations of each are not counted. Writes ``benchmarks/results/cost_breakdown.json`` and ``.md``.

    OMP_NUM_THREADS=2 python benchmarks/cost_breakdown.py --methods dancegrpo,branchgrpo-mix,branchgrpo-deppru
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

import branchgrpo.train.trainer as trainer_module
import branchgrpo.update as update_module
from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import Trainer

RESULTS = Path(__file__).parent / "results"
PARTS = ("encode", "rollout", "reward", "score_and_gather", "training_forwards", "backward_and_rest",
         "clip_and_optimizer", "train_other")


class Timers:
    """Seconds per named part in the current iteration, and the rows of each training micro-batch."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.micro_batch_rows: list[int] = []

    def wrap(self, module, name: str, part: str, rows=None) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
                if rows is not None:
                    self.micro_batch_rows.append(rows(*args, **kwargs))

        setattr(module, name, timed)


@contextmanager
def instrumented(timers: Timers):
    saved = {(m, n): getattr(m, n) for m, n in [
        (trainer_module, "score_tree"), (trainer_module, "gather_training_edges"),
        (trainer_module, "policy_update"), (update_module, "_micro_batch_terms"),
        (update_module, "_clip_gradients")]}
    timers.wrap(trainer_module, "score_tree", "score_and_gather")
    timers.wrap(trainer_module, "gather_training_edges", "score_and_gather")
    timers.wrap(trainer_module, "policy_update", "policy_update")
    timers.wrap(update_module, "_micro_batch_terms", "training_forwards", rows=lambda *a, **k: int(a[3].numel()))
    timers.wrap(update_module, "_clip_gradients", "clip")
    try:  # (the optimizer's step is timed on its instance: time_optimizer)
        yield
    finally:
        for (m, n), value in saved.items():
            setattr(m, n, value)


def time_optimizer(optimizer, timers: Timers) -> None:
    step = optimizer.step

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            timers.seconds["optimizer"] += time.perf_counter() - start

    optimizer.step = timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dancegrpo,branchgrpo-mix,branchgrpo-deppru")
    parser.add_argument("--config", default=None, help="a train config (default: the digits world)")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "cost_breakdown")
    args = parser.parse_args()
    methods = args.methods.split(",")
    tmp = tempfile.mkdtemp(prefix="cost-breakdown-")
    trainers, timers = {}, {}
    for name in methods:
        config = load_train_config(args.config, name, [f"run.output_dir={tmp}/{name}", "run.dump_tree_every=0",
                                                       "run.progress=false", "run.tensorboard=false"])
        trainers[name] = Trainer(config)
        timers[name] = Timers()
        time_optimizer(trainers[name].optimizer, timers[name])
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    batches: dict[str, list[int]] = {name: [] for name in methods}
    for it in range(args.warmup + args.iterations):
        for name in methods:
            t = timers[name]
            t.seconds.clear()
            t.micro_batch_rows.clear()
            with instrumented(t):
                metrics = trainers[name].step()
            s = t.seconds
            record = {
                "iteration": metrics["time/iteration"],
                "encode": metrics["time/encode"], "rollout": metrics["time/rollout"], "reward": metrics["time/reward"],
                "score_and_gather": s["score_and_gather"], "training_forwards": s["training_forwards"],
                "clip_and_optimizer": s["clip"] + s["optimizer"],
                "backward_and_rest": s["policy_update"] - s["training_forwards"] - s["clip"] - s["optimizer"],
                "train_other": metrics["time/train"] - s["score_and_gather"] - s["policy_update"],
                "training_rows": float(sum(t.micro_batch_rows)), "training_micro_batches": float(len(t.micro_batch_rows)),
                "rollout_calls": metrics["nfe/rollout_calls_measured"],
            }
            if it >= args.warmup:
                rows[name].append(record)
                batches[name] += t.micro_batch_rows
    medians = {name: {k: statistics.median(r[k] for r in rows[name]) for k in rows[name][0]} for name in methods}
    for name in methods:
        sizes = batches[name]
        medians[name]["mean_rows_per_micro_batch"] = sum(sizes) / max(len(sizes), 1)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": "python benchmarks/cost_breakdown.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                  for k, v in vars(args).items() if k != "out"),
        "iterations_counted": args.iterations, "medians": medians,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Cost breakdown per iteration ({result['date']})", "",
             f"`{result['command']}` — {result['machine']}, torch {result['torch']}, {result['threads']} threads; "
             f"medians over {args.iterations} interleaved iterations per method, milliseconds.", "",
             "| part | " + " | ".join(f"`{m}`" for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for part in (*PARTS, "iteration"):
        lines.append(f"| {part} | " + " | ".join(f"{medians[m][part] * 1e3:.1f}" for m in methods) + " |")
    for key in ("rollout_calls", "training_rows", "training_micro_batches", "mean_rows_per_micro_batch"):
        lines.append(f"| {key} | " + " | ".join(f"{medians[m][key]:.1f}" for m in methods) + " |")
    lines.append("| ms per training row (forwards only) | " + " | ".join(
        f"{medians[m]['training_forwards'] / max(medians[m]['training_rows'], 1) * 1e3:.2f}" for m in methods) + " |")
    lines.append("| ms per training row (forward + backward) | " + " | ".join(
        f"{(medians[m]['training_forwards'] + medians[m]['backward_and_rest']) / max(medians[m]['training_rows'], 1) * 1e3:.2f}"
        for m in methods) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
