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

from branchgrpo.bench import MethodRecord, ideal_seconds


def record(method: str, run: dict) -> MethodRecord:
    """A saved run as a :class:`MethodRecord`; older files keep only total calls, spread evenly."""
    n = len(run["iteration_times"])
    per_iteration = run.get("iteration_calls") or [{k: v / n for k, v in run["calls"].items()}] * n
    return MethodRecord(method, iteration_times=run["iteration_times"], phase_times=run["phase_times"],
                        calls=run["calls"], seed=run["seed"], iteration_calls=per_iteration)


def measured_over_ideal(run: MethodRecord, ref: MethodRecord) -> float:
    costs = ref.unit_costs()
    time_ratio = statistics.median(run.iteration_times) / statistics.median(ref.iteration_times)
    return time_ratio / (ideal_seconds(run, costs) / ideal_seconds(ref, costs))


def main(folders: list[str]) -> None:
    print("| bench | method | rounds | all iterations (per seed) | interleaved rounds only (per seed) |")
    print("|---|---|---|---|---|")
    for folder in folders:
        data = json.loads((Path(folder) / "bench.json").read_text())
        rounds, reference = data["meta"]["iterations"], data["meta"]["reference"]
        refs = [record(reference, run) for run in data["seeds"][reference]]
        for method, runs in data["seeds"].items():
            if method == reference:
                continue
            records = [record(method, run) for run in runs]
            every = [measured_over_ideal(r, ref) for r, ref in zip(records, refs)]
            head = [measured_over_ideal(r.first(rounds), ref.first(rounds)) for r, ref in zip(records, refs)]
            print(f"| {Path(folder).name} | `{method}` | {rounds} | " + " / ".join(f"{v:.3f}" for v in every)
                  + " | " + " / ".join(f"{v:.3f}" for v in head) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
