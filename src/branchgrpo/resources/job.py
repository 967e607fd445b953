"""The job: per-process memory by phase, FLOPs per iteration and whether it fits (``branchgrpo plan``)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from branchgrpo.resources.core import (
    Tokens, Training, autocast_weight_copies, backward_flops, forward_flops, lora_parameter_count, parameter_count,
)
from branchgrpo.resources.families import PLAN_FAMILIES, plan_family

HUB_CONFIGS: dict[str, dict[str, Any]] = {  # the hub's transformer/config.json, used when model.path has none
    f.hub_name: f.hub_config for family in PLAN_FAMILIES.values()
    for f in (family, *(family.variants or {}).values()) if f.hub_name and f.hub_config}
EMBEDDED_CONFIGS = {world: Path(__file__).parent.parent / "assets" / world / "transformer" / "config.json"
                    for world in ("digits", "shapes")}


def transformer_config(family: str, model_path: str | None,
                       options: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """The transformer's architecture config and where it came from.

    Reads ``model_path/transformer/config.json`` when that file exists (``digits``: the shipped
    config), else the family's entry of :data:`HUB_CONFIGS`.
    """
    if family in EMBEDDED_CONFIGS:  # the built-in worlds ship their transformer
        path = EMBEDDED_CONFIGS[family]
        return json.loads(path.read_text()), str(path)
    if model_path is not None:
        local = Path(model_path) / "transformer" / "config.json"
        if local.is_file():
            return json.loads(local.read_text()), str(local)
    entry = plan_family(family, options)
    if entry.hub_config is None:
        raise ValueError(f"no architecture config for model.family={family}: put the model's diffusers folder "
                         f"at model.path (transformer/config.json); built-in configs: {', '.join(HUB_CONFIGS)}")
    return dict(entry.hub_config), f"built-in {entry.hub_name} (model.path has no transformer/config.json)"


def parse_memory(text: str) -> int:
    """``80GB``, ``80G``, ``80GiB``, ``81920MiB``, ``85899345920`` → bytes: GB and G are 10⁹
    bytes, GiB is 2³⁰ (nvidia-smi reports MiB)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--gpu-memory: expected a size such as 80GB, 80GiB or 81920MiB, got {text!r}")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


@dataclass
class MemoryRow:
    """Bytes one process holds for one purpose, on the GPU and in host memory."""

    name: str
    device: int
    host: int = 0


@dataclass
class JobEstimate:
    """Per-process resources of one training iteration (see :func:`estimate_job`)."""

    family: str
    source: str
    processes: int
    parallel: str
    cpu_offload: bool
    lora_rank: int | None
    checkpointing: bool
    compute_dtype: str
    parameters: int
    trained_parameters: int
    tokens: Tokens
    prompts_per_process: int
    forwards: dict[str, int]  # rollout, training, reference: transformer rows per iteration per process
    micro_batches: dict[str, int]
    persistent: list[MemoryRow]
    phases: dict[str, list[MemoryRow]]  # what each phase adds on top of ``persistent``
    activations: dict[str, int]  # saved for backward per training micro-batch, with and without checkpointing
    flops: dict[str, int]  # per iteration per process
    gpu_memory: int | None = None
    notes: list[str] = field(default_factory=list)

    def phase_peak(self, phase: str) -> int:
        return sum(r.device for r in self.persistent) + sum(r.device for r in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_peak)

    @property
    def peak(self) -> int:
        return self.phase_peak(self.peak_phase)

    @property
    def host(self) -> int:
        """Host memory per process at its peak phase (CPU offload)."""
        return max(sum(r.host for r in self.persistent + rows) for rows in self.phases.values())

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.peak <= self.gpu_memory

    def to_json(self) -> dict[str, Any]:
        def rows(items: list[MemoryRow]) -> list[dict[str, Any]]:
            return [{"name": r.name, "device_bytes": r.device, "host_bytes": r.host} for r in items]

        return {
            "family": self.family, "architecture_source": self.source, "processes": self.processes,
            "parallel": self.parallel, "cpu_offload": self.cpu_offload, "lora_rank": self.lora_rank,
            "gradient_checkpointing": self.checkpointing, "compute_dtype": self.compute_dtype,
            "parameters": self.parameters, "trained_parameters": self.trained_parameters,
            "tokens": {"image": self.tokens.image, "text": self.tokens.text},
            "prompts_per_process": self.prompts_per_process, "forwards": self.forwards,
            "micro_batches": self.micro_batches, "persistent": rows(self.persistent),
            "phases": {k: rows(v) for k, v in self.phases.items()},
            "phase_peak_bytes": {k: self.phase_peak(k) for k in self.phases},
            "peak_bytes": self.peak, "peak_phase": self.peak_phase, "host_bytes": self.host,
            "activation_bytes": self.activations, "flops": self.flops,
            "gpu_memory_bytes": self.gpu_memory, "fits": self.fits, "notes": self.notes,
        }


def estimate_job(config: Any, arch_config: Mapping[str, Any], processes: int = 1, gpu_memory: int | None = None,
                 source: str = "", iteration: int = 0) -> JobEstimate:
    """Per-process memory by phase and FLOPs per iteration of ``config`` (a ``TrainConfig``) on
    ``processes`` GPUs, for the transformer described by ``arch_config``.

    Assumes CUDA (``model.dtype=auto`` is bf16 autocast there). Each phase adds its working set to
    the persistent state: rollout (no-grad forwards), update (training forwards and backward) and
    the optimizer step. Not counted: the VAE, the reward model and text encoders, decoded images,
    the CUDA context and allocator fragmentation.
    """
    from branchgrpo.models.lora import DEFAULT_TARGET_MODULES
    from branchgrpo.tree.nfe import plan

    if processes < 1:
        raise ValueError(f"--processes: must be >= 1, got {processes}")
    model, method, run = config.model, config.method, config.run
    entry = plan_family(model.family, model.options)
    arch = entry.architecture(dict(arch_config))
    cb = 4 if model.dtype == "float32" else 2
    dtype = "float32" if cb == 4 else "bfloat16"
    lora = model.lora
    default_targets = entry.lora_targets(arch) if entry.lora_targets else DEFAULT_TARGET_MODULES
    targets = tuple(lora.target_modules or default_targets) if lora else ()
    train = Training(lora.rank if lora else None, targets, compute_bytes=cb, cuda=True)
    fsdp, offload = run.parallel == "fsdp", run.cpu_offload
    shards = processes if fsdp else 1
    options = dict(model.options or {})
    tokens = entry.tokens(arch, options)
    n_all = parameter_count(arch)
    n_train = n_all if train.full else lora_parameter_count(arch, train)

    # -- work per iteration and process (docs/method.md §10) --------------------------------
    counts = plan(method, iteration=iteration).counts
    notes = []
    prompts = getattr(config.data, "prompts_per_process", 0)  # > 0: set per process
    if not prompts:
        global_prompts = config.data.prompts_per_iteration
        prompts = math.ceil(global_prompts / processes)
        if global_prompts % processes:
            notes.append(f"data.prompts_per_iteration={global_prompts} does not divide among {processes} processes "
                         f"(training refuses it); counted as {prompts} per process")
    forwards = {"rollout": counts.rollout_calls * prompts, "training": counts.training_forwards * prompts,
                "reference": counts.training_forwards * prompts if method.update.kl_coef > 0 else 0}
    rollout_mb, train_mb = method.engine.rollout_micro_batch, method.engine.train_micro_batch
    for field_name, value in (("rollout_micro_batch", rollout_mb), ("train_micro_batch", train_mb)):
        if value == "auto":
            notes.append(f"engine.{field_name}=auto is chosen at startup from free GPU memory; counted here as 1")
    rollout_mb = 1 if rollout_mb == "auto" else rollout_mb
    train_mb = 1 if train_mb == "auto" else train_mb
    cfg = entry.rows_per_sample(options)  # true CFG: the negative prompt's row beside every sample's
    if cfg > 1:
        forwards = {k: v * cfg for k, v in forwards.items()}
        notes.append(f"true classifier-free guidance: {cfg} transformer rows per sample in every call")
    rollout_rows, train_rows = rollout_mb * cfg, train_mb * cfg
    cfg_rows = f" × {cfg} CFG rows" if cfg > 1 else ""

    # -- persistent: weights and optimizer state (1/N each under FSDP; on the host with offload) -
    def place(name: str, total: int) -> MemoryRow:
        share = total // shards
        return MemoryRow(name, 0, share) if offload else MemoryRow(name, share)

    persistent = [place(f"frozen weights ({dtype})", 0 if train.full else n_all * cb),
                  place("trained weights (fp32 masters)", n_train * 4),
                  place("AdamW moments (2 × fp32)", n_train * 8)]
    if run.ema_decay > 0:
        persistent.append(place("EMA of the trained weights (fp32)", n_train * 4))
    gradients = place("gradients (fp32)", n_train * 4)

    # -- working sets ---------------------------------------------------------------------
    trace = arch.saved(tokens, train, model.gradient_checkpointing)
    no_casts = lambda t: t.bytes(train_rows, train) - t.casts * cb  # noqa: E731  (casts: their own row)
    plain, checkpointed = arch.saved(tokens, train, False), arch.saved(tokens, train, True)
    activations = {"saved_no_checkpointing": no_casts(plain),
                   "saved_checkpointing": no_casts(checkpointed) + checkpointed.recompute.bytes(train_rows, train)}
    shared = []
    if fsdp:  # FSDP2: the current block all-gathered in the compute dtype, the next prefetched, the root kept
        blocks = [sum(x.parameters for x in b) for b in arch.block_linears()]
        shared.append(MemoryRow("FSDP all-gathered blocks (2) + root", (2 * max(blocks) + n_all - sum(blocks)) * cb))
    elif train.low_precision:  # autocast caches a cast of every float32 trained weight for the forward
        shared.append(MemoryRow(f"autocast {dtype} casts of fp32 weights", autocast_weight_copies(arch, train) * cb))
    tree = MemoryRow(f"tree latents (fp32, {counts.nodes + counts.leaves} per prompt)",
                     (counts.nodes + counts.leaves) * entry.latent_elements(arch, options) * 4 * prompts)
    update = [gradients] + shared + [
        tree, MemoryRow(f"saved activations (micro-batch {train_mb}{cfg_rows})", no_casts(trace))]
    if trace.recompute is not None:
        update.append(MemoryRow("block recomputed by checkpointing", trace.recompute.bytes(train_rows, train)))
    update.append(MemoryRow("backward gradient buffers", arch.gradient_buffer(tokens) * cb * train_rows))
    if fsdp:  # one block's unsharded gradients, compute dtype then fp32 for the reduce-scatter
        trained = [sum(x.parameters if train.full else train.rank * (x.in_features + x.out_features)
                       for x in b if train.trains(x.name)) for b in arch.block_linears()]
        update.append(MemoryRow("FSDP unsharded block gradients", max(trained) * (cb + 4)))
    step = [gradients, place("AdamW step temporaries (fp32)", n_train * 4)]  # with offload, the step runs on the CPU
    if processes > 1 and not fsdp:
        step.append(MemoryRow("all-reduce buffer (fp32 gradients)", n_train * 4))
    rollout = shared + [tree, MemoryRow(f"forward working set (micro-batch {rollout_mb}{cfg_rows}, no grad)",
                                        arch.inference_peak(tokens).bytes(rollout_rows, train))]
    phases = {"rollout": rollout, "update": update, "optimizer step": step}

    # -- FLOPs per iteration per process --------------------------------------------------
    forward = forward_flops(trace, arch.dim, train.rank)
    backward = backward_flops(trace, arch.dim, train.rank)
    flops = {"rollout": forwards["rollout"] * forward, "update": forwards["training"] * (forward + backward),
             "recompute": forwards["training"] * forward if model.gradient_checkpointing else 0,
             "reference": forwards["reference"] * forward_flops(arch.saved(tokens, Training(), False), arch.dim),
             "forward_per_row": forward, "backward_per_row": backward}
    return JobEstimate(
        family=model.family, source=source, processes=processes, parallel=run.parallel, cpu_offload=offload,
        lora_rank=train.lora_rank, checkpointing=model.gradient_checkpointing, compute_dtype=dtype,
        parameters=n_all, trained_parameters=n_train, tokens=tokens, prompts_per_process=prompts, forwards=forwards,
        micro_batches={"rollout": rollout_mb, "training": train_mb}, persistent=persistent, phases=phases,
        activations=activations, flops=flops, gpu_memory=gpu_memory, notes=notes,
    )


def _count(value: float, units: tuple[str, ...] = ("", " k", " M", " B", " T")) -> str:
    """``11901408320`` → ``11.90 B`` (FLOPs: pass SI prefixes)."""
    power = min(max(int(math.log10(max(value, 1)) // 3), 0), len(units) - 1)
    return f"{value / 1000 ** power:.2f}{units[power]}"


def format_estimate(e: JobEstimate) -> str:
    """The estimate as a table: memory per process by phase (GiB), FLOPs per iteration, fit."""
    def row(name: str, device: float, host: float | None = None, indent: int = 2) -> str:
        cells = f"{device / 2 ** 30:9.2f}" + ("" if host is None else f"{host / 2 ** 30:9.2f}")
        return f"{' ' * indent}{name:<{62 - indent}}{cells}"

    def flop(value: float) -> str:
        return _count(value, ("", " k", " M", " G", " T", " P", " E")) + "FLOP"

    trained = "all trained"
    if e.lora_rank is not None:
        trained = f"LoRA rank {e.lora_rank}: {_count(e.trained_parameters)} trained"
    shards = ""
    if e.parallel == "fsdp":
        shards = f" (1/{e.processes} shards{', offloaded to host' if e.cpu_offload else ''})"
    reference = f", {e.forwards['reference']} reference forwards" if e.forwards["reference"] else ""
    lines = [
        f"resources per process: {e.family} transformer, {_count(e.parameters)} parameters, {trained}",
        f"  architecture: {e.source}",
        f"  {e.processes} process{'es' if e.processes > 1 else ''}, run.parallel={e.parallel}{shards}, "
        f"{e.compute_dtype} compute on CUDA, gradient checkpointing {'on' if e.checkpointing else 'off'}",
        f"  tokens per row: {e.tokens.image} image + {e.tokens.text} text; micro-batches: "
        f"rollout {e.micro_batches['rollout']}, training {e.micro_batches['training']}",
        f"  per iteration: {e.prompts_per_process} prompt(s), {e.forwards['rollout']} rollout rows, "
        f"{e.forwards['training']} training forwards{reference}",
        "",
        f"  {'memory (GiB)':<60}{'GPU':>9}{'host':>9}",
    ]
    lines += [row(r.name, r.device, r.host) for r in e.persistent if r.device or r.host]
    for phase, rows in e.phases.items():
        lines.append(f"  + during {phase}:")
        lines += [row(r.name, r.device, r.host, indent=4) for r in rows if r.device or r.host]
    peaks = ", ".join(f"{p} {e.phase_peak(p) / 2 ** 30:.2f}" for p in e.phases)
    lines += ["", f"  peak per process: {e.peak / 2 ** 30:.2f} GiB in {e.peak_phase} ({peaks})"]
    if e.host:
        lines.append(f"  host memory per process (offloaded state): {e.host / 2 ** 30:.2f} GiB")
    if e.gpu_memory is not None:
        margin = (e.gpu_memory - e.peak) / 2 ** 30
        verdict = f"fits, {margin:.2f} GiB to spare" if e.fits else f"does NOT fit: {-margin:.2f} GiB short"
        lines.append(f"  GPU memory {e.gpu_memory / 2 ** 30:.2f} GiB: {verdict}")
    act = e.activations
    lines += [f"  activations per training micro-batch: {act['saved_no_checkpointing'] / 2 ** 30:.2f} GiB without "
              f"checkpointing, {act['saved_checkpointing'] / 2 ** 30:.2f} GiB with (incl. the recomputed block)",
              "  not counted: VAE, reward model, text encoders, decoded images, CUDA context, fragmentation", ""]
    f = e.flops
    phases = [(f"rollout: rows × {flop(f['forward_per_row'])} forward", f["rollout"]),
              (f"update: forwards × (forward + {flop(f['backward_per_row'])} backward)", f["update"]),
              ("recompute (checkpointing)", f["recompute"]), ("KL reference forwards", f["reference"])]
    phases = [(name, value) for name, value in phases if value]
    total = sum(value for _, value in phases)
    lines.append(f"  FLOPs per iteration per process: {flop(total)}")
    lines += [f"    {name:<56}{flop(value):>15}" for name, value in phases]
    lines += [f"  note: {n}" for n in e.notes]
    return "\n".join(lines)
