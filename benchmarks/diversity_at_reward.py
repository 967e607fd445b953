"""Diversity compared at equal reward, recomputed from finished benches' ``bench.json``.

End diversity mixes two things: a method that has bought more reward has fewer ways to be right.
``branchgrpo bench`` now also reports every method's feature diversity at the moment its curve first
reaches the reference's final reward (:func:`branchgrpo.bench_stats.value_at_crossing`); this script
applies the same statistics to benches written before that, and draws ``diversity_vs_reward.png``
for each.

    python benchmarks/diversity_at_reward.py benchmarks/results/le-digits-3seeds ... > out.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from branchgrpo.bench import MethodRecord
from branchgrpo.bench_plots import diversity_plot
from branchgrpo.bench_stats import Interval, RunCurve, format_interval, learning_efficiency


def curve(run: dict) -> RunCurve:
    features = [d.get("diversity_feature") for d in run["diversity"]]
    return RunCurve(run["seed"], [e[1] for e in run["evals"]], [e[2] for e in run["evals"]],
                    features[-1], run["diversity"][-1].get("diversity_pixel"), features)


def main(folders: list[str]) -> None:
    print("| bench | method | reward at equal wall-clock | end feature diversity / reference's (per seed) | "
          "feature diversity at the reference's final reward / reference's there (per seed) |")
    print("|---|---|---|---|---|")
    for folder in folders:
        data = json.loads((Path(folder) / "bench.json").read_text())
        reference = data["meta"]["reference"]
        runs = data["seeds"]
        result = learning_efficiency({m: [curve(r) for r in rs] for m, rs in runs.items()}, reference)
        ref_rows = result["methods"][reference]["per_seed"]
        for method, numbers in result["methods"].items():
            rows = numbers["per_seed"]
            end = [row["end_diversity_feature"] / ref["end_diversity_feature"] for row, ref in zip(rows, ref_rows)]
            matched = [row["diversity_ratio_at_reference_final"] for row in rows]
            cells = " / ".join("not reached" if v is None else f"{v:.0%}" for v in matched)
            matched_mean = [v for v in matched if v is not None]
            mean = f" (mean of reached seeds {sum(matched_mean) / len(matched_mean):.0%})" if matched_mean else ""
            print(f"| {Path(folder).name} | `{method}` | "
                  f"{format_interval(Interval(**numbers['reward_at_equal_time']))} | "
                  + " / ".join(f"{v:.0%}" for v in end) + f" (mean of seeds {sum(end) / len(end):.0%}) | {cells}{mean} |")
        records = {m: [MethodRecord(m, evals=[tuple(e) for e in r["evals"]], diversity=r["diversity"], seed=r["seed"])
                       for r in rs] for m, rs in runs.items()}
        diversity_plot(records, Path(folder) / "diversity_vs_reward.png", title=Path(folder).name)


if __name__ == "__main__":
    main(sys.argv[1:])
