"""FLUX.1-dev at full size on one GPU, with nothing downloaded: what one training iteration costs.

One command, from the repository root (≤ 8 minutes on one H100 80 GB by design; ``--budget-s``
skips the cases that would not finish in time and says so)::

    python benchmarks/gpu/run_suite.py --out benchmarks/results/gpu/<date>

On a machine without diffusers (and without network), bring it as a wheel first:
``bash benchmarks/gpu/prepare_wheels.sh`` (writes ``benchmarks/gpu/wheels/``, git-ignored); this
script puts those wheels on ``sys.path`` when ``import diffusers`` fails. See docs/flux.md,
"Measuring on a GPU".

What runs: the FLUX.1-dev transformer of the hub config (11.9 B parameters) with random bf16
weights made on the GPU (meta-device construction, ``to_empty``, seeded init), random prompt
embeddings of the real shapes (T5 512 × 4096, pooled 768), and the project's own engine —
:func:`branchgrpo.tree.rollout.rollout`, :func:`branchgrpo.tree.scoring.score_tree`,
:func:`branchgrpo.update.gather_training_edges` and :func:`branchgrpo.update.policy_update`,
wired as ``Trainer.step`` wires them, with ``configs/flux-dev-hps.yaml``'s method settings
(20 steps, micro-batches 16/4, clip 1e-3, AdamW 1e-5). Per resolution (720², 512²): one
iteration of the ``branchgrpo`` and ``dancegrpo`` presets with LoRA rank 32 and gradient
checkpointing, and one ``branchgrpo`` iteration that fully fine-tunes a few blocks (the rest
frozen). The reward is a stand-in: the mean of each leaf's x̂0 latent (no VAE, no reward model).

Recorded per case: rollout, reward and update seconds, peak memory per phase
(``torch.cuda.max_memory_allocated``) next to ``branchgrpo plan``'s estimate, FLOPs per phase
from the architecture (:mod:`branchgrpo.resources`), achieved TFLOP/s and MFU (dense bf16 peak
of the device, :data:`branchgrpo.train.metrics.PEAK_BF16_TFLOPS`; unknown device: null), NFE
and the largest |ρ − 1| before the first optimizer step. ``--scale tiny`` runs the same code on
a 2+2-block model on CPU in float32 (``tests/test_gpu_suite.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[2]
WHEELS = Path(__file__).resolve().parent / "wheels"
CONFIG = ROOT / "configs" / "flux-dev-hps.yaml"
INIT_STD = 0.02  # random linear weights ~ N(0, 0.02²), biases 0, norm weights 1


SDPA_CHOICES = ("auto", "flash", "efficient", "cudnn", "math")  # branchgrpo.models.speed.ATTENTION_KERNELS


def select_sdpa(name: str) -> None:
    """``model.attention``'s setting (:func:`branchgrpo.models.speed.select_attention`)."""
    sys.path.insert(0, str(ROOT / "src"))
    from branchgrpo.models.speed import select_attention

    select_attention(name)


def import_with_wheels(name: str, folder: Path = WHEELS) -> tuple[Any, str]:
    """``import name``; if that fails, put every ``*.whl`` of ``folder`` on ``sys.path`` (a
    pure-Python wheel is a zip that zipimport reads) and import again. Returns the module and
    where it came from."""
    import importlib

    try:
        return importlib.import_module(name), "installed"
    except ImportError:
        wheels = sorted(folder.glob("*.whl"))
        if not wheels:
            raise SystemExit(f"run_suite: {name} is not installed and {folder} holds no wheels; "
                             f"run `bash benchmarks/gpu/prepare_wheels.sh` first") from None
        for wheel in reversed(wheels):
            sys.path.insert(0, str(wheel))
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]  # a half-imported package from the first try
        return importlib.import_module(name), ", ".join(w.name for w in wheels)


# --------------------------------------------------------------------------------------------
# Scales
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scale:
    """The model and job sizes of one suite run."""

    name: str
    config: dict[str, Any]  # FluxTransformer2DModel kwargs
    text_tokens: int
    sizes: tuple[int, ...]  # image sizes in pixels (square), first measured first
    steps: int
    lora_rank: int
    blocks: tuple[str, ...]  # what the "blocks" cases fine-tune fully
    device: str
    weights_dtype: str  # frozen weights; trained tensors are float32 masters (use_master_weights)
    budget_s: float
    micro_batches: tuple[int, int] | None = None  # (rollout, train); None: the job config's (16, 4)


def flux_dev_config() -> dict[str, Any]:
    from branchgrpo.resources import HUB_CONFIGS

    return {k: v for k, v in HUB_CONFIGS["flux-dev"].items() if not k.startswith("_")}


SCALES: dict[str, Callable[[], Scale]] = {
    "full": lambda: Scale(
        "full", flux_dev_config(), text_tokens=512, sizes=(720, 512), steps=20, lora_rank=32,
        blocks=("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                "single_transformer_blocks.1"),
        device="cuda", weights_dtype="bfloat16", budget_s=400.0),
    "tiny": lambda: Scale(
        "tiny", {"in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
                 "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
                 "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]},
        text_tokens=8, sizes=(64, 32), steps=10, lora_rank=4,
        blocks=("transformer_blocks.0", "single_transformer_blocks.0"),
        device="cpu", weights_dtype="float32", budget_s=400.0, micro_batches=(64, 32)),
}
PRESETS_AND_TRAINING = (("branchgrpo", "lora"), ("dancegrpo", "lora"), ("branchgrpo", "blocks"))


@dataclass(frozen=True)
class Case:
    preset: str
    size: int
    training: str  # "lora" (rank scale.lora_rank) or "blocks" (scale.blocks fully trained)

    @property
    def name(self) -> str:
        return f"{self.preset}-{self.size}-{self.training}"


def all_cases(scale: Scale) -> list[Case]:
    return [Case(preset, size, training) for size in scale.sizes for preset, training in PRESETS_AND_TRAINING]


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------

def build_transformer(config: dict[str, Any], device, dtype, seed: int):
    """``FluxTransformer2DModel(**config)`` with random weights made directly on ``device`` in
    ``dtype``: built on the meta device, cast there, ``to_empty`` (one allocation of the final
    size, no float32 copy), then ``N(0, INIT_STD²)`` matrices, zero biases, unit norm weights."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    torch.nn.Module.to(model, dtype=dtype)  # nn.Module's: diffusers' own .to warns about fp32 modules
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, INIT_STD, generator=generator)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return model


def prepare_training(transformer, case: Case, scale: Scale) -> None:
    """LoRA (the trainer's ``add_lora``) or full training of ``scale.blocks``; checkpointing on."""
    if case.training == "lora":
        from branchgrpo.models.lora import LoraSpec, add_lora

        add_lora(transformer, LoraSpec(rank=scale.lora_rank))
    else:
        transformer.requires_grad_(False)
        for prefix in scale.blocks:
            transformer.get_submodule(prefix).requires_grad_(True)
    transformer.enable_gradient_checkpointing()


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

class Clock:
    """Phase times (device-synchronised) and peak allocated memory per phase."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int | None] = {}

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        import torch

        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] = time.perf_counter() - start
        self.peak_bytes[name] = torch.cuda.max_memory_allocated(self.device) if self.cuda else None


@contextmanager
def counted_flops(enabled: bool, into: dict[str, int], key: str) -> Iterator[None]:
    """With ``enabled``: count the FLOPs of the block with ``FlopCounterMode``, attention as
    matmuls it sees (the math SDPA backend), into ``into[key]``."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield
    into[key] = int(counter.get_total_flops())


def plan_estimate(case: Case, scale: Scale, steps: int) -> dict[str, Any] | None:
    """``branchgrpo plan``'s per-phase memory for the LoRA cases (it does not model a partial
    fine-tune)."""
    if case.training != "lora":
        return None
    from branchgrpo.resources import estimate_job
    from branchgrpo.train.config import load_train_config

    dtype = "float32" if scale.weights_dtype == "float32" else "auto"
    config = load_train_config(CONFIG, case.preset, [
        f"model.lora.rank={scale.lora_rank}", "run.parallel=ddp", f"model.dtype={dtype}",
        f"model.options.height={case.size}", f"model.options.width={case.size}",
        f"model.options.max_sequence_length={scale.text_tokens}", *job_overrides(scale, steps)])
    estimate = estimate_job(config, scale.config, processes=1)
    return {"phase_peak_bytes": {k: estimate.phase_peak(k) for k in estimate.phases},
            "peak_bytes": estimate.peak, "peak_phase": estimate.peak_phase}


def job_overrides(scale: Scale, steps: int) -> list[str]:
    """What the suite changes in ``configs/flux-dev-hps.yaml``: steps and (tiny) micro-batches."""
    out = [f"method.tree.steps={steps}"]
    if scale.micro_batches:
        out += [f"method.engine.rollout_micro_batch={scale.micro_batches[0]}",
                f"method.engine.train_micro_batch={scale.micro_batches[1]}"]
    return out


def method_for(case: Case, scale: Scale, steps: int):
    """``configs/flux-dev-hps.yaml``'s method with ``case.preset`` (as ``train --config ... --preset``)."""
    from branchgrpo.train.config import load_train_config

    return load_train_config(CONFIG, case.preset, job_overrides(scale, steps)).method


def run_case(case: Case, scale: Scale, steps: int, seed: int, check_flops: bool,
             compile_mode: str = "off") -> dict[str, Any]:
    """One training iteration of ``case``, wired as ``Trainer.step`` (one prompt, one process)."""
    import torch

    from branchgrpo.families import PolicyBundle
    from branchgrpo.models.flux import FluxVelocity
    from branchgrpo.rewards.base import RewardOutput
    from branchgrpo.train.components import use_master_weights
    from branchgrpo.train.distributed import DistributedContext
    from branchgrpo.train.metrics import iteration_metrics, phase_flops, row_flops
    from branchgrpo.train.trainer import RandomStream, iteration_generator
    from branchgrpo.tree.rollout import rollout
    from branchgrpo.tree.scoring import score_tree
    from branchgrpo.update import gather_training_edges, policy_update

    device = torch.device(scale.device)
    weights_dtype = getattr(torch, scale.weights_dtype)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    method = method_for(case, scale, steps)
    clock = Clock(device)
    record: dict[str, Any] = {"case": case.name, "preset": case.preset, "resolution": case.size,
                              "training": case.training, "compile": compile_mode}

    with clock.phase("build"):
        transformer = build_transformer(scale.config, device, weights_dtype, seed)
        prepare_training(transformer, case, scale)
        if compile_mode == "blocks":  # model.compile=blocks: compiled during the warm-up, not the phases
            from branchgrpo.models.speed import compile_blocks

            compile_blocks(transformer)
        latent = case.size // 8  # VAE factor 8; packed 2×2 → (size/16)² tokens
        policy = FluxVelocity(transformer, latent, latent, guidance_scale=3.5).to(device)
        tokens, channels = (latent // 2) ** 2, int(scale.config["in_channels"])
        bundle = PolicyBundle(family="flux", policy=policy, trainable=transformer, latent_shape=(tokens, channels),
                              encode_prompts=lambda prompts: {}, decode=lambda x: x)
        use_master_weights(bundle, compute)  # trained tensors in float32, forward under bf16 autocast on CUDA
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=method.update.learning_rate,
                                      weight_decay=method.update.weight_decay)
        g = torch.Generator(device=device).manual_seed(seed + 1)
        conditioning = {  # T5 [P, L, 4096] and CLIP pooled [P, 768] in the full model
            "prompt_embeds": torch.randn(1, scale.text_tokens, scale.config["joint_attention_dim"], generator=g,
                                         device=device),
            "pooled_prompt_embeds": torch.randn(1, scale.config["pooled_projection_dim"], generator=g, device=device),
        }
    record["parameters"] = sum(p.numel() for p in transformer.parameters())
    record["trained_parameters"] = sum(p.numel() for p in params)
    row = row_flops(transformer, tokens, scale.text_tokens)

    with clock.phase("warmup"):  # kernels, cuBLAS handles and autotuning: one row without and with gradients
        x = torch.randn(1, tokens, channels, generator=g, device=device)
        sigma = torch.full((1,), 0.5, device=device)
        with torch.no_grad():
            policy(x, sigma, conditioning)
        policy.train()
        policy(x, sigma, conditioning).square().mean().backward()
        optimizer.zero_grad(set_to_none=True)
        policy.eval()

    counted: dict[str, int] = {}
    it = 0
    with clock.phase("rollout"), counted_flops(check_flops, counted, "rollout"):
        tree = rollout(
            policy, conditioning, method.tree, 1, (tokens, channels),
            generator=[iteration_generator(seed, it, RandomStream.ROLLOUT, 0)], iteration=it,
            micro_batch=method.engine.rollout_micro_batch, device=device,
        )
    with clock.phase("reward"):  # stand-in: the mean of each leaf's x̂0 latent, no VAE decode
        rewards = tree.leaf_x0.float().mean(dim=tuple(range(1, tree.leaf_x0.ndim)))
        scored = RewardOutput(total=rewards.cpu(), components={"latent_mean": rewards.cpu()})
    with clock.phase("update"), counted_flops(check_flops, counted, "update"):
        scores = score_tree(tree, scored.total.to(torch.float64), method,
                            generator=[iteration_generator(seed, it, RandomStream.SELECTION, 0)])
        edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
        policy.train()
        stats = policy_update(policy, optimizer, edges, conditioning, method,
                              generator=iteration_generator(seed, it, RandomStream.UPDATE, 0))
        policy.eval()

    times = {"rollout": clock.seconds["rollout"], "reward": clock.seconds["reward"], "train": clock.seconds["update"]}
    metrics = iteration_metrics(scored, tree, scores, edges, stats, times, method, DistributedContext(),
                                lr=method.update.learning_rate, device=device, reward_name="latent_mean",
                                policy=policy, conditioning=conditioning)
    model_flops = phase_flops(policy, conditioning, tree, stats, method)
    flops = {"rollout": model_flops["rollout"], "update": model_flops["train"],
             "update_recompute": stats.training_forwards * row.recompute}
    peak = _peak_tflops(device, compute)
    seconds = {"build": clock.seconds["build"], "warmup": clock.seconds["warmup"], "rollout": times["rollout"],
               "reward": times["reward"], "update": times["train"]}

    def rate(value: float, secs: float) -> float | None:
        return value / secs / 1e12 if secs > 0 else None

    def mfu(value: float, secs: float) -> float | None:
        return rate(value, secs) / peak if peak and secs > 0 else None

    record.update({
        "tokens": {"image": tokens, "text": scale.text_tokens},
        "seconds": seconds,
        "peak_memory_bytes": {k: clock.peak_bytes.get(k) for k in ("rollout", "reward", "update")},
        "plan_estimate": plan_estimate(case, scale, steps),
        "flops_per_row": asdict(row),
        "flops": flops,
        "tflops": {"rollout": rate(flops["rollout"], seconds["rollout"]),
                   "update": rate(flops["update"], seconds["update"]),
                   "update_with_recompute": rate(flops["update"] + flops["update_recompute"], seconds["update"])},
        "mfu": {"rollout": mfu(flops["rollout"], seconds["rollout"]),
                "update": mfu(flops["update"], seconds["update"])},
        "nfe": {"rollout_calls": tree.rollout_calls, "training_forwards": stats.training_forwards,
                "trained_edges": stats.trained_edges, **{f"plan_{k}": v for k, v in asdict(scores.nfe).items()}},
        "ratio_max_deviation_first_step": stats.ratio_max_deviation_first_step,
        "clip_range": method.update.clip_range,
        "optimizer_steps": stats.optimizer_steps,
        "skipped_steps": stats.skipped_steps,
        "nonfinite_micro_batches": stats.nonfinite_micro_batches,
        "grad_norm": stats.grad_norms[-1] if stats.grad_norms else None,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "trainer_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    })
    if check_flops:
        record["flops_counted"] = counted
    return record


def _peak_tflops(device, compute) -> float | None:
    import torch

    from branchgrpo.train.metrics import peak_tflops

    return peak_tflops(device) if compute in (torch.bfloat16, torch.float16) else None


def predicted_seconds(case: Case, scale: Scale, steps: int, rate: float | None) -> float | None:
    """Seconds the case's rollout and update should take at ``rate`` FLOP/s (recomputation
    included), from ``branchgrpo plan``'s counts and the architecture; None without a rate."""
    if not rate:
        return None
    from branchgrpo.models.lora import DEFAULT_TARGET_MODULES
    from branchgrpo.resources import FluxArchitecture, Tokens, Training
    from branchgrpo.train.metrics import PartialTraining, flux_row_flops
    from branchgrpo.tree.nfe import plan

    arch = FluxArchitecture(scale.config)
    if case.training == "lora":
        train = Training(scale.lora_rank, DEFAULT_TARGET_MODULES)
    else:
        train = PartialTraining(weights=frozenset(x.name for x in arch.linears() if x.name.startswith(
            tuple(prefix + "." for prefix in scale.blocks))))
    row = flux_row_flops(arch, Tokens(arch.image_tokens(case.size, case.size), scale.text_tokens), train, True)
    counts = plan(method_for(case, scale, steps)).counts
    return (counts.rollout_calls * row.forward
            + counts.training_forwards * (row.forward + row.backward + row.recompute)) / rate


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

    from branchgrpo.models.flux import FluxVelocity
    from branchgrpo.resources import FluxArchitecture, Tokens, Training
    from branchgrpo.train.metrics import flux_row_flops

    device = torch.device(scale.device)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = Clock(device)
    transformer = build_transformer(scale.config, device, getattr(torch, scale.weights_dtype), seed)
    transformer.requires_grad_(False)
    latent = size // 8
    policy = FluxVelocity(transformer, latent, latent, guidance_scale=3.5).to(device).eval()
    policy.compute_dtype = None if compute == torch.float32 else compute
    tokens, channels = (latent // 2) ** 2, int(scale.config["in_channels"])
    arch = FluxArchitecture(scale.config)
    row = flux_row_flops(arch, Tokens(tokens, scale.text_tokens), Training(0, ()), False).forward
    g = torch.Generator(device=device).manual_seed(seed + 2)
    peak = _peak_tflops(device, compute)
    repeats = 3 if device.type == "cuda" else 1

    def forward(rows: int) -> Callable[[], Any]:
        cond = {"prompt_embeds": torch.randn(rows, scale.text_tokens, scale.config["joint_attention_dim"],
                                             generator=g, device=device),
                "pooled_prompt_embeds": torch.randn(rows, scale.config["pooled_projection_dim"], generator=g,
                                                    device=device)}
        x = torch.randn(rows, tokens, channels, generator=g, device=device)
        sigma = torch.full((rows,), 0.5, device=device)

        def call():
            with torch.no_grad():
                return policy(x, sigma, cond)
        return call

    def entry(rows: int, seconds: float) -> dict[str, Any]:
        tflops = rows * row / seconds / 1e12
        return {"rows": rows, "seconds": seconds, "tflops": tflops, "mfu": tflops / peak if peak else None}

    out: dict[str, Any] = {"resolution": size, "tokens": {"image": tokens, "text": scale.text_tokens},
                           "flops_per_row": row, "attention": {}, "micro_batch": {}, "compile": None}
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
            for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
                block.compile()
            call = forward(rows)
            call()
            clock.sync()
            compile_s = time.perf_counter() - start
            compiled = _timed(call, clock, repeats)
            out["compile"] = {"rows": rows, "eager": entry(rows, eager), "compiled": entry(rows, compiled),
                              "compile_seconds": compile_s, "speedup": eager / compiled}
        except Exception as err:  # noqa: BLE001
            out["compile"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    del policy, transformer
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

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
        f"# GPU suite ({result['scale']}): FLUX.1 transformer, one training iteration per case", "",
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
        "| case | train | rollout s | reward s | update s | peak GiB (plan) | rollout TFLOP/s (MFU) | "
        "update TFLOP/s (MFU) | NFE rollout / train | max abs(ρ−1) first step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        if "error" in c:
            lines.append(f"| {c['case']} | failed: {c['error']} |||||||||")
            continue
        peak = max((v for v in c["peak_memory_bytes"].values() if v is not None), default=None)
        plan = c["plan_estimate"]["peak_bytes"] if c["plan_estimate"] else None
        s, t, u = c["seconds"], c["tflops"], c["mfu"]
        lines.append(
            f"| {c['case']} | {c['trained_parameters'] / 1e6:.4g} M | {s['rollout']:.2f} | {s['reward']:.3f} | "
            f"{s['update']:.2f} | {_fmt(peak, '.2f', 2 ** -30)} ({_fmt(plan, '.2f', 2 ** -30)}) | "
            f"{_fmt(t['rollout'], '.1f')} ({_fmt(u['rollout'], '.1%')}) | {_fmt(t['update'], '.1f')} "
            f"({_fmt(u['update'], '.1%')}) | {c['nfe']['rollout_calls']} / {c['nfe']['training_forwards']} | "
            f"{c['ratio_max_deviation_first_step']:.2e} |")
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
    "update: score_tree + gather_training_edges + policy_update (forward with gradients, backward with "
    "gradient checkpointing, AdamW step), as the trainer's time/train.",
    "FLOPs from the architecture (branchgrpo.resources): 2 × multiply-accumulates of every linear (LoRA "
    "adapters included) + attention's QKᵀ and AV, backward only the gradients computed. Model FLOPs: "
    "checkpointing's recomputation is not counted in TFLOP/s or MFU (tflops.update_with_recompute counts it).",
    "MFU = achieved model TFLOP/s / the device's dense bf16 peak (989 for H100 SXM); null on unknown devices.",
    "peak GiB: torch.cuda.max_memory_allocated over the three phases (plan: branchgrpo plan's estimate, LoRA cases).",
    "blocks: full fine-tune of the listed blocks (fp32 masters, AdamW), the rest frozen in bf16.",
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full",
                        help="full: FLUX.1-dev on CUDA in bf16; tiny: 2+2 blocks on CPU in float32 (the test)")
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
    parser.add_argument("--check-flops", action="store_true",
                        help="also count each phase's FLOPs with torch's FlopCounterMode (math attention; slow on GPU)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    sys.path.insert(0, str(ROOT / "src"))
    _, diffusers_from = import_with_wheels("diffusers")
    import torch

    scale = SCALES[args.scale]()
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
        "scale": scale.name, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *([sys.argv[0]] if argv is None else ["benchmarks/gpu/run_suite.py"]),
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(scale.device), "packages": package_versions(), "diffusers_from": diffusers_from,
        "commit": git_commit(), "sdpa": args.sdpa, "peak_tflops": peak, "budget_s": budget, "steps": steps,
        "config": {"model": scale.config, "text_tokens": scale.text_tokens, "lora_rank": scale.lora_rank,
                   "blocks": list(scale.blocks), "weights_dtype": scale.weights_dtype,
                   "job": str(CONFIG.relative_to(ROOT))},
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
        try:
            record = run_case(case, scale, steps, args.seed, args.check_flops, args.compile)
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
