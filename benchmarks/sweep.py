"""Learning-rate × updates-per-iteration sweep per method, so that no method loses to an untuned setting.

Only the two optimiser settings move (``update.learning_rate``, ``update.updates_per_iteration``);
every structural setting — tree, split plan, pruning, SDE window, clip range, group size — stays
the method's preset (the paper's). Per method, every grid cell × seed is one run, and all of that
method's runs train interleaved in one ``run_bench`` (each advances one iteration in turn, so
machine load hits the cells alike) from the same weights, each up to ``--seconds`` of training.

A cell's **score** is its held-out reward at the common horizon H (the shortest of the method's
runs, ≥ ``--seconds``): every run's evaluations form a curve in training seconds, linear between
evaluations (:mod:`branchgrpo.bench_stats`), read at H; mean over seeds with a 95 % Student-t
interval. Reward per second is what the bench compares, so cells are compared at equal wall-clock,
not at equal iterations (4 updates per iteration cost more per iteration than 1). The reward AUC up
to H and the end feature diversity are reported beside it. Per method the cell with the highest
mean score is ``best``; ``branchgrpo bench --tuned OUT/best.json`` then trains each method with its
own best cell.

Writes ``OUT/sweep.json`` (every cell and seed), ``OUT/sweep.md``, ``OUT/best.json``
(method → overrides) and, per method, ``OUT/<method>/bench.*`` (the runs' curves and costs).

    python benchmarks/sweep.py --seconds 300 --seeds 2                 # digits world, all 7 methods
    python benchmarks/sweep.py --methods dancegrpo,branchgrpo-deppru --lr 5e-4,1e-3 --updates 1,2
    python benchmarks/sweep.py --config configs/OTHER-WORLD.yaml --out benchmarks/results/sweep-other

Cost: methods × cells × seeds × ``--seconds`` of training plus evaluations — the default
(7 × 9 × 2 × 300 s) is about 10.5 hours on one core pair; run it where that is affordable.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from branchgrpo.bench import run_bench
from branchgrpo.bench_stats import Interval, format_interval, interpolate, mean_interval, normalised_auc
from branchgrpo.tree.presets import TABLE1_PRESETS, list_presets

LEARNING_RATES = (2.5e-4, 5e-4, 1e-3)
UPDATES_PER_ITERATION = (1, 2, 4)


def cell_overrides(learning_rate: float, updates: int) -> list[str]:
    """The two settings a sweep cell changes, as config overrides."""
    return [f"update.learning_rate={learning_rate:g}", f"update.updates_per_iteration={updates}"]


def cell_label(method: str, learning_rate: float, updates: int) -> str:
    """A run's label (also its sample-grid file names): ``dancegrpo_lr0.0005_u2``."""
    return f"{method}_lr{learning_rate:g}_u{updates}"


def score_cells(runs: dict[str, list[dict]]) -> tuple[float, dict[str, dict]]:
    """Per cell label, the per-seed and over-seeds reward at the common horizon, reward AUC to it
    and end feature diversity, from ``bench.json``'s ``seeds`` entry (label → runs, each with
    ``evals`` = [iteration, seconds, reward] and ``diversity``). Returns ``(horizon, scores)``."""
    horizon = min(run["evals"][-1][1] for label_runs in runs.values() for run in label_runs)
    scores = {}
    for label, label_runs in runs.items():
        per_seed = []
        for run in label_runs:
            times, rewards = [e[1] for e in run["evals"]], [e[2] for e in run["evals"]]
            per_seed.append({
                "seed": run["seed"], "iterations": len(run["iteration_times"]), "final_seconds": times[-1],
                "reward_at_horizon": interpolate(times, rewards, horizon),
                "reward_auc": normalised_auc(times, rewards, horizon) if horizon > 0 else None,
                "end_diversity_feature": (run["diversity"][-1] or {}).get("diversity_feature")
                if run["diversity"] else None,
            })
        summary = {key: mean_interval([row[key] for row in per_seed]).as_dict()
                   for key in ("reward_at_horizon", "reward_auc", "end_diversity_feature")}
        scores[label] = {"per_seed": per_seed, **summary}
    return horizon, scores


def best_cell(cells: list[dict]) -> dict:
    """The cell with the highest mean reward at the horizon (ties: the higher AUC, then the earlier cell)."""
    def key(cell: dict) -> tuple[float, float]:
        return (cell["reward_at_horizon"]["mean"], cell["reward_auc"]["mean"] or 0.0)
    return max(cells, key=key)  # max keeps the first of equal keys


def run_sweep(methods: list[str], learning_rates: list[float], updates: list[int], seeds: int, seconds: float,
              iterations: int, eval_every: int, out_dir: Path, config_file: str | None = None,
              overrides: list[str] | None = None, make_trainer=None, command: str = "") -> dict:
    """Run the grid for every method (methods one after another, cells × seeds interleaved) and write the files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "learning_rates": learning_rates, "updates_per_iteration": updates, "seeds": seeds,
               "seconds": seconds, "iterations": iterations, "config": config_file, "overrides": overrides or [],
               "methods": {}}
    for method in methods:
        grid = [(lr, n) for lr in learning_rates for n in updates]
        variants = {cell_label(method, lr, n): (method, cell_overrides(lr, n)) for lr, n in grid}
        folder = out_dir / method
        run_bench(list(variants), iterations, eval_every, folder, config_file, overrides, make_trainer=make_trainer,
                  seeds=seeds, seconds=seconds, variants=variants)
        saved = json.loads((folder / "bench.json").read_text())
        horizon, scores = score_cells(saved["seeds"])
        cells = [{"learning_rate": lr, "updates_per_iteration": n, "overrides": cell_overrides(lr, n),
                  **scores[cell_label(method, lr, n)]} for lr, n in grid]
        best = best_cell(cells)
        results["methods"][method] = {"horizon_s": horizon, "cells": cells, "best": best["overrides"]}
        _write(results, out_dir)  # after every method: a long sweep keeps what it has measured
    return results


def _write(results: dict, out_dir: Path) -> None:
    (out_dir / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
    best = {method: result["best"] for method, result in results["methods"].items()}
    (out_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    lines = [
        "# Learning-rate × updates-per-iteration sweep",
        "",
        f"- command: `{results['command']}`; date: {results['date']}",
        f"- grid: learning rate ∈ {{{', '.join(f'{lr:g}' for lr in results['learning_rates'])}}} × updates per "
        f"iteration ∈ {{{', '.join(map(str, results['updates_per_iteration']))}}}; {results['seeds']} seed(s); every "
        f"run trains ≥ {results['iterations']} iteration(s) and ≥ {results['seconds']:g} s; "
        "structural settings: the presets'",
        "- score: held-out reward at the common horizon H (each run's curve, linear in seconds, read at the shortest "
        "run's final seconds), mean over seeds [95 % Student-t interval]; AUC = mean reward over [0, H]; **best** = "
        "highest mean score",
    ]
    for method, result in results["methods"].items():
        lines += ["", f"## {method} (H = {result['horizon_s']:.1f} s)", "",
                  "| learning rate | updates / iteration | iterations (per seed) | reward at H | reward AUC (0–H) | "
                  "end diversity (features) | |", "|---|---|---|---|---|---|---|"]
        for cell in result["cells"]:
            mark = "**best**" if cell["overrides"] == result["best"] else ""
            iterations = ", ".join(str(row["iterations"]) for row in cell["per_seed"])
            lines.append(
                f"| {cell['learning_rate']:g} | {cell['updates_per_iteration']} | {iterations} | "
                f"{format_interval(_interval(cell['reward_at_horizon']), missing='ended earlier')} | "
                f"{format_interval(_interval(cell['reward_auc']), missing='n/a')} | "
                f"{format_interval(_interval(cell['end_diversity_feature']), missing='not measured')} | {mark} |")
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")


def _interval(summary: dict) -> Interval:
    return Interval(**summary)


def _parse_list(text: str, kind, name: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"sweep.py: error: {name}: expected comma-separated {kind.__name__}s, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"sweep.py: error: {name}: expected positive values, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: the digits world)")
    parser.add_argument("--methods", help="comma-separated presets (default: the seven Table-1 methods)")
    parser.add_argument("--lr", default=",".join(f"{v:g}" for v in LEARNING_RATES),
                        help="learning rates, comma-separated")
    parser.add_argument("--updates", default=",".join(map(str, UPDATES_PER_ITERATION)),
                        help="optimizer updates per iteration, comma-separated")
    parser.add_argument("--seeds", type=int, default=2, help="runs per cell (run.seed, run.seed+1, ...)")
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="training seconds every run reaches (the horizon the bench will compare at)")
    parser.add_argument("--iterations", type=int, default=1, help="iterations every run trains at least")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/sweep", help="output folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(TABLE1_PRESETS)
    unknown = [m for m in methods if m not in list_presets()]
    if unknown:
        parser.error(f"--methods: unknown preset(s) {', '.join(unknown)}; available: {', '.join(list_presets())}")
    if args.seeds < 1 or args.iterations < 1 or args.eval_every < 1 or not args.seconds >= 0:
        parser.error("--seeds, --iterations and --eval-every must be >= 1 and --seconds >= 0")
    clashing = [o for o in args.overrides if o.split("=")[0] in ("update.learning_rate", "update.updates_per_iteration",
                                                                   "method.update.learning_rate",
                                                                   "method.update.updates_per_iteration")]
    if clashing:
        parser.error(f"{', '.join(clashing)}: the sweep sets these itself; use --lr / --updates")
    command = "python benchmarks/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run_sweep(methods, _parse_list(args.lr, float, "--lr"), _parse_list(args.updates, int, "--updates"), args.seeds,
              args.seconds, args.iterations, args.eval_every, Path(args.out), args.config, args.overrides,
              command=command)
    print((Path(args.out) / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
