"""The GPU suite's speed options: attention backend, rollout micro-batch and torch.compile of the
blocks, each timed on the suite's model (benchmarks/gpu/run_suite.py)."""

from __future__ import annotations

import time
from typing import Any, Callable

import dataclasses

from suite_cases import Scale, all_cases, build_transformer
from suite_measure import Clock, _peak_tflops, job_config, make_policy

# --------------------------------------------------------------------------------------------
# Speed options: attention backend, rollout micro-batch, torch.compile of the blocks
# --------------------------------------------------------------------------------------------

ATTENTION_BACKENDS = ("default", "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def _timed(fn: Callable[[], Any], clock: "Clock", repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    clock.sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        clock.sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def speed_options(scale: Scale, size: int, seed: int, deadline: float, compile_blocks: bool) -> dict[str, Any]:
    """Forward-only (rollout) throughput of the frozen transformer at ``size`` under each SDPA
    backend, for rollout micro-batches 1..32, and with every block ``torch.compile``d: the
    numbers the engine's defaults are chosen from. Each measurement is skipped once
    ``time.perf_counter()`` passes ``deadline``; a backend the device lacks is recorded as such."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from branchgrpo.models.speed import compile_blocks as compile_repeated_blocks
    from branchgrpo.resources import Tokens, Training
    from branchgrpo.train.metrics import architecture_of, architecture_row_flops, image_stream_tokens

    device = torch.device(scale.device)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = Clock(device)
    transformer = build_transformer(scale.config, device, getattr(torch, scale.weights_dtype), seed,
                                    scale.suite_model.transformer_class)
    transformer.requires_grad_(False)
    case = dataclasses.replace(all_cases(scale)[0], size=size)
    g = torch.Generator(device=device).manual_seed(seed + 2)
    policy, shape, cond1 = make_policy(transformer, case, scale, job_config(case, scale, scale.steps), device, g)
    policy = policy.to(device).eval()
    policy.compute_dtype = None if compute == torch.float32 else compute
    arch = architecture_of(transformer)
    tokens = image_stream_tokens(arch, torch.empty(1, *shape, device="meta"), {})
    rows_per_sample = 2 if getattr(policy, "uses_cfg", False) else 1  # true CFG: [negative; positive]
    row = rows_per_sample * architecture_row_flops(arch, Tokens(tokens, scale.text_tokens), Training(0, ()),
                                                   False).forward
    peak = _peak_tflops(device, compute)
    repeats = 3 if device.type == "cuda" else 1

    def forward(rows: int) -> Callable[[], Any]:
        cond = {k: torch.randn(rows, *v.shape[1:], generator=g, device=device) for k, v in cond1.items()}
        x = torch.randn(rows, *shape, generator=g, device=device)
        sigma = torch.full((rows,), 0.5, device=device)

        def call():
            with torch.no_grad():
                return policy(x, sigma, cond)
        return call

    def entry(rows: int, seconds: float) -> dict[str, Any]:
        tflops = rows * row / seconds / 1e12
        return {"rows": rows, "seconds": seconds, "tflops": tflops, "mfu": tflops / peak if peak else None}

    out: dict[str, Any] = {"resolution": size, "tokens": {"image": tokens, "text": scale.text_tokens},
                           "flops_per_row": row, "rows_per_sample": rows_per_sample, "attention": {},
                           "micro_batch": {}, "compile": None}
    rows = 4
    for backend in ATTENTION_BACKENDS:
        if time.perf_counter() > deadline:
            out["attention"][backend] = {"skipped": "deadline"}
            continue
        try:
            if backend == "default":
                out["attention"][backend] = entry(rows, _timed(forward(rows), clock, repeats))
            else:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    out["attention"][backend] = entry(rows, _timed(forward(rows), clock, repeats))
        except Exception as err:  # noqa: BLE001  (a backend this device or dtype lacks)
            out["attention"][backend] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    for rows in (1, 2, 4, 8, 16, 32) if device.type == "cuda" else (1, 2):
        if time.perf_counter() > deadline:
            out["micro_batch"][str(rows)] = {"skipped": "deadline"}
            continue
        try:
            out["micro_batch"][str(rows)] = entry(rows, _timed(forward(rows), clock, repeats))
        except torch.OutOfMemoryError:
            out["micro_batch"][str(rows)] = {"error": "out of memory"}
            break
    if compile_blocks and time.perf_counter() < deadline:
        rows = 4
        try:
            eager = _timed(forward(rows), clock, repeats)
            start = time.perf_counter()
            compile_repeated_blocks(transformer)
            call = forward(rows)
            call()
            clock.sync()
            compile_s = time.perf_counter() - start
            compiled = _timed(call, clock, repeats)
            out["compile"] = {"rows": rows, "eager": entry(rows, eager), "compiled": entry(rows, compiled),
                              "compile_seconds": compile_s, "speedup": eager / compiled}
        except Exception as err:  # noqa: BLE001
            out["compile"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return out
