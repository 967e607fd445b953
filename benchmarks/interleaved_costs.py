"""measured/ideal of finished benches, over every iteration and over the interleaved rounds only.

An ``--equal-time`` bench alternates every method × seed run for ``meta.iterations`` rounds; after
them the cheaper runs train on without the reference. ``branchgrpo bench`` now prices its cost
columns over the interleaved rounds; this script recomputes both readings from the ``bench.json``
of benches written before that (per run: median iteration time over the reference's of the same
seed, divided by the ideal ratio with the reference's in-run unit costs of those iterations; the
model calls per iteration are the run's mean over all its iterations, which older files keep).

    python benchmarks/interleaved_costs.py benchmarks/results/le-digits-3seeds ... > out.md
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def run_costs(run: dict, k: int | None) -> tuple[float, dict[str, float], float, float]:
    times = run["iteration_times"][:k]
    phases = run["phase_times"]
    calls = {name: total / len(run["iteration_times"]) for name, total in run["calls"].items()}
    roll = sum(phases["rollout"][:k]) / (calls["rollout_calls"] * len(times))
    train = sum(phases["train"][:k]) / (max(calls["training_forwards"], 1.0) * len(times))
    return statistics.median(times), calls, roll, train


def measured_over_ideal(run: dict, ref: dict, k: int | None) -> float:
    time, calls, _, _ = run_costs(run, k)
    ref_time, ref_calls, roll, train = run_costs(ref, k)
    ideal = ((calls["rollout_calls"] * roll + calls["training_forwards"] * train)
             / (ref_calls["rollout_calls"] * roll + ref_calls["training_forwards"] * train))
    return (time / ref_time) / ideal


def main(folders: list[str]) -> None:
    print("| bench | method | rounds | all iterations (per seed) | interleaved rounds only (per seed) |")
    print("|---|---|---|---|---|")
    for folder in folders:
        data = json.loads((Path(folder) / "bench.json").read_text())
        rounds, reference = data["meta"]["iterations"], data["meta"]["reference"]
        for method, runs in data["seeds"].items():
            if method == reference:
                continue
            refs = data["seeds"][reference]
            every = [measured_over_ideal(r, ref, None) for r, ref in zip(runs, refs)]
            head = [measured_over_ideal(r, ref, rounds) for r, ref in zip(runs, refs)]
            print(f"| {Path(folder).name} | `{method}` | {rounds} | " + " / ".join(f"{v:.3f}" for v in every)
                  + " | " + " / ".join(f"{v:.3f}" for v in head) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
