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
import sys
from pathlib import Path

from branchgrpo.bench import MethodRecord
from branchgrpo.bench_costs import measured_over_ideal


def main(folders: list[str]) -> None:
    print("| bench | method | rounds | all iterations (per seed) | interleaved rounds only (per seed) |")
    print("|---|---|---|---|---|")
    for folder in folders:
        data = json.loads((Path(folder) / "bench.json").read_text())
        rounds, reference = data["meta"]["iterations"], data["meta"]["reference"]
        refs = [MethodRecord.from_saved(reference, run) for run in data["seeds"][reference]]
        for method, runs in data["seeds"].items():
            if method == reference:
                continue
            records = [MethodRecord.from_saved(method, run) for run in runs]
            every = [measured_over_ideal(r, ref) for r, ref in zip(records, refs)]
            head = [measured_over_ideal(r.first(rounds), ref.first(rounds)) for r, ref in zip(records, refs)]
            print(f"| {Path(folder).name} | `{method}` | {rounds} | " + " / ".join(f"{v:.3f}" for v in every)
                  + " | " + " / ".join(f"{v:.3f}" for v in head) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
