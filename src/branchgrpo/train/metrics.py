"""One iteration's metrics row, assembled from what the iteration produced (kept out of the loop)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from branchgrpo.resources import FluxArchitecture, Tokens, Training, backward_flops, forward_flops
from branchgrpo.rewards.base import RewardOutput
from branchgrpo.train.logging import peak_memory_gb

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets, by a
# fragment of torch.cuda.get_device_name(); the first match wins (PCIe/NVL before the SXM name).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H200 NVL", 835.0), ("H200", 989.0), ("A100", 312.0), ("B200", 2250.0), ("L40S", 362.0),
)


def iteration_metrics(scored: RewardOutput, tree, scores, edges, stats, times: dict[str, float], method,
                      dist, *, lr: float, device: torch.device, reward_name: str | None = None,
                      policy: torch.nn.Module | None = None, conditioning: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Rewards (gathered over processes), advantages, update statistics, NFE counts, phase times.

    Reward components are logged when the reward has parts of its own (a weighted list), as
    ``reward/<component>_{mean,std,min,max}``. Given the ``policy`` and its ``conditioning``, and
    when its architecture's FLOPs are known (:func:`phase_flops`), each process's
    ``throughput/{rollout,train}_tflops`` and, on a GPU of known peak, ``..._mfu`` (averaged over
    processes, like every local metric).
    """
    all_rewards = dist.gather(scored.total.float())
    metrics: dict[str, Any] = {
        "reward_mean": float(all_rewards.mean()),
        "reward_std": float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0,
        "reward_min": float(all_rewards.min()),
        "reward_max": float(all_rewards.max()),
    }
    advantages = torch.cat([a for a in scores.edge_advantage[1:]])
    trained_adv = edges.advantage.float()
    local = {
        "advantage_abs_mean": float(advantages.abs().mean()),
        "advantage_trained_mean": float(trained_adv.mean()) if trained_adv.numel() else 0.0,
        "advantage_trained_std": float(trained_adv.std()) if trained_adv.numel() > 1 else 0.0,
        "advantage_trained_absmax": float(trained_adv.abs().max()) if trained_adv.numel() else 0.0,
        "advantage_clipped_fraction": float((advantages.abs() >= method.advantage.advantage_clip).float().mean()),
        "fusion_entropy_ratio": scores.fused.root_entropy_ratio(),
        "loss": stats.loss,
        "ratio_mean": stats.ratio_mean,
        "ratio_max_deviation_first_step": stats.ratio_max_deviation_first_step,
        "clip_fraction": stats.clip_fraction,
        "kl": stats.kl,
        "grad_norm": stats.grad_norms[-1] if stats.grad_norms else 0.0,
        "optimizer_steps": stats.optimizer_steps,
        "skipped_steps": stats.skipped_steps,
        "lr": lr,
        "nonfinite_micro_batches": stats.nonfinite_micro_batches,
        **{f"nfe/{k}": v for k, v in asdict(scores.nfe).items()},
        "nfe/rollout_calls_measured": tree.rollout_calls,
        **{f"time/{k}": v for k, v in times.items()},
        "time/iteration": sum(times.values()),
        "memory/peak_gb": peak_memory_gb(device),
    }
    flops = phase_flops(policy, conditioning, tree, stats, method) if policy is not None else None
    if flops is not None:
        local.update(throughput_metrics(flops, times, device, getattr(policy, "compute_dtype", None)))
    if set(scored.components) != {reward_name}:
        for name, values in scored.components.items():
            everything = dist.gather(values.float())
            metrics.update({f"reward/{name}_mean": float(everything.mean()), f"reward/{name}_std": float(everything.std()),
                            f"reward/{name}_min": float(everything.min()), f"reward/{name}_max": float(everything.max())})
    metrics.update(dist.mean(local))
    return metrics


# -- throughput: FLOPs from the architecture, per phase -------------------------------------------
def peak_tflops(device: torch.device | str) -> float | None:
    """The dense bf16 peak of a CUDA ``device`` (:data:`PEAK_BF16_TFLOPS`); None for a CPU or an
    unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS if fragment in name), None)


@dataclass(frozen=True)
class PartialTraining(Training):
    """Training of some linears' full weights (``weights``: a few blocks), plus LoRA adapters if any."""

    weights: frozenset[str] = frozenset()

    def trains(self, name: str) -> bool:
        return name in self.weights or self.lora(name)


def module_training(transformer: torch.nn.Module, arch: FluxArchitecture) -> Training:
    """What is trained in ``transformer``, read off ``requires_grad``: peft LoRA adapters
    (``….lora_A.<adapter>.weight``), every linear (a full fine-tune) or some linears' weights."""
    names = {x.name for x in arch.linears()}
    lora, weights, rank = set(), set(), None
    for name, param in transformer.named_parameters():
        if not param.requires_grad:
            continue
        if ".lora_A." in name:
            lora.add(name.split(".lora_A.")[0])
            rank = int(param.shape[0])
        elif (module := name.rsplit(".", 1)[0].replace(".base_layer", "")) in names:
            weights.add(module)
    if weights == names and not lora:
        return Training()
    if not weights:
        return Training(rank, tuple(sorted(lora)))
    return PartialTraining(rank, tuple(sorted(lora)), weights=frozenset(weights))


@dataclass(frozen=True)
class RowFlops:
    """FLOPs of one transformer row (one sample's forward): ``forward`` (adapters included),
    ``backward`` (the gradients that are computed), ``recompute`` (the blocks' forward again, under
    gradient checkpointing; not model work) and ``reference`` (a forward with adapters disabled)."""

    forward: int
    backward: int
    recompute: int
    reference: int


def architecture_of(transformer: torch.nn.Module):
    """The :mod:`branchgrpo.resources` architecture of a diffusers transformer, from its config:
    FLUX.1 (also Kontext and the digits/shapes worlds), Qwen-Image(-Edit), Wan 2.1/2.2 text-to-video,
    SD3/SD3.5, FLUX.2, Z-Image (text-to-image), HunyuanVideo 1.5 (text-to-video); None otherwise.
    A wrapper that holds the model as ``.transformer`` (HunyuanVideo 1.5's ``TextToVideoInputs``)
    is read through."""
    transformer = _unwrapped(transformer)
    names = {cls.__name__ for cls in type(transformer).__mro__}
    config = dict(getattr(transformer, "config", {}) or {})
    try:
        if "FluxTransformer2DModel" in names:
            return FluxArchitecture(config)
        if "QwenImageTransformer2DModel" in names:
            from branchgrpo.resources.qwenimage import QwenImageArchitecture

            return QwenImageArchitecture(config)
        if "WanTransformer3DModel" in names:
            from branchgrpo.resources.wan import WanArchitecture

            return WanArchitecture(config)
        if "SD3Transformer2DModel" in names:
            from branchgrpo.resources.sd3 import SD3Architecture

            return SD3Architecture(config)
        if "Flux2Transformer2DModel" in names:
            from branchgrpo.resources import flux2

            return flux2.Flux2Architecture(config)
        if "ZImageTransformer2DModel" in names:
            from branchgrpo.resources.zimage import ZImageArchitecture

            return ZImageArchitecture(config)
        if "HunyuanVideo15Transformer3DModel" in names:
            from branchgrpo.resources.hunyuanvideo15 import HunyuanVideo15Architecture

            return HunyuanVideo15Architecture(config)
    except (ImportError, AttributeError, ValueError):  # a variant the walk does not cover (e.g. Wan I2V)
        return None
    return None


def _unwrapped(transformer: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model inside an input wrapper (a module whose ``.transformer`` is the model)."""
    inner = getattr(transformer, "transformer", None)
    return inner if isinstance(inner, torch.nn.Module) else transformer


def row_flops(transformer: torch.nn.Module, image_tokens: int, text_tokens: int) -> RowFlops | None:
    """:class:`RowFlops` of one row of a diffusers transformer with ``image_tokens`` (everything in
    the image stream: generated and source tokens) and ``text_tokens``; None for architectures
    :func:`architecture_of` does not know."""
    arch = architecture_of(transformer)
    return None if arch is None else _row_counter(transformer, arch)(Tokens(image_tokens, text_tokens))


def _row_counter(transformer: torch.nn.Module, arch: Any):
    """``tokens -> RowFlops`` for ``transformer`` (read through an input wrapper), with what it
    trains (``requires_grad``) and whether it checkpoints read once; equal tokens are counted once."""
    model = _unwrapped(transformer)
    train = module_training(model, arch)
    checkpointing = bool(getattr(model, "gradient_checkpointing", False))
    counted: dict[Tokens, RowFlops] = {}

    def row(tokens: Tokens) -> RowFlops:
        if tokens not in counted:
            counted[tokens] = architecture_row_flops(arch, tokens, train, checkpointing)
        return counted[tokens]

    return row


def architecture_row_flops(arch: Any, tokens: Tokens, train: Training, checkpointing: bool) -> RowFlops:
    """:class:`RowFlops` of one row of ``arch`` with ``tokens`` when ``train`` is trained; the
    recomputation under checkpointing is every block's forward (linears and attention)."""
    trace = arch.saved(tokens, train, checkpointing)
    forward = forward_flops(trace, arch.dim, train.rank)
    in_block = {x.name for block in arch.block_linears() for x in block}
    blocks = [u for u in trace.uses if u.linear.name in in_block]
    in_blocks = (sum(2 * u.rows * u.linear.in_features * u.linear.out_features
                     + (2 * u.rows * train.rank * (u.linear.in_features + u.linear.out_features) if u.lora else 0)
                     for u in blocks) + sum(4 * rows * rows * arch.dim for rows, _ in trace.attention)
                 + sum(4 * q * kv * arch.dim for q, kv, *_ in trace.cross_attention))
    return RowFlops(forward, backward_flops(trace, arch.dim, train.rank), in_blocks if checkpointing else 0,
                    forward_flops(trace, arch.dim, 0))


def image_stream_tokens(arch: Any, latents: torch.Tensor, conditioning: Mapping[str, Any]) -> int:
    """Tokens of the image stream of one row: the packed latent's ``[B, L, C]`` length (a video
    latent ``[B, C, F, H, W]`` in patches) plus an editing source's ``image_latents`` tokens."""
    if latents.dim() == 5:  # video [B, C, F, H, W], 3-D patches
        pt, ph, pw = arch.patch
        f, h, w = latents.shape[-3:]
        tokens = (f // pt) * (h // ph) * (w // pw)
    elif latents.dim() == 4:  # image [B, C, H, W] (SD3), square patches
        h, w = latents.shape[-2:]
        tokens = (h // arch.patch) * (w // arch.patch)
    else:
        tokens = int(latents.shape[1])
    source = conditioning.get("image_latents")
    return tokens + (int(source.shape[1]) if isinstance(source, torch.Tensor) and source.dim() == 3 else 0)


def _summed(rows: list[RowFlops]) -> RowFlops:
    return RowFlops(*(sum(getattr(r, f) for r in rows) for f in ("forward", "backward", "recompute", "reference")))


def sample_flops(policy: torch.nn.Module, arch: Any, latents: torch.Tensor,
                 conditioning: Mapping[str, Any]) -> RowFlops:
    """FLOPs of one sample's transformer call (all its rows: two under true CFG), averaged over the
    prompts of ``conditioning``.

    Most families give every row the same tokens: the image stream read off the latents
    (:func:`image_stream_tokens`) and the padded text length. Two read more:

    - **Z-Image** passes each caption at its own length (``prompt_mask``) and the transformer pads
      image and caption to multiples of 32 per row, so a prompt's row costs what its own padded
      length costs, and its negative row under CFG what the negative caption's does. Rows batched
      with longer captions are padded further to the batch's longest; that padding is not counted
      (model FLOPs, not work done on padding). Guidance switched off by ``cfg_truncation`` on some
      steps is counted as on.
    - **HunyuanVideo 1.5**: the context is the Qwen2.5-VL tokens, the ByT5 glyph tokens and the
      (all-zero, masked) image-embedding tokens, each at its padded length.
    """
    name = type(arch).__name__
    cfg = 2 if bool(getattr(policy, "uses_cfg", False)) else 1
    transformer = policy.transformer
    row_of = _row_counter(transformer, arch)
    if name == "ZImageArchitecture":
        from branchgrpo.resources.zimage import padded

        h, w = latents.shape[-2:]
        image = padded((h // arch.patch) * (w // arch.patch))
        keys = [("prompt_embeds", "prompt_mask")] + ([("negative_prompt_embeds", "negative_prompt_mask")]
                                                     if cfg == 2 else [])
        per_prompt = []
        for i in range(int(conditioning["prompt_embeds"].shape[0])):
            rows = []
            for embeds, mask in keys:
                length = (int(conditioning[mask][i].bool().sum()) if mask in conditioning
                          else int(conditioning[embeds].shape[1]))
                rows.append(row_of(Tokens(image, padded(length))))
            per_prompt.append(_summed(rows))
        total = _summed(per_prompt)
        n = len(per_prompt)
        return RowFlops(total.forward // n, total.backward // n, total.recompute // n, total.reference // n)
    if name == "HunyuanVideo15Architecture":
        from branchgrpo.resources.hunyuanvideo15 import HunyuanTokens

        video = image_stream_tokens(arch, latents, {})
        glyph = int(conditioning["prompt_embeds_2"].shape[1]) if "prompt_embeds_2" in conditioning else 0
        vision = int(getattr(transformer, "vision_tokens", 0))
        mllm = int(conditioning["prompt_embeds"].shape[1])
        row = row_of(HunyuanTokens(video, mllm + glyph + vision, glyph=glyph, vision=vision))
    else:
        row = row_of(Tokens(image_stream_tokens(arch, latents, conditioning), int(conditioning["prompt_embeds"].shape[1])))
    return _summed([row] * cfg)


def phase_flops(policy: torch.nn.Module, conditioning: Mapping[str, Any] | None, tree, stats,
                method) -> dict[str, int] | None:
    """Model FLOPs of one process's iteration by phase: ``rollout`` (rollout rows × forward) and
    ``train`` (training forwards × (forward + backward), + reference forwards with the KL term),
    with one sample's rows as :func:`sample_flops` counts them (two under true classifier-free
    guidance, ``policy.uses_cfg``); gradient checkpointing's recomputation is not counted. None when the policy's architecture
    is not known (:func:`architecture_of`) or there are no ``prompt_embeds``."""
    transformer = getattr(policy, "transformer", None)
    if transformer is None or conditioning is None or "prompt_embeds" not in conditioning:
        return None
    arch = architecture_of(transformer)
    if arch is None:
        return None
    sample = sample_flops(policy, arch, tree.latents[0], conditioning)
    train = stats.training_forwards * (sample.forward + sample.backward)
    if method.update.kl_coef > 0:
        train += stats.training_forwards * sample.reference
    return {"rollout": tree.rollout_calls * sample.forward, "train": train}


def throughput_metrics(flops: Mapping[str, float], times: Mapping[str, float], device: torch.device,
                       compute_dtype: torch.dtype | None = None) -> dict[str, float]:
    """``throughput/<phase>_tflops`` = FLOPs / seconds / 10¹² for each phase with a time, and
    ``throughput/<phase>_mfu`` = that / the device's bf16 peak when the compute dtype is bf16 or
    fp16 on a GPU of known peak (:func:`peak_tflops`)."""
    peak = peak_tflops(device) if compute_dtype in (torch.bfloat16, torch.float16) else None
    out = {}
    for phase, value in flops.items():
        seconds = times.get(phase, 0.0)
        if seconds > 0:
            out[f"throughput/{phase}_tflops"] = value / seconds / 1e12
            if peak:
                out[f"throughput/{phase}_mfu"] = value / seconds / 1e12 / peak
    return out
