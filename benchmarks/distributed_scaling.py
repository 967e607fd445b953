"""Iteration time of the digits training on 1 vs 2 CPU processes (DDP and FSDP); on a GPU, the
iteration time and peak memory of a full-size FLUX transformer (``--flux-full-size``).

CPU section: the default digits run (branchgrpo preset, ``data.prompts_per_iteration`` global
prompts) for ``--iterations`` iterations, three ways with the same global batch: one process with
2 threads, and two ``torchrun`` processes with 1 thread each, ``run.parallel=ddp`` and ``fsdp``.
Medians per phase over the iterations after ``--warmup``, read from each run's metrics.jsonl
(per-rank times averaged over ranks). Writes ``benchmarks/results/distributed_scaling.{json,md}``.

    python benchmarks/distributed_scaling.py --iterations 20
    python benchmarks/distributed_scaling.py --flux-full-size [--flux-iterations 3]

GPU section (``--flux-full-size``): a random-weight FLUX.1-dev-sized ``FluxTransformer2DModel``
(19 double + 38 single blocks, 11.9 B parameters) at 512², bf16 compute, the method settings of
``configs/flux-dev-hps.yaml`` (20 steps, frontier-batched rollout, micro-batched update): one
prompt's tree rolled out, random leaf rewards, the policy update. ``lora``: bf16 frozen base +
fp32 rank-32 LoRA; ``full``: fp32 master weights + AdamW (16 bytes per parameter before
activations, 190 GB: it does not fit one 80 GB GPU and is reported as out of memory; shard it with
``run.parallel=fsdp`` over ≥ 4 GPUs). Adds a ``flux_full_size`` section to the same result files.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PHASES = ("encode", "rollout", "reward", "train", "iteration")
DIGITS_OVERRIDES = [
    "run.progress=false", "run.tensorboard=false", "run.dump_tree_every=0", "run.checkpoint_every=0",
    "run.sample_grid_every=0", "run.device=cpu", "eval.every=0", "eval.max_prompts=1", "eval.samples_per_prompt=1",
]
RUNS = {  # name: (processes, threads per process, run.parallel)
    "1 process x 2 threads": (1, 2, "ddp"),
    "2 processes x 1 thread, ddp": (2, 1, "ddp"),
    "2 processes x 1 thread, fsdp": (2, 1, "fsdp"),
}
FLUX_DEV = {  # black-forest-labs/FLUX.1-dev transformer/config.json
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_TINY = {  # --flux-tiny: the same code path on a CPU, to check the script without a GPU
    "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- CPU: digits, 1 vs 2 processes ---------------------------------------------------------------

def digits_command(processes: int, threads: int, parallel: str, iterations: int, prompts: int, out: Path) -> list[str]:
    train = ["-m", "branchgrpo", "train", f"run.output_dir={out}", f"run.iterations={iterations}",
             f"run.threads={threads}", f"run.parallel={parallel}", f"data.prompts_per_iteration={prompts}",
             *DIGITS_OVERRIDES]
    if processes == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *train]


def phase_medians(metrics: Path, warmup: int) -> dict[str, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "reward_mean" in r][warmup:]
    if not rows:
        raise RuntimeError(f"{metrics}: no iterations after the {warmup} warm-up ones; raise --iterations")
    return {phase: statistics.median(r[f"time/{phase}"] for r in rows) for phase in PHASES} | {"measured": len(rows)}


def digits_section(args) -> dict:
    runs = {}
    workdir = Path(tempfile.mkdtemp(prefix="distributed_scaling-"))
    try:
        for name, (processes, threads, parallel) in RUNS.items():
            out = workdir / name.replace(" ", "_").replace(",", "")
            command = digits_command(processes, threads, parallel, args.iterations, args.prompts, out)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            print(f"[{name}] {' '.join(command)}", flush=True)
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            runs[name] = {"processes": processes, "threads_per_process": threads, "parallel": parallel,
                          "wall_seconds": wall, "median_seconds": phase_medians(out / "metrics.jsonl", args.warmup)}
            median = runs[name]["median_seconds"]["iteration"]
            print(f"  median iteration {median:.3f} s, wall {wall:.1f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    single = runs["1 process x 2 threads"]["median_seconds"]
    for run in runs.values():
        run["speedup"] = {phase: single[phase] / run["median_seconds"][phase] for phase in PHASES}
    return {"iterations": args.iterations, "warmup": args.warmup, "prompts_per_iteration": args.prompts,
            "preset": "branchgrpo", "runs": runs}


# -- GPU: full-size FLUX transformer -------------------------------------------------------------

def flux_policy(mode: str, blocks: dict, device: torch.device, gradient_checkpointing: bool, latent: int):
    """Random-weight transformer in bf16 (frozen base) or float32 masters (full), as the trainer sets it up."""
    from diffusers import FluxTransformer2DModel

    from branchgrpo.models.flux import FluxVelocity
    from branchgrpo.models.lora import LoraSpec, add_lora, trainable_parameters

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: a float32 FLUX is 48 GB
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**blocks)
    finally:
        torch.set_default_dtype(previous)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if mode == "lora":
        add_lora(transformer, LoraSpec(rank=32, alpha=64.0))  # LoRA tensors in float32
        params = trainable_parameters(transformer)
    else:
        transformer.float()  # float32 master weights, as use_master_weights does
        params = list(transformer.parameters())
    compute = torch.bfloat16 if device.type == "cuda" else None
    policy = FluxVelocity(transformer, latent, latent, guidance_scale=3.5, compute_dtype=compute)
    return policy, params


def flux_run(mode: str, args, device: torch.device) -> dict:
    from branchgrpo.train.config import load_train_config
    from branchgrpo.tree.rollout import rollout
    from branchgrpo.tree.scoring import score_tree
    from branchgrpo.update import gather_training_edges, policy_update

    config = load_train_config(Path(__file__).parents[1] / "configs" / "flux-dev-hps.yaml",
                               overrides=[f"model.height={args.flux_size}", f"model.width={args.flux_size}"])
    method = config.method
    latent = args.flux_size // 8  # VAE factor 8; packed tokens (latent/2)²
    blocks = FLUX_TINY if args.flux_tiny else FLUX_DEV
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    policy, params = flux_policy(mode, blocks, device, args.gradient_checkpointing, latent)
    optimizer = torch.optim.AdamW(params, lr=method.update.learning_rate, weight_decay=method.update.weight_decay)
    shape = ((latent // 2) ** 2, blocks["in_channels"])
    gen = torch.Generator().manual_seed(0)
    cond = {"prompt_embeds": torch.randn(1, 512, blocks["joint_attention_dim"], generator=gen).to(device),
            "pooled_prompt_embeds": torch.randn(1, blocks["pooled_projection_dim"], generator=gen).to(device)}

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    times = {"rollout": [], "train": [], "iteration": []}
    for it in range(args.flux_iterations + 1):  # the first one warms up
        start = sync()
        policy.eval()
        tree = rollout(policy, cond, method.tree, 1, shape, generator=[torch.Generator().manual_seed(it)],
                       iteration=it, micro_batch=method.engine.rollout_micro_batch, device=device)
        middle = sync()
        rewards = torch.randn(tree.parent[-1].numel(), generator=torch.Generator().manual_seed(100 + it))
        scores = score_tree(tree, rewards.double(), method, generator=torch.Generator().manual_seed(200 + it))
        edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
        policy.train()
        stats = policy_update(policy, optimizer, edges, cond, method, generator=torch.Generator().manual_seed(it))
        end = sync()
        if it:
            times["rollout"].append(middle - start)
            times["train"].append(end - middle)
            times["iteration"].append(end - start)
    return {
        "parameters": sum(p.numel() for p in policy.transformer.parameters()),
        "trainable_parameters": sum(p.numel() for p in params),
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "rollout_calls": tree.rollout_calls, "trained_edges": stats.trained_edges,
        "training_forwards": stats.training_forwards, "optimizer_steps": stats.optimizer_steps,
    }


def flux_section(args) -> dict:
    if args.flux_tiny:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("--flux-full-size needs a CUDA GPU and torch sees none (CPU-only build or no device); "
                         "run it on a GPU machine, or add --flux-tiny to check the script on a CPU")
    else:
        device = torch.device("cuda")
    out = {"size": args.flux_size, "iterations": args.flux_iterations,
           "gradient_checkpointing": args.gradient_checkpointing,
           "model": "tiny (script check)" if args.flux_tiny else "FLUX.1-dev transformer config, random weights",
           "modes": {}}
    for mode in ("lora", "full"):
        print(f"[flux {mode}]", flush=True)
        try:
            out["modes"][mode] = flux_run(mode, args, device)
        except torch.OutOfMemoryError as err:
            out["modes"][mode] = {"error": "out of memory", "detail": str(err).splitlines()[0]}
        print(f"  {out['modes'][mode]}", flush=True)
        gc.collect()  # the previous mode's model, also when it ran out of memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# -- results --------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    lines = ["# Distributed scaling", ""]
    digits = results.get("digits")
    if digits:
        lines += [
            "## Digits world on CPU: 1 vs 2 processes (same global batch)", "",
            f"- command: `{digits['command']}`",
            f"- date: {digits['date']}; machine: {digits['machine']['processor']}, "
            f"{digits['machine']['cpu_count']} cores, torch {digits['machine']['torch']}",
            f"- default digits training, preset {digits['preset']}, {digits['prompts_per_iteration']} prompts per "
            f"iteration; median over {digits['iterations'] - digits['warmup']} iterations after {digits['warmup']} "
            "warm-up; seconds per iteration (per-rank times averaged over ranks)", "",
            "| run | " + " | ".join(PHASES) + " | speedup (iteration) | wall s |",
            "|---|" + "---|" * (len(PHASES) + 2),
        ]
        for name, run in digits["runs"].items():
            cells = " | ".join(f"{run['median_seconds'][p]:.3f}" for p in PHASES)
            lines.append(f"| {name} | {cells} | {run['speedup']['iteration']:.2f}x | {run['wall_seconds']:.1f} |")
        lines.append("")
    flux = results.get("flux_full_size")
    if flux:
        lines += [
            f"## FLUX transformer, {flux['size']}² ({flux['model']})", "",
            f"- command: `{flux['command']}`",
            f"- date: {flux['date']}; machine: {flux['machine'].get('gpu', flux['machine']['processor'])}, "
            f"torch {flux['machine']['torch']}; gradient checkpointing: {flux['gradient_checkpointing']}",
            f"- one prompt's tree per iteration, median of {flux['iterations']} after one warm-up", "",
            "| mode | trainable params | rollout s | train s | iteration s | peak memory GB |",
            "|---|---|---|---|---|---|",
        ]
        for mode, row in flux["modes"].items():
            if "error" in row:
                lines.append(f"| {mode} | | | | | {row['error']} |")
                continue
            sec = row["median_seconds"]
            peak = "n/a" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.1f}"
            lines.append(f"| {mode} | {row['trainable_parameters'] / 1e6:.1f} M | {sec['rollout']:.2f} | "
                         f"{sec['train']:.2f} | {sec['iteration']:.2f} | {peak} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20, help="digits iterations per run")
    parser.add_argument("--warmup", type=int, default=2, help="first iterations left out of the medians")
    parser.add_argument("--prompts", type=int, default=4, help="global prompts per iteration (even)")
    parser.add_argument("--flux-full-size", action="store_true", help="run the GPU FLUX section instead")
    parser.add_argument("--flux-size", type=int, default=512, help="image size in pixels (multiple of 16)")
    parser.add_argument("--flux-iterations", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--flux-tiny", action="store_true", help="tiny transformer on the CPU (checks the script)")
    parser.add_argument("--output", type=Path, default=RESULTS / "distributed_scaling",
                        help="result files without suffix (.json and .md are written)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    json_path, md_path = args.output.with_suffix(".json"), args.output.with_suffix(".md")
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    stamp = {"command": "python benchmarks/distributed_scaling.py " + " ".join(argv),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    if args.flux_full_size or args.flux_tiny:
        results["flux_full_size"] = stamp | flux_section(args)
    else:
        results["digits"] = stamp | digits_section(args)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown(results))
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
