"""Reward throughput: images per second of every reward on its tiny random config, CPU, batch 1
vs batch 32 (same images, same prompts: 4 distinct prompts, as leaves of 4 prompt trees).

The tiny configs (``branchgrpo.rewards.tiny``) keep each reward's real pipeline — tensor
preprocessing from a 64x64 input, tokenisation, text-feature cache, model, scoring formula — at a
size a CPU runs in milliseconds, so the numbers show per-call overhead and batching gains, not
the speed of the real models. HPS needs open_clip (skipped and noted without it).

    python benchmarks/reward_throughput.py [--repeats 5] [--threads 1] [--size 64]

Writes ``benchmarks/results/reward_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from branchgrpo.rewards.tiny import tiny_reward_spec

RESULTS = Path(__file__).parent / "results"
REWARDS = ("digits", "clip", "pickscore", "aesthetic", "imagereward", "hps")
PROMPTS = ["a photo of a cat", "a red car", "the blue dog", "a handwritten digit"]
DIGIT_PROMPTS = ["a handwritten 7", "the digit 3", "the number one", "a handwritten 0"]


def inputs(name: str, batch: int, size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if name == "digits":
        return torch.rand(batch, 1, 16, 16, generator=gen), [DIGIT_PROMPTS[i % 4] for i in range(batch)]
    return torch.rand(batch, 3, size, size, generator=gen), [PROMPTS[i % 4] for i in range(batch)]


def time_reward(reward, name: str, batch: int, size: int, repeats: int, total_images: int) -> dict:
    """Images/s scoring ``total_images`` images in calls of ``batch`` (median of ``repeats``)."""
    images, prompts = inputs(name, batch, size)
    reward(images, prompts)  # warm-up (fills the prompt cache, as in training after step 1)
    calls = max(1, total_images // batch)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            reward(images, prompts)
        rates.append(calls * batch / (time.perf_counter() - start))
    return {"batch": batch, "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "calls": calls, "repeats": repeats}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="input image side (resized to the tiny model's 32 or 224)")
    parser.add_argument("--images", type=int, default=64, help="images scored per repeat")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in REWARDS:
            if name == "hps" and importlib.util.find_spec("open_clip") is None:
                skipped[name] = "open_clip not installed"
                continue
            reward = tiny_reward_spec(name, tmp).build()
            for batch in (1, 32):
                row = {"reward": name, **time_reward(reward, name, batch, args.size, args.repeats, args.images)}
                rows.append(row)
                print(f"{name:12s} batch {batch:2d}: {row['images_per_s']:9.1f} images/s", flush=True)
    machine = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
        "cpu_count": os.cpu_count(), "load_average_1m_before": load_before, "load_average_1m_after": os.getloadavg()[0],
    }
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "input_size": args.size, "rows": rows, "skipped": skipped,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reward_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Reward throughput (tiny random configs, CPU)", "",
        f"- command: `{result['command']}`", f"- date: {result['date']}",
        f"- machine: {machine['platform']}, {machine['cpu_count']} CPUs ({machine['processor']}), "
        f"torch {machine['torch']}, {args.threads} thread(s), Python {machine['python']}; "
        f"1-min load average {machine['load_average_1m_before']:.2f} before, {machine['load_average_1m_after']:.2f} after "
        "(the machine is shared: numbers move by 2x or more between runs)",
        f"- inputs: {args.size}x{args.size} RGB (digits: 16x16 grey), 4 distinct prompts, {args.images} images per repeat, "
        f"median of {args.repeats} repeats after one warm-up call", "",
        "Tiny models: the numbers show per-call overhead and what batching buys, not real-model speed. "
        "The tiny ImageReward keeps the upstream 224x224 input and 768-wide text encoder (its upstream code "
        "hard-codes both), so it is the heaviest here.", "",
        "| reward | batch 1 (img/s) | batch 32 (img/s) | speed-up |", "|---|---|---|---|",
    ]
    by = {(r["reward"], r["batch"]): r["images_per_s"] for r in rows}
    for name in REWARDS:
        if (name, 1) in by:
            lines.append(f"| {name} | {by[(name, 1)]:.1f} | {by[(name, 32)]:.1f} | {by[(name, 32)] / by[(name, 1)]:.1f}x |")
        else:
            lines.append(f"| {name} | skipped: {skipped.get(name, '?')} | | |")
    (RESULTS / "reward_throughput.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'reward_throughput.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
