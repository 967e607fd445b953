"""The GPU suite's measurement of one case: rollout, reward and update timed and counted (seconds,
peak memory, FLOPs, NFE, |ρ − 1|), and the seconds a case is predicted to take (benchmarks/gpu/run_suite.py)."""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from suite_cases import SD3_CLIP_TOKENS, Case, Scale, build_transformer, prepare_training

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

    estimate = estimate_job(job_config(case, scale, steps, plan=True), scale.config, processes=1)
    return {"phase_peak_bytes": {k: estimate.phase_peak(k) for k in estimate.phases},
            "peak_bytes": estimate.peak, "peak_phase": estimate.peak_phase}


def size_options(scale: Scale, size: int) -> list[str]:
    """``model.options`` overrides for one case's resolution and text length."""
    out = [f"model.options.height={size}", f"model.options.width={scale.width(size)}"]
    family = scale.suite_model.family
    text = scale.text_tokens - SD3_CLIP_TOKENS if family == "sd3" else scale.text_tokens
    out.append(f"model.options.max_sequence_length={text}")
    if scale.frames is not None:
        out.append(f"model.options.num_frames={scale.frames}")
    return out


def job_overrides(scale: Scale, steps: int) -> list[str]:
    """What the suite changes in the job config: steps, one prompt, (tiny) micro-batches and, when
    asked, the training micro-batch and checkpointing."""
    out = [f"method.tree.steps={steps}", f"model.gradient_checkpointing={str(scale.checkpointing).lower()}",
           "data.prompts_per_process=1"]
    if scale.micro_batches:
        out += [f"method.engine.rollout_micro_batch={scale.micro_batches[0]}",
                f"method.engine.train_micro_batch={scale.micro_batches[1]}"]
    if scale.train_micro_batch:
        out.append(f"method.engine.train_micro_batch={scale.train_micro_batch}")
    return out


def _preset_job(job: Path) -> Path:
    """``job`` without its preset and method, except its micro-batches (``method.engine``): what
    another preset runs on that job's model (e.g. BranchGRPO's tree on the Flow-GRPO SD3.5 job,
    whose method section pins Flow-GRPO's flat group). Written once per process, next to nothing
    the user owns (a temporary folder)."""
    if job not in _PRESET_JOBS:
        import yaml

        from branchgrpo.config import read_yaml_file

        data = read_yaml_file(job)
        data.pop("preset", None)
        engine = (data.get("method") or {}).get("engine")
        data["method"] = {"engine": engine} if engine else {}
        folder = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
        path = folder / job.name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        _PRESET_JOBS[job] = path
    return _PRESET_JOBS[job]


_PRESET_JOBS: dict[Path, Path] = {}


def job_config(case: Case, scale: Scale, steps: int, plan: bool = False):
    """The job config a case runs: the model's job file with ``case.preset`` (as ``train --config ...
    --preset``; the file's own method for ``case.own_method``), the case's size, one prompt, LoRA at
    ``scale.lora_rank`` for the LoRA cases; ``plan``: as ``branchgrpo plan`` reads it for one process
    (DDP, the weights' dtype)."""
    from branchgrpo.train.config import load_train_config

    m = scale.suite_model
    path = m.job if case.own_method or m.method_fits_presets else _preset_job(m.job)
    overrides = [*size_options(scale, case.size), *job_overrides(scale, steps)]
    if case.training == "lora":
        overrides.append(f"model.lora.rank={scale.lora_rank}")
    if plan:
        dtype = "float32" if scale.weights_dtype == "float32" else "auto"
        overrides += ["run.parallel=ddp", f"model.dtype={dtype}"]
    return load_train_config(path, None if case.own_method else case.preset, overrides)


def method_for(case: Case, scale: Scale, steps: int):
    """The method a case runs (:func:`job_config`'s)."""
    return job_config(case, scale, steps).method


def make_policy(transformer, case: Case, scale: Scale, config, device, generator):
    """The family's velocity model around ``transformer`` at the case's size, one sample's latent
    shape and random prompt embeddings of the real shapes (negatives too under CFG)."""
    import torch

    family, options, c = scale.suite_model.family, config.model.options, scale.config
    height, width = case.size, scale.width(case.size)

    def randn(*shape):
        return torch.randn(1, *shape, generator=generator, device=device)

    if family == "flux":  # T5 [P, L, 4096] and CLIP pooled [P, 768] in the full model; 2×2-packed latents
        from branchgrpo.models.flux import FluxVelocity

        policy = FluxVelocity(transformer, height // 8, width // 8,
                              guidance_scale=float(options.get("embedded_guidance", 3.5)))
        shape = ((height // 16) * (width // 16), int(c["in_channels"]))
        return policy, shape, {"prompt_embeds": randn(scale.text_tokens, c["joint_attention_dim"]),
                               "pooled_prompt_embeds": randn(c["pooled_projection_dim"])}
    if family == "sd3":  # CLIP-L/G + T5 [P, 77 + L, 4096], pooled [P, 2048]; latents [16, H/8, W/8]
        from branchgrpo.models.sd3 import SD3Velocity as Velocity

        shape = (int(c["in_channels"]), height // 8, width // 8)
        cond = {"prompt_embeds": randn(scale.text_tokens, c["joint_attention_dim"]),
                "pooled_prompt_embeds": randn(c["pooled_projection_dim"])}
    else:  # wan: UMT5 [P, 512, 4096]; latents [16, (F − 1)/4 + 1, H/8, W/8]
        from branchgrpo.models.wan import WanVelocity as Velocity

        shape = (int(c["in_channels"]), (scale.frames - 1) // 4 + 1, height // 8, width // 8)
        cond = {"prompt_embeds": randn(scale.text_tokens, c["text_dim"])}
    policy = Velocity(transformer, guidance_scale=float(options["guidance_scale"]))
    if policy.uses_cfg:
        cond.update({f"negative_{k}": randn(*v.shape[1:]) for k, v in list(cond.items())})
    return policy, shape, cond


def _compiled_graphs() -> int:
    """Graphs torch.compile has produced so far in this process (0 before any compilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_case(case: Case, scale: Scale, steps: int, seed: int, check_flops: bool,
             compile_mode: str = "off", compile_backend: str = "inductor") -> dict[str, Any]:
    """One training iteration of ``case``, wired as ``Trainer.step`` (one prompt, one process).

    With ``compile_mode="blocks"`` the blocks compile in the warm-up, at the phases' micro-batch
    sizes; ``compiled_graphs_in_phases`` counts any graph compiled during the timed rollout and
    update anyway (a recompilation there would be timed as training)."""
    import torch

    from branchgrpo.families import PolicyBundle
    from branchgrpo.rewards.base import RewardOutput
    from branchgrpo.train.components import lora_spec, use_master_weights
    from branchgrpo.train.distributed import DistributedContext
    from branchgrpo.train.metrics import architecture_of, image_stream_tokens, iteration_metrics, phase_flops, row_flops
    from branchgrpo.train.trainer import RandomStream, iteration_generator
    from branchgrpo.tree.rollout import rollout
    from branchgrpo.tree.scoring import score_tree
    from branchgrpo.update import gather_training_edges, policy_update

    device = torch.device(scale.device)
    weights_dtype = getattr(torch, scale.weights_dtype)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = job_config(case, scale, steps)
    method = config.method
    clock = Clock(device)
    record: dict[str, Any] = {"case": case.name, "preset": case.preset, "resolution": case.size,
                              "training": case.training, "compile": compile_mode,
                              "checkpointing": scale.checkpointing, "model": scale.model}
    if scale.width(case.size) != case.size or scale.frames:
        record["video" if scale.frames else "image"] = {"height": case.size, "width": scale.width(case.size),
                                                        **({"frames": scale.frames} if scale.frames else {})}

    with clock.phase("build"):
        transformer = build_transformer(scale.config, device, weights_dtype, seed,
                                        scale.suite_model.transformer_class)
        g = torch.Generator(device=device).manual_seed(seed + 1)
        policy, shape, conditioning = make_policy(transformer, case, scale, config, device, g)
        policy = policy.to(device)
        bundle = PolicyBundle(family=config.model.family, policy=policy, trainable=transformer, latent_shape=shape,
                              encode_prompts=lambda prompts: {}, decode=lambda x: x)
        prepare_training(transformer, case, scale, lora_spec(config, bundle) if case.training == "lora" else None)
        if compile_mode == "blocks":  # model.compile=blocks: compiled during the warm-up, not the phases
            from branchgrpo.models.speed import compile_blocks

            compile_blocks(transformer, backend=compile_backend)
            record["compile_backend"] = compile_backend
        use_master_weights(bundle, compute)  # trained tensors in float32, forward under bf16 autocast on CUDA
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=method.update.learning_rate,
                                      weight_decay=method.update.weight_decay)
        reference = None
        if method.update.kl_coef > 0:  # the KL term's reference: the same weights with the adapter off
            from branchgrpo.models.lora import ReferenceVelocity

            reference = ReferenceVelocity(policy)
    record["micro_batches"] = {"rollout": method.engine.rollout_micro_batch, "train": method.engine.train_micro_batch}
    record["parameters"] = sum(p.numel() for p in transformer.parameters())
    record["trained_parameters"] = sum(p.numel() for p in params)
    record["rows_per_sample"] = 2 if getattr(policy, "uses_cfg", False) else 1  # true CFG: [negative; positive]
    record["kl_coef"] = method.update.kl_coef
    tokens = image_stream_tokens(architecture_of(transformer), torch.empty(1, *shape, device="meta"), {})
    row = row_flops(transformer, tokens, scale.text_tokens)

    def warm(rows: int, grad: bool) -> None:
        x = torch.randn(rows, *shape, generator=g, device=device)
        sigma = torch.full((rows,), 0.5, device=device)
        cond = {k: v.expand(rows, *v.shape[1:]) for k, v in conditioning.items()}
        if grad:
            policy.train()
            policy(x, sigma, cond).square().mean().backward()
            optimizer.zero_grad(set_to_none=True)
            policy.eval()
        else:  # as the rollout calls it: eval mode (a guard of its own under torch.compile)
            policy.eval()
            with torch.no_grad():
                policy(x, sigma, cond)

    with clock.phase("warmup"):  # kernels, cuBLAS handles and autotuning: one row without and with gradients
        warm(1, grad=False)
        warm(1, grad=True)
        if compile_mode == "blocks":
            # a second batch size makes torch.compile recompile with dynamic shapes; do it here, with
            # the phases' own micro-batch sizes, so no compilation is timed as rollout or update
            for rows, grad in ((method.engine.rollout_micro_batch, False), (method.engine.train_micro_batch, True)):
                if isinstance(rows, int) and rows > 1:
                    warm(rows, grad)

    counted: dict[str, int] = {}
    it = 0
    graphs = {"start": _compiled_graphs()}
    with clock.phase("rollout"), counted_flops(check_flops, counted, "rollout"):
        tree = rollout(
            policy, conditioning, method.tree, 1, shape,
            generator=[iteration_generator(seed, it, RandomStream.ROLLOUT, 0)], iteration=it,
            micro_batch=method.engine.rollout_micro_batch, device=device,
        )
    graphs["rollout"] = _compiled_graphs()
    with clock.phase("reward"):  # stand-in: the mean of each leaf's x̂0 latent, no VAE decode
        rewards = tree.leaf_x0.float().mean(dim=tuple(range(1, tree.leaf_x0.ndim)))
        scored = RewardOutput(total=rewards.cpu(), components={"latent_mean": rewards.cpu()})
    with clock.phase("update"), counted_flops(check_flops, counted, "update"):
        scores = score_tree(tree, scored.total.to(torch.float64), method,
                            generator=[iteration_generator(seed, it, RandomStream.SELECTION, 0)])
        edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
        policy.train()
        stats = policy_update(policy, optimizer, edges, conditioning, method, reference_model=reference,
                              generator=iteration_generator(seed, it, RandomStream.UPDATE, 0))
        policy.eval()
    graphs["update"] = _compiled_graphs()
    record["compiled_graphs_in_phases"] = {"rollout": graphs["rollout"] - graphs["start"],  # the reward calls
                                           "update": graphs["update"] - graphs["rollout"]}  # no model

    times = {"rollout": clock.seconds["rollout"], "reward": clock.seconds["reward"], "train": clock.seconds["update"]}
    metrics = iteration_metrics(scored, tree, scores, edges, stats, times, method, DistributedContext(),
                                lr=method.update.learning_rate, device=device, reward_name="latent_mean",
                                policy=policy, conditioning=conditioning)
    model_flops = phase_flops(policy, conditioning, tree, stats, method)
    flops = {"rollout": model_flops["rollout"], "update": model_flops["train"],
             "update_recompute": stats.training_forwards * record["rows_per_sample"] * row.recompute}
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
    """Seconds the case's rollout and update should take at ``rate`` FLOP/s (recomputation and the
    KL term's reference forwards included), from ``branchgrpo plan``'s counts and the architecture;
    None without a rate."""
    if not rate:
        return None
    from branchgrpo.models.lora import DEFAULT_TARGET_MODULES
    from branchgrpo.resources import Training
    from branchgrpo.resources.families import plan_family
    from branchgrpo.train.metrics import PartialTraining, architecture_row_flops
    from branchgrpo.tree.nfe import plan

    config = job_config(case, scale, steps)
    entry = plan_family(config.model.family, config.model.options)
    arch = entry.architecture(scale.config)
    if case.training == "lora":
        lora = config.model.lora
        targets = (lora.target_modules if lora.target_modules is not None
                   else entry.lora_targets(arch) if entry.lora_targets else DEFAULT_TARGET_MODULES)
        train = Training(scale.lora_rank, targets if isinstance(targets, str) else tuple(targets))
    else:
        train = PartialTraining(weights=frozenset(x.name for x in arch.linears() if x.name.startswith(
            tuple(prefix + "." for prefix in scale.blocks))))
    row = architecture_row_flops(arch, entry.tokens(arch, config.model.options), train, scale.checkpointing)
    rows = entry.rows_per_sample(config.model.options)
    counts = plan(config.method).counts
    reference = row.reference if config.method.update.kl_coef > 0 else 0
    return rows * (counts.rollout_calls * row.forward
                   + counts.training_forwards * (row.forward + row.backward + row.recompute + reference)) / rate
