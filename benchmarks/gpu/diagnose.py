"""Stage-by-stage check of the CUDA paths the GPU suite uses, small enough to run in seconds:
run it with ``CUDA_LAUNCH_BLOCKING=1`` so a failing kernel is reported at the op that launched it.

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/gpu/diagnose.py

Prints ``[diagnose] <stage> ok`` per stage; the first stage without it is the one that failed.
Stages: a bf16 linear with bias on one row (cuBLASLt's gemm-with-bias path), the same under
autocast, then FLUX.1-dev's width with 1 + 1 blocks: a frozen forward of one row and of 16 rows at
720², LoRA rank 32 with float32 masters, and a training forward + backward with checkpointing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_suite  # noqa: E402


def stage(name: str, start: float) -> None:
    print(f"[diagnose] {name} ok ({time.perf_counter() - start:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of this script)")
    parser.add_argument("--size", type=int, default=720, help="image size in pixels (default 720)")
    parser.add_argument("--sdpa", choices=run_suite.SDPA_CHOICES, default="auto",
                        help="attention kernel (run_suite.select_sdpa); default: torch's own order")
    args = parser.parse_args(argv)
    run_suite.import_with_wheels("diffusers")
    import torch

    run_suite.select_sdpa(args.sdpa)

    from branchgrpo.families import PolicyBundle
    from branchgrpo.models.flux import FluxVelocity
    from branchgrpo.train.components import use_master_weights

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    device = torch.device(args.device)
    linear = torch.nn.Linear(3072, 18432, device=device, dtype=torch.bfloat16)
    x = torch.randn(1, 3072, device=device, dtype=torch.bfloat16)
    linear(x)
    sync()
    stage("bf16 linear with bias, 1 row", start)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        linear.float()(x.float())
    sync()
    stage("fp32 linear under bf16 autocast, 1 row", start)

    config = dict(run_suite.flux_dev_config(), num_layers=1, num_single_layers=1)
    transformer = run_suite.build_transformer(config, device, torch.bfloat16, 0)
    sync()
    stage("build (meta, to_empty, seeded init)", start)
    latent = args.size // 8
    tokens = (latent // 2) ** 2
    policy = FluxVelocity(transformer, latent, latent, guidance_scale=3.5).to(device)
    policy.compute_dtype = torch.bfloat16

    def inputs(rows: int):
        cond = {"prompt_embeds": torch.randn(rows, 512, 4096, device=device),
                "pooled_prompt_embeds": torch.randn(rows, 768, device=device)}
        return torch.randn(rows, tokens, 64, device=device), torch.full((rows,), 0.5, device=device), cond

    with torch.no_grad():
        policy(*inputs(1))
    sync()
    stage("frozen forward, 1 row", start)
    with torch.no_grad():
        policy(*inputs(16))
    sync()
    stage("frozen forward, 16 rows", start)

    from branchgrpo.models.lora import LoraSpec, add_lora

    add_lora(transformer, LoraSpec(rank=32))
    transformer.enable_gradient_checkpointing()
    bundle = PolicyBundle(family="flux", policy=policy, trainable=transformer, latent_shape=(tokens, 64),
                          encode_prompts=lambda prompts: {}, decode=lambda x: x)
    use_master_weights(bundle, torch.bfloat16)
    with torch.no_grad():
        policy(*inputs(1))
    sync()
    stage("LoRA forward, 1 row", start)
    policy.train()
    policy(*inputs(4)).square().mean().backward()
    sync()
    stage("LoRA training forward + backward, 4 rows, checkpointing", start)
    print("[diagnose] all stages ok", flush=True)


if __name__ == "__main__":
    main()
