"""measured/ideal of finished benches, over every iteration and over the interleaved rounds only.

An ``--equal-time`` bench alternates every method × seed run for ``meta.iterations`` rounds; after
them the cheaper runs train on without the reference. ``branchgrpo bench`` now prices its cost
columns over the interleaved rounds; this script recomputes both readings from the ``bench.json``
of benches written before that (per run: median iteration time over the reference's of the same
seed, divided by the ideal ratio with the reference's in-run unit costs of those iterations; the
model calls per iteration are the run's mean over all its iterations, which older files keep).

Benches written before the bench counted scored samples and prompt groups price the model calls
only; ``--leaves-per-prompt N`` fills in those counts (N × ``meta.prompts_per_iteration`` samples,
``meta.prompts_per_iteration`` groups per iteration, one process) so the reward and encode phases
are priced as a new bench prices them. It is only right when every method of the bench scores N
leaves per prompt (``dancegrpo``, ``branchgrpo-mix`` and ``branchgrpo-adaptive-mix``: 16).

    python benchmarks/interleaved_costs.py [--leaves-per-prompt 16] benchmarks/results/le-digits-3seeds ... > out.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from branchgrpo.bench import MethodRecord
from branchgrpo.bench_costs import measured_over_ideal
from branchgrpo.bench_stats import format_interval, mean_interval


def load(method: str, run: dict, prompts: int, leaves: int | None) -> MethodRecord:
    """A saved run; with ``leaves`` its scored samples and prompt groups filled in where missing."""
    if leaves:
        n = len(run["iteration_times"])
        extra = {"scored_samples": leaves * prompts, "prompt_groups": prompts}
        per_iteration = run.get("iteration_calls") or [{k: v / n for k, v in run["calls"].items()}] * n
        run = {**run, "calls": {**{k: v * n for k, v in extra.items()}, **run["calls"]},
               "iteration_calls": [{**extra, **row} for row in per_iteration]}
    return MethodRecord.from_saved(method, run)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--leaves-per-prompt", type=int, default=None,
                        help="price the reward and encode phases of benches saved without those counts")
    args = parser.parse_args(argv)
    print("| bench | method | rounds | all iterations (per seed) | interleaved rounds only (per seed) | "
          "interleaved mean [95 %] |")
    print("|---|---|---|---|---|---|")
    pooled: dict[str, list[float]] = {}
    for folder in args.folders:
        data = json.loads((Path(folder) / "bench.json").read_text())
        meta = data["meta"]
        rounds, reference, prompts = meta["iterations"], meta["reference"], meta["prompts_per_iteration"]
        refs = {run["seed"]: load(reference, run, prompts, args.leaves_per_prompt) for run in data["seeds"][reference]}
        for method, runs in data["seeds"].items():
            if method == reference:
                continue
            records = [load(method, run, prompts, args.leaves_per_prompt) for run in runs]
            every = [measured_over_ideal(r, refs[r.seed]) for r in records]
            head = [measured_over_ideal(r.first(rounds), refs[r.seed].first(rounds)) for r in records]
            pooled.setdefault(method, []).extend(head)
            print(f"| {Path(folder).name} | `{method}` | {rounds} | " + " / ".join(f"{v:.3f}" for v in every)
                  + " | " + " / ".join(f"{v:.3f}" for v in head) + f" | {shown(head)} |")
    if len(args.folders) > 1:
        for method, values in pooled.items():
            print(f"| all {len(args.folders)} benches | `{method}` | | | {len(values)} seeds | {shown(values)} |")


def shown(values: list[float]) -> str:
    """Mean [95 % interval] of several seeds' readings; one reading as it is."""
    return format_interval(mean_interval(values)) if len(values) > 1 else f"{values[0]:.3f}"


if __name__ == "__main__":
    main()
