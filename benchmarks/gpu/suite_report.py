"""The GPU suite's report: machine, package versions and commit, and results.md from the results
(benchmarks/gpu/run_suite.py)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from suite_cases import ROOT

def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "torch": torch.__version__, "cuda": torch.version.cuda,
                            "env": {k: os.environ[k] for k in ("DISABLE_ADDMM_CUDA_LT", "CUDA_LAUNCH_BLOCKING",
                                                               "PYTORCH_CUDA_ALLOC_CONF") if k in os.environ}}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"device": torch.cuda.get_device_name(0), "device_count": torch.cuda.device_count(),
                     "device_memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count})
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["device"] = "cpu"
    return info


def package_versions() -> dict[str, str | None]:
    """Versions of the libraries the suite runs on (diffusers: the imported one, maybe a wheel)."""
    from importlib import metadata

    out: dict[str, str | None] = {"diffusers": getattr(sys.modules.get("diffusers"), "__version__", None)}
    for name in ("peft", "transformers", "accelerate", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """``SUITE_COMMIT`` when set (a copy of the working tree may carry a stale ``.git``: on the
    device tool's machine it named the session's first commit, not the tree's), else the
    checkout's HEAD, else None."""
    if os.environ.get("SUITE_COMMIT"):
        return os.environ["SUITE_COMMIT"]
    try:
        result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value * scale, spec)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# GPU suite ({result['scale']}): {result.get('title', 'FLUX.1-dev transformer')}, one training iteration "
        "per case", "",
        f"- job: `{result['config']['job']}` (its model options, micro-batches and LoRA settings; the case's preset)",
        f"- date: {result['date']}",
        f"- machine: {m.get('device')} ({_fmt(m.get('device_memory_bytes'), '.1f', 2 ** -30)} GiB), "
        f"driver {m.get('driver', '—')}, host {m['host']}, {m['cpu_count']} CPUs",
        f"- torch {m['torch']} (CUDA {m['cuda']}), diffusers {result['packages']['diffusers']} "
        f"({result['diffusers_from']}), peft {result['packages']['peft']}; commit {result['commit'] or '—'}",
        f"- command: `{result['command']}`",
        f"- attention kernel (--sdpa): {result.get('sdpa', 'auto')}",
        f"- peak used for MFU: {_fmt(result['peak_tflops'], '.0f')} TFLOP/s (dense bf16)",
        f"- budget: {result['budget_s']:.0f} s for the cases; suite wall time {result['wall_s']:.0f} s"
        + ("" if result["finished"] else " (unfinished: written after the last case)"), "",
        f"- update: gradient checkpointing {'on' if result['config'].get('checkpointing', True) else 'off'}; "
        "micro-batches (rollout/train) per case in the table", "",
        "| case | train | micro-batches | rollout s | reward s | update s | peak GiB (plan) | rollout TFLOP/s (MFU) | "
        "update TFLOP/s (MFU) | NFE rollout / train | max abs(ρ−1) first step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        if "error" in c:
            lines.append(f"| {c['case']} | failed: {c['error']} ||||||||||")
            continue
        peak = max((v for v in c["peak_memory_bytes"].values() if v is not None), default=None)
        plan = c["plan_estimate"]["peak_bytes"] if c["plan_estimate"] else None
        s, t, u, mb = c["seconds"], c["tflops"], c["mfu"], c.get("micro_batches", {})
        lines.append(
            f"| {c['case']} | {c['trained_parameters'] / 1e6:.4g} M | {mb.get('rollout', '—')}/{mb.get('train', '—')} "
            f"| {s['rollout']:.2f} | {s['reward']:.3f} | "
            f"{s['update']:.2f} | {_fmt(peak, '.2f', 2 ** -30)} ({_fmt(plan, '.2f', 2 ** -30)}) | "
            f"{_fmt(t['rollout'], '.1f')} ({_fmt(u['rollout'], '.1%')}) | {_fmt(t['update'], '.1f')} "
            f"({_fmt(u['update'], '.1%')}) | {c['nfe']['rollout_calls']} / {c['nfe']['training_forwards']} | "
            f"{c['ratio_max_deviation_first_step']:.2e} |")
    compiled = [c for c in result["cases"] if c.get("compile", "off") != "off" and "error" not in c]
    if compiled:
        lines += ["", "Compiled cases (`--compile blocks`, compiled in the warm-up): graphs compiled during the "
                  "timed phases, which should be none:"]
        lines += [f"- {c['case']}: backend {c.get('compile_backend', 'inductor')}, warm-up {c['seconds']['warmup']:.0f} s, "
                  f"rollout {c['compiled_graphs_in_phases']['rollout']}, update {c['compiled_graphs_in_phases']['update']}"
                  for c in compiled]
    if result["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s['case']}: {s['reason']}" for s in result["skipped"]]
    lines += speed_option_lines(result.get("speed_options"))
    lines += ["", "What the columns are:"] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def speed_option_lines(options: dict[str, Any] | None) -> list[str]:
    """The speed options' tables (forward only, frozen weights, no gradients)."""
    if not options:
        return []
    if "error" in options:
        return ["", f"Speed options failed: {options['error']}"]

    def cell(e: dict[str, Any]) -> str:
        if "rows" not in e:
            return e.get("error") or e.get("skipped") or "—"
        return f"{e['seconds']:.3f} s, {e['tflops']:.1f} TFLOP/s ({_fmt(e['mfu'], '.1%')})"

    lines = ["", f"Speed options at {options['resolution']}² (forward without gradients, the rollout's call):", "",
             "| attention backend (4 rows) | time, TFLOP/s (MFU) |", "|---|---|"]
    lines += [f"| {k} | {cell(v)} |" for k, v in options["attention"].items()]
    lines += ["", "| rollout micro-batch | time, TFLOP/s (MFU) |", "|---|---|"]
    lines += [f"| {k} | {cell(v)} |" for k, v in options["micro_batch"].items()]
    c = options.get("compile")
    if c and "error" in c:
        lines += ["", f"torch.compile of the blocks: failed: {c['error']}"]
    elif c:
        lines += ["", f"torch.compile of every block ({c['rows']} rows): eager {cell(c['eager'])}, compiled "
                      f"{cell(c['compiled'])}, speed-up {c['speedup']:.3f}×, compile time {c['compile_seconds']:.0f} s"]
    else:
        lines += ["", "torch.compile of the blocks: not measured"]
    return lines


NOTES = [
    "Random weights (N(0, 0.02²) matrices) and random prompt embeddings of the real shapes: speed and memory "
    "are those of the real model; rewards and |ρ − 1| are those of a random model.",
    "reward: stand-in, the mean of each leaf's x̂0 latent; no VAE decode and no reward model are timed.",
    "update: score_tree + gather_training_edges + policy_update (forward with gradients, backward (with "
    "gradient checkpointing unless --checkpointing off), AdamW step), as the trainer's time/train.",
    "FLOPs from the architecture (branchgrpo.resources): 2 × multiply-accumulates of every linear (LoRA "
    "adapters included) + attention's QKᵀ and AV, backward only the gradients computed. Model FLOPs: "
    "checkpointing's recomputation is not counted in TFLOP/s or MFU (tflops.update_with_recompute counts it).",
    "MFU = achieved model TFLOP/s / the device's dense bf16 peak (989 for H100 SXM); null on unknown devices.",
    "peak GiB: torch.cuda.max_memory_allocated over the three phases (plan: branchgrpo plan's estimate, LoRA cases).",
    "blocks: full fine-tune of the listed blocks (fp32 masters, AdamW), the rest frozen in bf16.",
    "NFE counts sample calls; under true classifier-free guidance (SD3.5, Wan) each call runs two rows "
    "([negative; positive], rows_per_sample in results.json) and the FLOPs count both.",
]
