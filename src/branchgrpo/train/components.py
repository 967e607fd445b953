"""Build the trainer's parts from config: the generator bundle, the reward, the prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from branchgrpo.config import ConfigError
from branchgrpo.train.config import TrainConfig

RewardFn = Callable[[Tensor, list[str]], Tensor]


@dataclass
class Generator:
    """What the trainer needs of a model family (thin, so FLUX and the digits world look alike)."""

    family: str
    policy: torch.nn.Module  # VelocityModel; its trainable parameters are what GRPO updates
    trainable: torch.nn.Module  # the module whose state dict is saved (the transformer)
    latent_shape: tuple[int, ...]
    encode_prompts: Callable[[list[str]], dict[str, Tensor]]
    decode: Callable[[Tensor], Tensor]  # leaf x̂0 latents → [0, 1] images [B, C, H, W] (wan: videos [B, F, C, H, W])
    train_prompts: list[str]
    heldout_prompts: list[str]
    builtin_reward: RewardFn | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device", f"{name} was asked for but torch sees no CUDA device; use run.device=cpu")
    return device


def read_prompt_file(path: str, field: str) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments skipped."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(field, f"prompt file {file} does not exist")
    prompts = [line.strip() for line in file.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(field, f"prompt file {file} holds no prompts (one prompt per line)")
    return prompts


def build_generator(config: TrainConfig, device: torch.device) -> Generator:
    """The model family named by ``model.family`` on ``device``."""
    model = config.model
    if model.family == "digits":
        from branchgrpo.worlds.digits import DigitsWorld

        if model.path is not None and not Path(model.path).exists():
            raise ConfigError("model.path", f"generator weights {model.path} do not exist (a .safetensors file)")
        world = DigitsWorld.load(device=device, generator_weights=model.path)
        generator = Generator(
            family="digits",
            policy=world.policy,
            trainable=world.policy.transformer,
            latent_shape=tuple(world.latent_shape),
            encode_prompts=world.encode_prompts,
            decode=world.decode,
            train_prompts=list(world.train_prompts),
            heldout_prompts=list(world.heldout_prompts),
            builtin_reward=world.reward,
        )
    elif model.family == "flux":
        generator = _build_flux(config, device)
    elif model.family == "sd3":
        generator = _build_sd3(config, device)
    else:
        generator = _build_wan(config, device)
    if model.lora is not None:
        if model.family == "digits":
            raise ConfigError("model.lora", "the digits world trains all weights (it is tiny); LoRA is for flux, sd3 and wan")
        from branchgrpo.models.lora import LoraSpec, LoraWeights, add_lora, default_target_modules

        spec_kwargs = {"rank": model.lora.rank, "alpha": model.lora.alpha, "dropout": model.lora.dropout,
                       "init": model.lora.init}
        spec_kwargs["target_modules"] = (model.lora.target_modules if model.lora.target_modules is not None
                                         else default_target_modules(generator.trainable))  # Wan: attn1/attn2 names
        add_lora(generator.trainable, LoraSpec(**spec_kwargs))
        generator.trainable = LoraWeights(generator.trainable)
    if config.data.train_prompts is not None:
        generator.train_prompts = read_prompt_file(config.data.train_prompts, "data.train_prompts")
    if config.data.heldout_prompts is not None:
        generator.heldout_prompts = read_prompt_file(config.data.heldout_prompts, "data.heldout_prompts")
    if model.gradient_checkpointing:
        if not hasattr(generator.trainable, "enable_gradient_checkpointing"):
            raise ConfigError("model.gradient_checkpointing", f"the {model.family} model does not support it")
        generator.trainable.enable_gradient_checkpointing()
    if not generator.train_prompts:
        raise ConfigError("data.train_prompts", f"model family {model.family} has no built-in prompts; give a prompt file")
    return generator


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """``model.dtype``: what the transformer computes in (``auto``: bfloat16 on CUDA, float32 on CPU)."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
            "float32": torch.float32, "bfloat16": torch.bfloat16}[config.model.dtype]


def _weights_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """Frozen weights (VAE, text encoders, a LoRA run's base transformer) load in the compute
    dtype; :func:`use_master_weights` then gives the trainable tensors float32 masters."""
    return compute_dtype(config, device)


def use_master_weights(generator: Generator, dtype: torch.dtype) -> None:
    """Mixed precision: trainable tensors (and so their gradients and optimizer state) in float32,
    the policy's forward in ``dtype``.

    Without FSDP the forward runs under ``torch.autocast(dtype)`` (the policy's ``compute_dtype``):
    matmuls and attention in bf16 on bf16 casts of the float32 masters, reductions and norms in
    float32, gradients land on the masters in float32. That is the simplest correct choice: no
    second copy of the weights to keep in sync, and one code path for full and LoRA training
    (whose frozen base stays in bf16 and is cast for free). Under FSDP the same masters are the
    sharded parameters and ``MixedPrecisionPolicy`` all-gathers them in ``dtype``.
    """
    for param in generator.trainable.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    if hasattr(generator.policy, "compute_dtype"):
        generator.policy.compute_dtype = None if dtype == torch.float32 else dtype
    elif dtype != torch.float32:
        raise ConfigError("model.dtype", f"the {generator.family} policy has no compute_dtype (autocast); "
                          "use model.dtype=float32")


def _build_sd3(config: TrainConfig, device: torch.device) -> Generator:
    from branchgrpo.models.sd3 import SD3Adapter

    model = config.model
    if model.path is None:
        raise ConfigError("model.path", "SD3 needs a local diffusers folder or a hub id (e.g. stabilityai/stable-diffusion-3.5-medium)")
    adapter = SD3Adapter.from_pretrained(
        model.path, dtype=_weights_dtype(config, device), device=device, vae_dtype=torch.float32,
        height=model.height, width=model.width, guidance_scale=model.guidance_scale,
        negative_prompt=model.negative_prompt, prompt_cache_dir=model.prompt_cache_dir,
        max_sequence_length=model.max_sequence_length, decode_batch_size=model.decode_batch,
    )
    return Generator(
        family="sd3", policy=adapter.velocity_model(), trainable=adapter.transformer,
        latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
        decode=adapter.decode, train_prompts=[], heldout_prompts=[],
    )


def _build_wan(config: TrainConfig, device: torch.device) -> Generator:
    from branchgrpo.models.wan import WanAdapter

    model = config.model
    if model.path is None:
        raise ConfigError("model.path", "Wan needs a local diffusers folder or a hub id "
                          "(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
    try:  # the video size, checked against Wan2.1's VAE and patch factors before any weights load
        WanAdapter(height=model.height, width=model.width, num_frames=model.num_frames)
    except ValueError as err:
        raise ConfigError("model.height/width/num_frames", str(err)) from None
    adapter = WanAdapter.from_pretrained(
        model.path, dtype=_weights_dtype(config, device), device=device, vae_dtype=torch.float32,
        height=model.height, width=model.width, num_frames=model.num_frames,
        guidance_scale=model.guidance_scale, negative_prompt=model.negative_prompt,
        prompt_cache_dir=model.prompt_cache_dir, max_sequence_length=model.max_sequence_length,
        decode_batch_size=model.decode_batch,
    )
    return Generator(
        family="wan", policy=adapter.velocity_model(), trainable=adapter.transformer,
        latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
        decode=adapter.decode, train_prompts=[], heldout_prompts=[],
    )


def _build_flux(config: TrainConfig, device: torch.device) -> Generator:
    from branchgrpo.models.flux import FluxAdapter

    model = config.model
    if model.path is None:
        raise ConfigError("model.path", "FLUX needs a local diffusers folder or a hub id (e.g. black-forest-labs/FLUX.1-dev)")
    dtype = _weights_dtype(config, device)
    adapter = FluxAdapter.from_pretrained(
        model.path, dtype=dtype, device=device, height=model.height, width=model.width,
        guidance_scale=model.guidance_scale, prompt_cache_dir=model.prompt_cache_dir,
        max_sequence_length=model.max_sequence_length, decode_batch_size=model.decode_batch,
    )
    policy = adapter.velocity_model()
    return Generator(
        family="flux",
        policy=policy,
        trainable=adapter.transformer,
        latent_shape=tuple(adapter.latent_shape()),
        encode_prompts=adapter.encode_prompts,
        decode=adapter.decode,
        train_prompts=[],
        heldout_prompts=[],
    )


def _is_list(name: str) -> bool:
    return "," in name or ":" in name


def check_reward_config(config: TrainConfig) -> None:
    """Fail fast (before any model loads) on an unknown reward or a missing checkpoint file."""
    from branchgrpo.rewards import RewardSpecError, available_rewards, parse_reward_weights

    reward = config.reward
    known = list(available_rewards())
    try:
        names = [n for n, _ in parse_reward_weights(reward.name, known=known)] if _is_list(reward.name) else [reward.name]
    except RewardSpecError as err:
        raise ConfigError("reward.name", str(err)) from None
    for name in names:
        if name not in known:
            raise ConfigError("reward.name", f"unknown reward {name!r}; allowed values: {', '.join(known)}")
        if name == "digits" and config.model.family != "digits":
            raise ConfigError("reward.name", "the digits reward scores digits-world images only (model.family=digits)")
        if _check_video_reward(config, name, single=len(names) == 1 and not _is_list(reward.name)):
            continue
        if name in ("digits", "remote"):
            continue
        field_name = "reward.checkpoint" if len(names) == 1 and not _is_list(reward.name) else f"reward.checkpoints.{name}"
        path = reward.checkpoint if field_name == "reward.checkpoint" else reward.checkpoints.get(name)
        if path is None:
            raise ConfigError(field_name, f"reward {name!r} needs its checkpoint; set {field_name}=PATH (see docs/rewards.md)")
        if not Path(path).exists():
            raise ConfigError(field_name, f"checkpoint {path} for reward {name!r} does not exist (see docs/rewards.md)")


def _check_video_reward(config: TrainConfig, name: str, single: bool) -> bool:
    """Videos (wan) need a video reward and images an image reward; True when ``name`` needs no checkpoint."""
    from branchgrpo.rewards.video import VIDEO_REWARDS

    videos = config.model.family == "wan"
    if (name in VIDEO_REWARDS) != videos:
        if videos:
            raise ConfigError("reward.name", f"model.family=wan decodes videos; {name!r} scores images. Use frames "
                              f"(reward.options.image_reward={name}: averaged over frames) or videoalign")
        raise ConfigError("reward.name", f"reward {name!r} scores videos; "
                          f"model.family={config.model.family} decodes images")
    prefix = "reward.options" if single else f"reward.options.{name}"
    options = config.reward.options if single else (config.reward.options.get(name) or {})
    if name == "videoalign":
        if (options.get("url") is None) == (options.get("entry_point") is None):
            raise ConfigError(prefix, "videoalign needs exactly one of url (your reward server) and entry_point "
                              "('package.module:function' returning a video scorer); see docs/adapters.md")
        return True
    if name == "frames":
        if not options.get("image_reward"):
            raise ConfigError(f"{prefix}.image_reward", "the frames reward averages an image reward over frames; "
                              "name it (e.g. hps, pickscore, clip)")
        return options["image_reward"] in ("digits", "remote")
    return False


def build_reward(config: TrainConfig, generator: Generator, device: torch.device):
    """The reward named by ``reward.name`` (checked by :func:`check_reward_config` first)."""
    from branchgrpo.rewards import build_reward as build

    check_reward_config(config)
    reward = config.reward
    if reward.name == "digits" and generator.builtin_reward is not None:
        return generator.builtin_reward
    options = dict(reward.options)
    if _is_list(reward.name):
        return build(reward.name, dict(reward.checkpoints), device=device, dtype=reward.dtype,
                     normalize=reward.normalize, components=options)
    return build(reward.name, reward.checkpoint, device=device, dtype=reward.dtype, **options)


def score_images(reward, images: Tensor, prompts: list[str], group_ids: Tensor, batch_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Leaf rewards ``[B]`` (CPU float32) and, for a weighted list, each component's raw scores.

    Components are scored in batches; per-group normalisation is applied once over all of them
    (a group must not be split across reward batches).
    """
    from branchgrpo.rewards import CompositeReward

    if isinstance(reward, CompositeReward):
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, images.shape[0], batch_size):
            chunk = reward.components(images[start : start + batch_size], prompts[start : start + batch_size])
            for name, value in chunk.items():
                parts.setdefault(name, []).append(value.float().cpu())
        components = {name: torch.cat(values) for name, values in parts.items()}
        total = reward.combine(components, group_ids.cpu()).total.float().cpu()
    else:
        total, components = batched_reward(reward, images, prompts, batch_size), {}
    if not torch.isfinite(total).all():
        raise RuntimeError("the reward returned NaN or Inf; refusing to train on missing rewards")
    return total, components


def batched_reward(reward: RewardFn, images: Tensor, prompts: list[str], batch_size: int) -> Tensor:
    """Score images in batches of ``batch_size``; refuses NaN/Inf scores."""
    scores = []
    for start in range(0, images.shape[0], batch_size):
        scores.append(reward(images[start : start + batch_size], prompts[start : start + batch_size]).float().cpu())
    out = torch.cat(scores)
    if not torch.isfinite(out).all():
        raise RuntimeError("the reward returned NaN or Inf; refusing to train on missing rewards")
    return out
