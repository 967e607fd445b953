"""Iteration time with the reward scored after the rollout (serial) vs while it runs (``reward.overlap``).

The digits world on CPU (branchgrpo preset, ``--steps`` steps, 8 leaves per prompt) with a
deliberately slow reward: the digits image mean after a fixed sleep per image (``slow-sleep``,
``--seconds-per-image``: a judge on another device or server) or after fixed CPU work per image
(``slow-cpu``, ``--matmuls-per-image`` float32 128x128 matmuls on the scoring thread: a reward
that competes for the same cores). Three trainers are built once (serial, overlap in a thread,
overlap in a worker process) and step in turn, interleaved round by round, so the machine's load
hits all of them alike; the first iteration of each (process start, first calls) is not counted.
Medians per phase over ``--rounds`` rounds; the expected overlapped time is
``max(R + S/n, R/n + S) + U`` for rollout R, reward S and update U of the serial run and n chunks.

    OMP_NUM_THREADS=1 python benchmarks/reward_overlap.py [--reward slow-sleep|slow-cpu] [--rounds 5]

Writes ``benchmarks/results/reward_overlap.json`` and ``.md`` (one section per reward kind).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from branchgrpo.rewards import register_reward
from branchgrpo.rewards.base import Reward

RESULTS = Path(__file__).parent / "results"
MODES = {  # name: overrides
    "serial": [],
    "overlap, thread": ["reward.overlap=true", "reward.worker=thread"],
    "overlap, process": ["reward.overlap=true", "reward.worker=process"],
}


class SlowMean(Reward):
    """Mean brightness of each image, after ``seconds_per_image`` of sleep or ``matmuls_per_image``
    128x128 matmuls per image (the score does not depend on either)."""

    input_channels = None

    def __init__(self, name: str, seconds_per_image: float = 0.0, matmuls_per_image: int = 0):
        super().__init__("cpu", "float32")
        self.name = name
        self.seconds_per_image = seconds_per_image
        self.matmuls_per_image = matmuls_per_image

    def _score(self, images, prompts):
        time.sleep(self.seconds_per_image * images.shape[0])
        work = torch.ones(128, 128) / 128
        for _ in range(self.matmuls_per_image * images.shape[0]):
            work = work @ work
        return images.flatten(1).mean(dim=1) + 0.0 * work[0, 0]


def _factory(name):
    def build(checkpoint=None, device=None, dtype=None, seconds_per_image=0.0, matmuls_per_image=0):
        return SlowMean(name, float(seconds_per_image), int(matmuls_per_image))

    return build


# at import, so that a spawned reward worker (which imports this script as __mp_main__) knows them
register_reward("slow-sleep", _factory("slow-sleep"), "digits mean after a fixed sleep per image", needs_checkpoint=False)
register_reward("slow-cpu", _factory("slow-cpu"), "digits mean after fixed CPU work per image", needs_checkpoint=False)


def config_for(args, output_dir: str, mode_overrides: list[str]):
    from branchgrpo.train.config import load_train_config

    option = (f"reward.options.seconds_per_image={args.seconds_per_image}" if args.reward == "slow-sleep"
              else f"reward.options.matmuls_per_image={args.matmuls_per_image}")
    return load_train_config(None, "branchgrpo", [
        f"run.output_dir={output_dir}", "run.progress=false", "run.tensorboard=false", "run.dump_tree_every=0",
        "run.device=cpu", f"run.threads={args.threads}", f"data.prompts_per_iteration={args.prompts}",
        f"tree.steps={args.steps}", "split_plan=0:2,3:2,6:2", "update.updates_per_iteration=1",
        f"reward.name={args.reward}", option, f"reward.overlap_chunk={args.chunk}", *mode_overrides,
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", choices=("slow-sleep", "slow-cpu"), default="slow-sleep")
    parser.add_argument("--seconds-per-image", type=float, default=0.08)
    parser.add_argument("--matmuls-per-image", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=4, help="prompt groups per iteration")
    parser.add_argument("--chunk", type=int, default=1, help="reward.overlap_chunk")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer (and the worker process)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from branchgrpo.train.trainer import Trainer

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (mode, overrides) in enumerate(MODES.items()):
            trainers[mode] = Trainer(config_for(args, f"{tmp}/{index}", overrides))
        rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        rewards: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_index in range(args.rounds + 1):
            order = list(MODES)[round_index % len(MODES):] + list(MODES)[: round_index % len(MODES)]
            for mode in order:
                begin = time.perf_counter()
                metrics = trainers[mode].step()
                wall = time.perf_counter() - begin
                if round_index == 0:
                    print(f"warm-up {mode}: {wall:.2f} s", flush=True)
                    continue
                row = {k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")}
                row["rollout+reward"] = row["rollout"] + row["reward"]
                row["wall"] = wall
                rows[mode].append(row)
                rewards[mode].append(metrics["reward_mean"])
                print(f"round {round_index} {mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    medians = {mode: {k: statistics.median(r[k] for r in mode_rows) for k in mode_rows[0]}
               for mode, mode_rows in rows.items()}
    serial = medians["serial"]
    chunks = -(-args.prompts // args.chunk)
    rollout, reward, update = serial["rollout"], serial["reward"], serial["train"]
    expected_phase = max(rollout + reward / chunks, rollout / chunks + reward)
    expected = expected_phase + update + serial["encode"]
    machine = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "load_average_1m_before": load_before, "load_average_1m_after": os.getloadavg()[0],
    }
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/reward_overlap.py " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "threads": args.threads, "reward": args.reward,
        "seconds_per_image": args.seconds_per_image if args.reward == "slow-sleep" else None,
        "matmuls_per_image": args.matmuls_per_image if args.reward == "slow-cpu" else None,
        "prompts": args.prompts, "chunk": args.chunk, "chunks": chunks, "steps": args.steps, "rounds": args.rounds,
        "seconds": time.perf_counter() - started,
        "median_seconds": medians, "expected_overlapped_rollout+reward": expected_phase,
        "expected_overlapped_iteration": expected,
        "serial_sum": serial["iteration"], "per_round": rows, "reward_mean": rewards,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "reward_overlap.json"
    everything = json.loads(path.read_text()) if path.exists() else {}
    key = f"{args.reward}, chunk {args.chunk}"
    everything[key] = result
    path.write_text(json.dumps(everything, indent=2) + "\n")
    (RESULTS / "reward_overlap.md").write_text(markdown(everything))
    print(markdown({key: result}))
    return 0


def markdown(everything: dict) -> str:
    lines = ["# Reward scoring overlapped with the rollout (digits world, CPU)", "",
             "`time/rollout` of an overlapped run covers the chunked rollout and decoding; `time/reward` the "
             "scoring left after the last chunk. Medians over the rounds; expected = max(R + S/n, R/n + S) + U "
             "(+ encode) from the serial run's rollout R, reward S, update U and n chunks.", ""]
    for result in everything.values():
        m = result["machine"]
        what = (f"sleeps {result['seconds_per_image']} s per image" if result["reward"] == "slow-sleep"
                else f"{result['matmuls_per_image']} float32 128x128 matmuls per image on the scoring thread")
        lines += [
            f"## `{result['reward']}` (the reward {what}), chunks of {result['chunk']} prompt(s)", "",
            f"- command: `{result['command']}`",
            f"- date: {result['date']}",
            f"- machine: {m['platform']}, {m['cpu_count']} CPUs ({m['processor']}), torch {m['torch']}, "
            f"{result['threads']} torch thread(s) per process, Python {m['python']}; 1-min load average "
            f"{m['load_average_1m_before']:.2f} before, {m['load_average_1m_after']:.2f} after (shared machine)",
            f"- {result['prompts']} prompts per iteration, {result['steps']} steps, 8 leaves per prompt, "
            f"{result['chunks']} chunks of {result['chunk']} prompt(s), {result['rounds']} rounds "
            "(serial / thread / process interleaved, first iteration of each not counted)", "",
            "| mode | rollout (s) | reward (s) | rollout + reward (s) | update (s) | iteration (s) |",
            "|---|---|---|---|---|---|",
        ]
        for mode, med in result["median_seconds"].items():
            lines.append(f"| {mode} | {med['rollout']:.2f} | {med['reward']:.2f} | {med['rollout+reward']:.2f} | "
                         f"{med['train']:.2f} | {med['iteration']:.2f} |")
        lines += ["", f"Expected overlapped rollout + reward from the serial medians: "
                  f"{result['expected_overlapped_rollout+reward']:.2f} s (iteration "
                  f"{result['expected_overlapped_iteration']:.2f} s).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
