"""What the NFE counts imply for iteration time: on our engine, and on the paper's.

Two cost models, both linear in the counts of docs/method.md §10:

* **ours** — ``time = rollout_calls × c_roll + training_forwards × c_train`` with the unit costs
  ``branchgrpo bench`` measured (read from its ``bench.json``, or given with ``--roll/--train``).
  Printed for every Table-1 preset and for BranchGRPO-Mix with its SDE window at every start
  position (the window slides during training, so the Mix ratio is not one number).
* **paper** — the authors' engine runs node-at-a-time and counts one training forward per trained
  edge, so ``time = NFE_old × r + NFE_train × t`` per leaf. ``r`` and ``t`` are solved from the two
  DanceGRPO rows of Table 1 (tf = 1.0: 20/20 → 698 s; tf = 0.6: 20/12 → 469 s); the other rows are
  then predicted from their NFE columns and set beside the reported seconds.

Writes ``benchmarks/results/ideal_ratios.{json,md}``.

    python benchmarks/ideal_ratios.py --bench runs/bench/bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from branchgrpo.tree.nfe import plan
from branchgrpo.tree.presets import TABLE1_PRESETS, method_config

RESULTS = Path(__file__).parent / "results"

# Paper Table 1 (docs/method.md §10): method → (NFE πθold per leaf, NFE πθ per leaf, seconds per iteration)
PAPER_TABLE1 = {
    "dancegrpo": (20.0, 20.0, 698.0),
    "dancegrpo-tf0.6": (20.0, 12.0, 469.0),
    "mixgrpo": (20.0, 5.0, 289.0),
    "branchgrpo": (13.68, 13.68, 493.0),
    "branchgrpo-widpru": (13.68, 8.625, 314.0),
    "branchgrpo-deppru": (13.68, 8.625, 314.0),
    "branchgrpo-mix": (13.68, 4.25, 148.0),
}


def paper_cost_model() -> dict:
    """Solve r, t from the two DanceGRPO rows; predict every row."""
    (n1, m1, s1), (n2, m2, s2) = PAPER_TABLE1["dancegrpo"], PAPER_TABLE1["dancegrpo-tf0.6"]
    t = (s1 - s2) / (m1 - m2)
    r = (s1 - m1 * t) / n1
    rows = {}
    for name, (old, train, seconds) in PAPER_TABLE1.items():
        predicted = old * r + train * t
        rows[name] = {"nfe_old": old, "nfe_train": train, "reported_s": seconds, "predicted_s": round(predicted, 1),
                      "reported_ratio": round(seconds / s1, 3), "predicted_ratio": round(predicted / s1, 3),
                      "reported_over_predicted": round(seconds / predicted, 3)}
    return {"r_s_per_leaf_call": round(r, 3), "t_s_per_leaf_forward": round(t, 3), "train_over_roll": round(t / r, 2),
            "rows": rows}


def our_cost(name: str, roll: float, train: float, overrides: list[str] | None = None, iteration: int = 0) -> dict:
    counts = plan(method_config(name, overrides or []), iteration=iteration).counts
    return {"rollout_calls": counts.rollout_calls, "training_forwards": counts.training_forwards,
            "trained_edges": counts.trained_edges,
            "cost": counts.rollout_calls * roll + counts.training_forwards * train}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", help="bench.json written by `branchgrpo bench` (unit costs)")
    parser.add_argument("--roll", type=float, help="seconds per rollout row (instead of --bench)")
    parser.add_argument("--train", type=float, help="seconds per training row (instead of --bench)")
    args = parser.parse_args(argv)
    if args.bench:
        meta = json.loads(Path(args.bench).read_text())["meta"]
        roll, train = meta["unit_cost_rollout_row_s"], meta["unit_cost_train_row_s"]
    elif args.roll and args.train:
        roll, train = args.roll, args.train
    else:
        parser.error("give --bench bench.json, or both --roll and --train")

    reference = our_cost("dancegrpo", roll, train)["cost"]
    ours = {}
    for name in TABLE1_PRESETS:
        row = our_cost(name, roll, train)
        ours[name] = {**{k: v for k, v in row.items() if k != "cost"}, "ideal_ratio": round(row["cost"] / reference, 3)}
    steps = method_config("branchgrpo-mix").tree.steps
    size = method_config("branchgrpo-mix").tree.sde_window.size
    window = {}
    for start in range(0, steps - size + 1):
        row = our_cost("branchgrpo-mix", roll, train, [f"tree.sde_window.start={start}"])
        window[start] = {"training_forwards": row["training_forwards"], "trained_edges": row["trained_edges"],
                         "ideal_ratio": round(row["cost"] / reference, 3)}
    rollout_only = our_cost("branchgrpo", roll, train)["rollout_calls"] * roll / reference
    paper = paper_cost_model()
    results = {
        "command": "python benchmarks/ideal_ratios.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "unit_cost_rollout_row_s": roll, "unit_cost_train_row_s": train,
        "ours": ours, "mix_window": window, "branchgrpo_rollout_only_ratio": round(rollout_only, 3), "paper": paper,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ideal_ratios.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Ideal iteration-time ratios implied by the NFE counts",
        "",
        f"- command: `{results['command']}`; date: {results['date']}",
        f"- our engine's unit costs: rollout row {roll * 1e3:.3f} ms, training row {train * 1e3:.3f} ms "
        f"(ratio {train / roll:.2f}); one prompt, T = {steps}",
        "",
        "## Table-1 presets on our engine (iteration 0, relative to `dancegrpo`)",
        "",
        "| method | rollout calls | training forwards | trained edges | ideal ratio |",
        "|---|---|---|---|---|",
    ]
    for name, row in ours.items():
        lines.append(f"| {name} | {row['rollout_calls']} | {row['training_forwards']} | {row['trained_edges']} | "
                     f"{row['ideal_ratio']} |")
    lines += [
        "",
        f"## BranchGRPO-Mix by SDE-window start (window {size} steps; split steps always SDE)",
        "",
        f"Floor: the rollout alone is {rollout_only:.3f} of `dancegrpo`'s ideal iteration.",
        "",
        "| window start | training forwards | trained edges | ideal ratio |",
        "|---|---|---|---|",
    ]
    for start, row in window.items():
        lines.append(f"| {start} | {row['training_forwards']} | {row['trained_edges']} | {row['ideal_ratio']} |")
    lines += [
        "",
        "## The paper's own rows under a linear cost model",
        "",
        f"Solved from the two DanceGRPO rows: r = {paper['r_s_per_leaf_call']} s per leaf rollout call, "
        f"t = {paper['t_s_per_leaf_forward']} s per leaf training forward (t/r = {paper['train_over_roll']}).",
        "",
        "| method | NFE πθold | NFE πθ | reported s | predicted s | reported ratio | predicted ratio | reported/predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in paper["rows"].items():
        lines.append(f"| {name} | {row['nfe_old']} | {row['nfe_train']} | {row['reported_s']} | {row['predicted_s']} | "
                     f"{row['reported_ratio']} | {row['predicted_ratio']} | {row['reported_over_predicted']} |")
    (RESULTS / "ideal_ratios.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
