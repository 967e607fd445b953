"""Seconds of one training micro-batch (forward + backward) against the rows it carries.

``measured_over_ideal`` prices a training row at ``dancegrpo``'s mean cost per row, which spreads
each micro-batch's fixed cost (Python around the model's modules, kernels whose time does not grow
with the batch) over ~16 rows. A tree method trains far fewer rows per optimizer step, so more of
its micro-batches are partly filled. This script times a micro-batch of 1, 2, 4, … rows on a
world's generator and fits ``seconds = fixed + per_row · rows`` (least squares over the sizes), so
the fixed part can be compared with what a bench attributes to the engine.

    OMP_NUM_THREADS=2 python benchmarks/train_call_cost.py --config configs/shapes-branchgrpo.yaml --out shapes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import Trainer
from branchgrpo.update import TrainingEdges, edge_log_probs

RESULTS = Path(__file__).parent / "results"


def call_seconds(trainer: Trainer, rows: int, repeats: int) -> float:
    """Median seconds of one forward + backward of ``rows`` parents (one trained child each)."""
    gen, method = trainer.model, trainer.config.method
    cond = gen.encode_prompts(gen.train_prompts[:1])
    x = torch.randn(rows, *gen.latent_shape, device=trainer.device)
    edges = TrainingEdges(
        parent_latents=x, parent_sigma=torch.full((rows,), 0.5), parent_sigma_next=torch.full((rows,), 0.45),
        parent_prompt=torch.zeros(rows, dtype=torch.long), parent_step=torch.zeros(rows, dtype=torch.long),
        child_latents=x, edge_parent=torch.arange(rows), lp_old=torch.zeros(rows), advantage=torch.ones(rows),
        normaliser=float(rows))
    counts, starts, parents = torch.ones(rows, dtype=torch.long), torch.arange(rows), torch.arange(rows)

    def once() -> float:
        start = time.perf_counter()
        lp, _, _, _ = edge_log_probs(gen.policy, edges, parents, cond, method, starts, counts)
        lp.sum().backward()
        seconds = time.perf_counter() - start
        trainer.optimizer.zero_grad(set_to_none=True)
        return seconds

    once()
    return statistics.median(once() for _ in range(repeats))


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``fixed + per_row · rows``."""
    n, mx, my = len(sizes), statistics.mean(sizes), statistics.mean(seconds)
    slope = sum((a - mx) * (b - my) for a, b in zip(sizes, seconds)) / sum((a - mx) ** 2 for a in sizes)
    return my - slope * mx, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a train config (default: the digits world)")
    parser.add_argument("--sizes", default="1,2,4,8,12,16,24,32,48,64")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the sizes, interleaved; medians kept")
    parser.add_argument("--out", default="digits", help="name under benchmarks/results/train_call_cost-NAME.*")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(load_train_config(args.config, "dancegrpo", [f"run.output_dir={tmp}", "run.progress=false",
                                                                       "run.tensorboard=false", "run.device=cpu"]))
        trainer.model.policy.train()
        samples = {s: [] for s in sizes}
        for _ in range(args.rounds):
            for s in sizes:
                samples[s].append(call_seconds(trainer, s, args.repeats))
    seconds = [statistics.median(samples[s]) for s in sizes]
    fixed, per_row = fit(sizes, seconds)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": args.config,
              "machine": f"{platform.machine()} torch {torch.__version__} threads={torch.get_num_threads()}",
              "sizes": sizes, "seconds": seconds, "fixed_s": fixed, "per_row_s": per_row}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"train_call_cost-{args.out}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# One training micro-batch (forward + backward) against its rows — {args.out}", "",
             f"`python benchmarks/train_call_cost.py --config {args.config} --out {args.out}` — {result['date']}, "
             f"{result['machine']}; median of {args.repeats} calls, median of {args.rounds} interleaved passes.", "",
             f"Fit: **{fixed * 1e3:.2f} ms fixed + {per_row * 1e3:.3f} ms per row**.", "",
             "| rows | ms per call | ms per row | fit (ms per call) |", "|---|---|---|---|"]
    for s, t in zip(sizes, seconds):
        lines.append(f"| {s} | {t * 1e3:.2f} | {t * 1e3 / s:.3f} | {(fixed + per_row * s) * 1e3:.2f} |")
    (RESULTS / f"train_call_cost-{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
