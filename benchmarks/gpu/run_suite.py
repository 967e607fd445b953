"""A full-size transformer on one GPU, with nothing downloaded: what one training iteration costs.

One command, from the repository root (≤ 8 minutes on one H100 80 GB by design; ``--budget-s``
skips the cases that would not finish in time and says so)::

    python benchmarks/gpu/run_suite.py --out benchmarks/results/gpu/<date>
    python benchmarks/gpu/run_suite.py --model sd3.5-medium --out ...   # or wan2.1-1.3b

On a machine without diffusers (and without network), bring it as a wheel first:
``bash benchmarks/gpu/prepare_wheels.sh`` (writes ``benchmarks/gpu/wheels/``, git-ignored); this
script puts those wheels on ``sys.path`` when ``import diffusers`` fails. See docs/flux.md,
"Measuring on a GPU".

What runs (default ``--model flux-dev``): the FLUX.1-dev transformer of the hub config (11.9 B
parameters) with random bf16 weights made on the GPU (meta-device construction, ``to_empty``, the
constructor's buffers copied back, seeded init), random prompt embeddings of the real shapes (T5
512 × 4096, pooled 768), and the project's own engine —
:func:`branchgrpo.tree.rollout.rollout`, :func:`branchgrpo.tree.scoring.score_tree`,
:func:`branchgrpo.update.gather_training_edges` and :func:`branchgrpo.update.policy_update`,
wired as ``Trainer.step`` wires them, with ``configs/flux-dev-hps.yaml``'s method settings
(20 steps, micro-batches 16/4, clip 1e-3, AdamW 1e-5). Per resolution (720², 512²): one
iteration of the ``branchgrpo`` and ``dancegrpo`` presets with LoRA rank 32 and gradient
checkpointing, and one ``branchgrpo`` iteration that fully fine-tunes a few blocks (the rest
frozen). The reward is a stand-in: the mean of each leaf's x̂0 latent (no VAE, no reward model).

``--model sd3.5-medium`` runs configs/sd35-medium-flowgrpo.yaml's model (CFG 4.5 in one doubled
call, CLIP + T5 128 tokens, 10 steps) at 512² and 1024²: Flow-GRPO's job as written (``flowgrpo``:
24 independent roots, KL term with its reference forward, two updates) and the ``branchgrpo``
tree on it. ``--model wan2.1-1.3b`` runs configs/wan21-1.3b-branchgrpo.yaml's model at 480 × 832,
33 frames (CFG 5.0, UMT5 512 tokens), with 10 steps so an iteration takes minutes, not ~8.

Recorded per case: rollout, reward and update seconds, peak memory per phase
(``torch.cuda.max_memory_allocated``) next to ``branchgrpo plan``'s estimate, FLOPs per phase
from the architecture (:mod:`branchgrpo.resources`), achieved TFLOP/s and MFU (dense bf16 peak
of the device, :data:`branchgrpo.train.metrics.PEAK_BF16_TFLOPS`; unknown device: null), NFE
and the largest |ρ − 1| before the first optimizer step. ``--scale tiny`` runs the same code on
a 2-block model of the architecture on CPU in float32 (``tests/test_gpu_suite.py``,
``tests/test_gpu_suite_models.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from suite_cases import (  # noqa: F401  (names the tests and callers use from run_suite)
    CONFIG,
    MODELS,
    ROOT,
    SCALES,
    SDPA_CHOICES,
    Case,
    Scale,
    all_cases,
    build_transformer,
    flux_dev_config,
    import_with_wheels,
    select_sdpa,
)
from suite_measure import _peak_tflops, plan_estimate, predicted_seconds, run_case  # noqa: F401
from suite_report import NOTES, _fmt, atomic_write, git_commit, machine_info, markdown, package_versions
from suite_speed import ATTENTION_BACKENDS, speed_options  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
    """The suite's command line (benchmarks/gpu/next_session.sh's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--model", choices=list(MODELS), default="flux-dev",
                        help="the architecture at its hub config, with its job config's settings (default flux-dev: "
                             "configs/flux-dev-hps.yaml; sd3.5-medium: configs/sd35-medium-flowgrpo.yaml; "
                             "wan2.1-1.3b: configs/wan21-1.3b-branchgrpo.yaml)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full",
                        help="full: the model on CUDA in bf16; tiny: a 2-block model on CPU in float32 (the test)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the cases; a case projected to end later is skipped (default: 400 full)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all, in order)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's 20; tiny 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="seconds for the whole suite; the speed options are measured only in what is left "
                             "(default: 540 full, 120 tiny)")
    parser.add_argument("--options", choices=("none", "no-compile", "all"), default="all",
                        help="speed options measured after the cases: attention backends and rollout micro-batches, "
                             "and (all) torch.compile of the blocks")
    parser.add_argument("--sdpa", choices=SDPA_CHOICES, default="flash",
                        help="attention kernel (default flash: cuDNN's backward failed on H100 with torch 2.11)")
    parser.add_argument("--compile", choices=("off", "blocks"), default="off",
                        help="model.compile: blocks = torch.compile every repeated block (compiled in the warm-up)")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager", "eager"), default="inductor",
                        help="torch.compile backend with --compile blocks (eager: trace only, for tests)")
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on",
                        help="gradient checkpointing in the update (default on, as configs/flux-dev-hps.yaml); "
                             "off saves the recomputation and needs the memory `branchgrpo plan` shows")
    parser.add_argument("--train-micro-batch", type=int, default=None,
                        help="rows per training micro-batch (default: the job config's 4; tiny 32)")
    parser.add_argument("--check-flops", action="store_true",
                        help="also count each phase's FLOPs with torch's FlopCounterMode (math attention; slow on GPU)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()

    sys.path.insert(0, str(ROOT / "src"))
    _, diffusers_from = import_with_wheels("diffusers")
    import torch

    if args.train_micro_batch is not None and args.train_micro_batch < 1:
        parser.error(f"--train-micro-batch: must be >= 1, got {args.train_micro_batch}")
    scale = dataclasses.replace(SCALES[args.scale](args.model), checkpointing=args.checkpointing == "on",
                                train_micro_batch=args.train_micro_batch)
    select_sdpa(args.sdpa)
    budget = scale.budget_s if args.budget_s is None else args.budget_s
    deadline_s = (540.0 if scale.name == "full" else 120.0) if args.deadline_s is None else args.deadline_s
    steps = args.steps or scale.steps
    if budget <= 0:
        parser.error(f"--budget-s: must be > 0, got {budget}")
    if steps < 10:
        parser.error(f"--steps: must be >= 10 (the branchgrpo preset splits at step 9), got {steps}")
    cases = all_cases(scale)
    if args.cases:
        known = {c.name: c for c in cases}
        wanted = [n.strip() for n in args.cases.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            parser.error(f"--cases: unknown {', '.join(unknown)}; allowed: {', '.join(known)}")
        cases = [known[n] for n in wanted]
    if scale.device == "cuda" and not torch.cuda.is_available():
        parser.error("--scale full needs a CUDA GPU (torch sees none); use --scale tiny on CPU")
    if scale.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = _peak_tflops(torch.device(scale.device), torch.bfloat16 if scale.device == "cuda" else torch.float32)
    result: dict[str, Any] = {
        "model": scale.model, "title": scale.suite_model.title, "scale": scale.name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *([sys.argv[0]] if argv is None else ["benchmarks/gpu/run_suite.py"]),
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(scale.device), "packages": package_versions(), "diffusers_from": diffusers_from,
        "commit": git_commit(), "sdpa": args.sdpa, "peak_tflops": peak, "budget_s": budget, "steps": steps,
        "config": {"model": scale.config, "text_tokens": scale.text_tokens, "lora_rank": scale.lora_rank,
                   "blocks": list(scale.blocks), "weights_dtype": scale.weights_dtype,
                   "checkpointing": scale.checkpointing, "train_micro_batch": scale.train_micro_batch,
                   "job": str(scale.suite_model.job.relative_to(ROOT)),
                   **({"frames": scale.frames} if scale.frames else {}),
                   **({"widths": dict(scale.widths)} if scale.widths else {})},
        "cases": [], "skipped": [], "speed_options": None, "notes": NOTES, "wall_s": None, "finished": False,
    }

    def save() -> None:  # after every case: a run cut short by a timeout still leaves its results
        result["wall_s"] = time.perf_counter() - started
        atomic_write(out / "results.json", json.dumps(result, indent=2) + "\n")
        atomic_write(out / "results.md", markdown(result))

    save()
    cases_started = time.perf_counter()
    done_flops = done_seconds = overhead = 0.0  # overhead: the last case's build, warm-up and reward seconds
    for case in cases:
        elapsed = time.perf_counter() - cases_started
        rate = done_flops / done_seconds if done_seconds > 0 else (0.3 * peak * 1e12 if peak else None)
        expected = predicted_seconds(case, scale, steps, rate)
        expected = None if expected is None else expected + overhead
        if elapsed >= budget or (expected is not None and elapsed + expected > budget):
            reason = (f"budget: {elapsed:.0f} s used of {budget:.0f} s"
                      + (f", projected {expected:.0f} s at {rate / 1e12:.0f} TFLOP/s" if expected is not None else ""))
            result["skipped"].append({"case": case.name, "reason": reason})
            print(f"[suite] skip {case.name}: {reason}", flush=True)
            continue
        print(f"[suite] {case.name} ...", flush=True)
        try:  # compiled: a block past dynamo's recompile limit would run eager and be timed as compiled
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=args.compile != "off"):
                record = run_case(case, scale, steps, args.seed, args.check_flops, args.compile, args.compile_backend)
        except Exception as err:  # noqa: BLE001  (record it and go on with the next case)
            first_line = str(err).splitlines()[0][:300] if str(err) else ""
            record = {"case": case.name, "error": f"{type(err).__name__}: {first_line}",
                      "traceback": traceback.format_exc(limit=8)}
        result["cases"].append(record)
        save()
        if "error" in record:
            print(f"[suite] {case.name} failed: {record['error']}\n{record['traceback']}", flush=True)
            if "AcceleratorError" in record["error"] or "CUDA error" in record["error"]:
                result["skipped"] += [{"case": c.name, "reason": "a CUDA error ended the process's CUDA context"}
                                      for c in cases[cases.index(case) + 1:]]
                args.options = "none"
                break  # every later CUDA call would fail the same way
            continue
        gc.collect()
        if scale.device == "cuda":
            torch.cuda.empty_cache()
        s, f = record["seconds"], record["flops"]
        done_flops += f["rollout"] + f["update"] + f["update_recompute"]
        done_seconds += s["rollout"] + s["update"]
        overhead = s["build"] + s["warmup"] + s["reward"]
        t, peak_bytes = record["tflops"], max(v or 0 for v in record["peak_memory_bytes"].values())
        print(f"[suite] {case.name}: rollout {s['rollout']:.1f} s ({_fmt(t['rollout'], '.1f')} TFLOP/s), "
              f"update {s['update']:.1f} s ({_fmt(t['update'], '.1f')} TFLOP/s), peak {peak_bytes / 2 ** 30:.2f} GiB, "
              f"max|ρ−1| {record['ratio_max_deviation_first_step']:.2e}", flush=True)
    if args.options != "none":
        size = scale.sizes[0]
        print(f"[suite] speed options at {size}² ...", flush=True)
        try:
            result["speed_options"] = speed_options(scale, size, args.seed, started + deadline_s,
                                                    compile_blocks=args.options == "all")
        except Exception as err:  # noqa: BLE001
            result["speed_options"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                                       "traceback": traceback.format_exc(limit=8)}
        print(f"[suite] speed options: {json.dumps(result['speed_options'])[:2000]}", flush=True)
    result["finished"] = True
    save()
    print(f"[suite] wrote {out / 'results.json'} and {out / 'results.md'} ({result['wall_s']:.0f} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
