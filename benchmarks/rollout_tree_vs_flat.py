"""Rollout cost of the BranchGRPO tree vs flat DanceGRPO, and frontier batching vs batch-1.

Same tiny random ``FluxTransformer2DModel`` (64 tokens, like the digits world), same prompts and
leaves per prompt. Writes ``benchmarks/results/rollout_tree_vs_flat.{json,md}``.

    python benchmarks/rollout_tree_vs_flat.py [--prompts 4] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from branchgrpo.models.flux import FluxVelocity
from branchgrpo.tree.presets import method_config
from branchgrpo.tree.rollout import rollout

RESULTS = Path(__file__).parent / "results"


def bench_model(seed: int = 0) -> FluxVelocity:
    """~1.8M-parameter random FLUX transformer on 64 tokens × 4 channels."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
        guidance_embeds=False, axes_dims_rope=[8, 12, 12],
    )
    return FluxVelocity(transformer, 16, 16, guidance_scale=None).eval()


def time_rollout(model, cond, preset: str, prompts: int, micro_batch: int, repeats: int) -> tuple[float, int]:
    cfg = method_config(preset)
    times, calls = [], 0
    for r in range(repeats + 1):  # first run warms up
        gen = torch.Generator().manual_seed(r)
        start = time.perf_counter()
        tree = rollout(model, cond, cfg.tree, prompts, (64, 4), generator=gen, micro_batch=micro_batch)
        elapsed = time.perf_counter() - start
        calls = tree.rollout_calls
        if r:
            times.append(elapsed)
    return statistics.median(times), calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = bench_model()
    gen = torch.Generator().manual_seed(123)
    cond = {
        "prompt_embeds": torch.randn(args.prompts, 8, 64, generator=gen),
        "pooled_prompt_embeds": torch.randn(args.prompts, 64, generator=gen),
    }
    params = sum(p.numel() for p in model.parameters())
    rows = {}
    for preset in ("dancegrpo", "dancegrpo-indep", "branchgrpo"):
        seconds, calls = time_rollout(model, cond, preset, args.prompts, args.micro_batch, args.repeats)
        rows[preset] = {"seconds": seconds, "rollout_calls": calls}
    batch1_seconds, _ = time_rollout(model, cond, "branchgrpo", args.prompts, 1, max(1, args.repeats // 2))
    rows["branchgrpo@batch1"] = {"seconds": batch1_seconds, "rollout_calls": rows["branchgrpo"]["rollout_calls"]}

    results = {
        "command": "python benchmarks/rollout_tree_vs_flat.py " + " ".join(argv or sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
        f"{args.threads} threads, CPU",
        "model_parameters": params,
        "prompts": args.prompts,
        "micro_batch": args.micro_batch,
        "rows": rows,
        "ratios": {},
    }
    for flat in ("dancegrpo", "dancegrpo-indep"):
        nfe_ratio = rows["branchgrpo"]["rollout_calls"] / rows[flat]["rollout_calls"]
        time_ratio = rows["branchgrpo"]["seconds"] / rows[flat]["seconds"]
        results["ratios"][f"branchgrpo/{flat}"] = {
            "nfe_ratio": nfe_ratio, "time_ratio": time_ratio, "time_over_nfe": time_ratio / nfe_ratio,
        }
    results["ratios"]["batch1/microbatched"] = rows["branchgrpo@batch1"]["seconds"] / rows["branchgrpo"]["seconds"]

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rollout_tree_vs_flat.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Rollout: BranchGRPO tree vs flat DanceGRPO (tiny FLUX, CPU)",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; machine: {results['machine']}",
        f"- model: random FluxTransformer2DModel, {params / 1e6:.2f} M parameters, 64 tokens; "
        f"{args.prompts} prompts x 16 leaves; rollout micro-batch {args.micro_batch}; median of {args.repeats}",
        "",
        "| rollout | denoiser calls | seconds |",
        "|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['rollout_calls']} | {row['seconds']:.3f} |")
    lines += ["", "| comparison | NFE ratio | time ratio | time / NFE |", "|---|---|---|---|"]
    for name, r in results["ratios"].items():
        if isinstance(r, dict):
            lines.append(f"| {name} | {r['nfe_ratio']:.3f} | {r['time_ratio']:.3f} | {r['time_over_nfe']:.3f} |")
    lines.append(f"\nBatch-1 node-at-a-time rollout of the same tree is "
                 f"{results['ratios']['batch1/microbatched']:.1f}x slower than frontier batching.")
    (RESULTS / "rollout_tree_vs_flat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
