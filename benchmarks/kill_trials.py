"""``kill -9`` at random moments, then ``run.resume=auto``: does every trial end equal to the
uninterrupted run? (issue 13's target; docs/reliability.md "Killed at any moment").

    OMP_NUM_THREADS=1 python benchmarks/kill_trials.py --trials 20 --out benchmarks/results/kill_trials

One reference run of the digits world (small tree, a checkpoint every iteration), then ``--trials``
runs of the same command, each killed with SIGKILL after a uniformly random delay within the
reference's wall time (a fixed ``--seed`` draws the delays), then resumed with ``run.resume=auto``
(again and again if a resume is killed too, ``--kills-per-trial``) until it finishes. A trial
passes when the final weights are bit-identical to the reference's and the metrics rows equal the
reference's (time, memory and throughput columns left out). Recorded per trial: the delay, where
the kill landed (before the first checkpoint, during a checkpoint write — a ``.tmp-*`` folder
present at the kill — or between checkpoints), the iterations done at the kill, and the verdict.
Writes ``kill_trials.json`` and ``kill_trials.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = ["data.prompts_per_iteration=1", "eval.samples_per_prompt=1", "eval.max_prompts=2", "eval.every=0",
        "tree.steps=8", "split_plan=0:2,3:2", "run.progress=false", "run.device=cpu", "run.dump_tree_every=0",
        "run.tensorboard=false", "run.checkpoint_every=1"]


def command(run: Path, iterations: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "branchgrpo", "train", f"run.output_dir={run}", f"run.iterations={iterations}",
            *FAST, *extra]


def environment() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def measured_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/", "throughput/"))} for r in rows]


def weights_equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "weights" / "model.safetensors")), load_file(str(b / "weights" / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def iterations_done(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    done = set()
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "reward_mean" in row:
            done.add(row["iteration"])
    return len(done)


def where(run: Path) -> str:
    """Where a kill landed, read off the folder at the moment of the kill."""
    checkpoints = run / "checkpoints"
    if any(p.name.startswith(".tmp") for p in run.rglob(".tmp*")):
        return "during a checkpoint write"
    if not checkpoints.is_dir() or not any(checkpoints.iterdir()):
        return "before the first checkpoint"
    return "between checkpoints"


def wait_for_write(proc: subprocess.Popen, run: Path, nth: int) -> bool:
    """Poll until the ``nth`` checkpoint write of this process is under way (its own
    ``.tmp-<name>-<pid>`` folder exists: one a killed predecessor left does not count); False when
    the process ends first."""
    seen: set[str] = set()
    while proc.poll() is None:
        for tmp in (run / "checkpoints").glob(f".tmp-*-{proc.pid}") if (run / "checkpoints").is_dir() else ():
            seen.add(tmp.name)
            if len(seen) >= nth:
                return True
        time.sleep(0.0005)
    return False


def trial(index: int, delay: float, iterations: int, kills: int, root: Path, reference: Path,
          rng: random.Random, horizon: float, mode: str = "random") -> dict:
    run = root / f"trial-{index:03d}"
    record = {"trial": index, "kills": []}
    proc = subprocess.Popen(command(run, iterations), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=environment())
    for k in range(kills):
        start = time.perf_counter()
        if mode == "writes":  # kill inside a checkpoint write: the first, or a random later one
            nth = 1 if k == 0 else rng.randint(1, iterations)
            if not wait_for_write(proc, run, nth):
                break
        else:
            wait = delay if k == 0 else rng.uniform(0.0, horizon)
            try:
                proc.wait(timeout=wait)
                break  # it finished before the kill
            except subprocess.TimeoutExpired:
                pass
        landed = where(run)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        record["kills"].append({"after_s": round(time.perf_counter() - start, 3), "landed": landed,
                                "iterations_done": iterations_done(run)})
        proc = subprocess.Popen(command(run, iterations, "run.resume=auto"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=environment())
    _, err = proc.communicate(timeout=1800)
    record["exit"] = proc.returncode
    if proc.returncode != 0:
        record.update(ok=False, reason=f"final run exited {proc.returncode}: {err.strip()[-300:]}")
        return record
    same_weights = weights_equal(run, reference)
    same_rows = measured_rows(run) == measured_rows(reference)
    leftovers = sorted(str(p.relative_to(run)) for p in run.rglob(".tmp*"))
    record.update(ok=same_weights and same_rows and not leftovers, same_weights=same_weights,
                  same_metrics_rows=same_rows, temporary_leftovers=leftovers)
    shutil.rmtree(run, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for kill_trials.json and kill_trials.md")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--kills-per-trial", type=int, default=1, help="kills before the last, unkilled resume")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("random", "writes"), default="random",
                        help="random: kill after a uniform random delay; writes: kill while a checkpoint is being "
                             "written (the .tmp-* folder exists)")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.iterations < 1 or args.kills_per_trial < 1:
        parser.error("--trials, --iterations and --kills-per-trial must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill-trials-"))
    try:
        reference = root / "reference"
        start = time.perf_counter()
        done = subprocess.run(command(reference, args.iterations), capture_output=True, text=True, env=environment())
        horizon = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"kill_trials: the reference run failed: {done.stderr.strip()[-500:]}")
        print(f"[kill] reference: {horizon:.1f} s", flush=True)
        records = []
        for i in range(args.trials):
            delay = rng.uniform(0.0, horizon)
            record = trial(i, delay, args.iterations, args.kills_per_trial, root, reference, rng, horizon,
                           args.mode)
            records.append(record)
            print(f"[kill] trial {i}: {record['kills']} -> {'ok' if record['ok'] else 'FAILED ' + str(record)}",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    landed: dict[str, int] = {}
    for r in records:
        for k in r["kills"]:
            landed[k["landed"]] = landed.get(k["landed"], 0) + 1
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/kill_trials.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "omp_threads": environment()["OMP_NUM_THREADS"]},
        "settings": {"iterations": args.iterations, "overrides": FAST, "seed": args.seed, "mode": args.mode,
                     "kills_per_trial": args.kills_per_trial},
        "reference_seconds": horizon, "trials": records,
        "passed": sum(r["ok"] for r in records), "kills": sum(len(r["kills"]) for r in records), "landed": landed,
    }
    stem = "kill_trials" if args.mode == "random" else f"kill_trials_{args.mode}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    title = "at random moments" if args.mode == "random" else "during checkpoint writes"
    lines = [f"# kill -9 {title}, then run.resume=auto ({result['date']})", "",
             f"- command: `{result['command']}`",
             f"- reference run: {horizon:.1f} s for {args.iterations} iterations, a checkpoint each",
             f"- {result['passed']} of {len(records)} trials ended with bit-identical weights and equal metric rows, "
             f"no temporary folders left", f"- {result['kills']} kills landed: "
             + ", ".join(f"{n} {k}" for k, n in sorted(landed.items())), "",
             "| trial | kills (after s: where, iterations done) | verdict |", "|---|---|---|"]
    for r in records:
        kills = "; ".join(f"{k['after_s']:.1f}: {k['landed']}, {k['iterations_done']}" for k in r["kills"]) or "none"
        lines.append(f"| {r['trial']} | {kills} | {'ok' if r['ok'] else r.get('reason') or 'differs'} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"[kill] {result['passed']}/{len(records)} passed; wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
