"""Build the trainer's parts from config, through the family and reward registries.

:func:`validate_job` checks everything that can be checked without loading a model and reports
every problem at once; :func:`build_policy` and :func:`build_reward` then load; :func:`score_rewards`
is the one path by which leaves (training and evaluation) are scored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from branchgrpo.config import ConfigError, ConfigErrors
from branchgrpo.families import PolicyBundle, get_family
from branchgrpo.rewards.base import Reward, RewardError, RewardOutput, as_reward
from branchgrpo.train.config import ModelConfig, TrainConfig
from branchgrpo.train.reward_worker import overlap_problems
from branchgrpo.tree.diversity_bonus import needs_reward_embedding


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device", f"{name} was asked for but torch sees no CUDA device; use run.device=cpu")
    return device


# Where the prompt files the shipped configs name come from (docs/reliability.md, "Nothing downloaded yet").
FLOW_GRPO_PICKSCORE = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/{name}"


def prompt_file_hint(path: str) -> str:
    """How to get the missing prompt file ``path``: the HPDv2 benchmark prompts (``hpdv2/train_prompts.txt``,
    ``hpdv2/test_prompts.txt``), Flow-GRPO's ``pickscore/train.txt``/``test.txt``, edit rows (``.jsonl``),
    else your own prompts."""
    file = Path(path)
    if file.parent.name.lower() == "hpdv2" and file.name in ("train_prompts.txt", "test_prompts.txt"):
        return (f"fetch the HPDv2 benchmark prompts with `python scripts/fetch_hpdv2_prompts.py --out {file.parent}` "
                "(writes train_prompts.txt and test_prompts.txt)")
    if file.parent.name.lower() == "pickscore" and file.name in ("train.txt", "test.txt"):
        return (f"fetch Flow-GRPO's PickScore prompts with `curl -L --create-dirs -o {file} "
                f"{FLOW_GRPO_PICKSCORE.format(name=file.name)}`")
    if file.suffix == ".jsonl":
        return ('write your edit rows there, one JSON object per line: {"prompt": "<instruction>", "image": '
                '"<source image, relative to the file>"}')
    return "write your prompts there, one per line (blank lines and # comments are skipped)"


def read_prompt_file(path: str, field: str) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments skipped."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(field, f"prompt file {file} does not exist; {prompt_file_hint(str(path))}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(field, f"prompt file {file} is not UTF-8 text (byte {err.start})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(field, f"prompt file {file} holds no prompts (one prompt per line)")
    return prompts


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """``model.dtype``: what the transformer computes in (``auto``: bfloat16 on CUDA, float32 on CPU)."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
            "float32": torch.float32, "bfloat16": torch.bfloat16}[config.model.dtype]


def weights_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """Frozen weights (VAE, text encoders, a LoRA run's base transformer) load in the compute
    dtype; :func:`use_master_weights` then gives the trainable tensors float32 masters."""
    return compute_dtype(config, device)


# -- validation, all at once, before anything loads ---------------------------------------------
JOBS = ("train", "sample", "eval", "export", "preprocess")


def validate_job(config: TrainConfig, *, custom_policy: bool = False, custom_reward: bool = False,
                 job: str = "train") -> None:
    """Every problem of ``config`` that shows without loading a model, raised together (one
    :class:`ConfigErrors`, one line per problem, no line twice): settings, and every file ``job``
    needs — the model folder and its subfolders, prompt files, reward checkpoints — each missing one
    with the command that fetches it. Reads the file system only; never contacts a hub.

    ``custom_policy`` / ``custom_reward``: the part is passed in from Python, so its config
    section is not checked. ``job``: one of :data:`JOBS`; ``preprocess`` needs the text encoders
    only and no reward, ``sample`` and ``export`` no reward.
    """
    if job not in JOBS:
        raise ValueError(f"job must be one of {JOBS}, got {job!r}")
    problems: list[ConfigError] = []
    family = None
    if not custom_policy:
        try:
            family = get_family(config.model.family)
            problems += family.check(config)
            problems += family.file_problems(config, job)
        except ConfigError as err:
            problems.append(err)
    for field_name in ("train_prompts", "heldout_prompts"):
        path = getattr(config.data, field_name)
        if path is not None:
            try:
                read_prompt_file(path, f"data.{field_name}")
            except ConfigError as err:
                problems.append(err)
    if family is not None and not family.builtin_prompts and config.data.train_prompts is None:
        problems.append(ConfigError("data.train_prompts", f"the {family.name} family has no built-in prompts; "
                                    "give a prompt file (one prompt per line)"))
    if job == "train":
        output_dir = Path(config.run.output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            problems.append(ConfigError("run.output_dir", f"{output_dir} exists and is not a folder"))
    if config.method.update.kl_coef > 0 and config.model.lora is None:
        problems.append(ConfigError(
            "method.update.kl_coef", "the KL term needs a reference model: train with model.lora (the reference is "
            "the model with its adapter disabled, no second copy) or set kl_coef=0"))
    if not custom_reward and job in ("train", "eval"):
        modality = family.modality if family is not None else None
        problems += reward_problems(config, modality)
    if job == "train":
        problems += overlap_problems(config, custom_reward)
    if problems and family is not None and job != "preprocess":
        problems += prompt_cache_notes(config, family)
    problems = list({str(p): p for p in problems}.values())  # one line per problem (e.g. a file two checks read)
    if problems:
        raise ConfigErrors(problems)


def prompt_cache_notes(config: TrainConfig, family) -> list[ConfigError]:
    """The to-do line for an empty ``model.prompt_cache_dir``, added to a list of other problems only: the
    cache is filled by ``branchgrpo preprocess``, or on first use by the text encoders, so it is never a
    reason to stop by itself."""
    cache = config.model.prompt_cache_dir
    if not family.prompt_cache or cache is None:
        return []
    folder = Path(cache)
    if folder.exists() and not folder.is_dir():
        return [ConfigError("model.prompt_cache_dir", f"{cache} exists and is not a folder")]
    if folder.is_dir() and any(folder.iterdir()):
        return []
    return [ConfigError("model.prompt_cache_dir", f"{cache} is empty (not an error by itself: the text encoders "
                        "fill it on first use); once the model is there, fill it with `branchgrpo preprocess` and "
                        "this job's --config and overrides")]


def _is_list(name: str) -> bool:
    return "," in name or ":" in name


def reward_problems(config: TrainConfig, modality: str | None) -> list[ConfigError]:
    """What is wrong with the ``reward`` section: names, modality, checkpoints, options."""
    from branchgrpo.rewards import RewardSpecError, available_rewards, parse_reward_weights
    from branchgrpo.rewards.registry import reward_info

    reward = config.reward
    known = list(available_rewards())
    single = not _is_list(reward.name)
    try:
        names = [reward.name] if single else [n for n, _ in parse_reward_weights(reward.name, known=known)]
    except RewardSpecError as err:
        return [ConfigError("reward.name", str(err))]
    problems: list[ConfigError] = []
    embedding: list[bool] = []  # per known reward name: has an image embedding
    if not single:
        extra = sorted(set(reward.checkpoints) - set(names)) + sorted(set(reward.options) - set(names))
        if extra:
            problems.append(ConfigError("reward.checkpoints/options", f"settings for {extra}, which "
                                        f"reward.name={reward.name!r} does not name"))
    for name in names:
        prefix_ckpt = "reward.checkpoint" if single else f"reward.checkpoints.{name}"
        prefix_opts = "reward.options" if single else f"reward.options.{name}"
        if name not in known:
            problems.append(ConfigError("reward.name", f"unknown reward {name!r}; allowed values: {', '.join(known)} "
                                        "(or register your own with branchgrpo.register_reward)"))
            continue
        try:
            info = reward_info(name)
        except (ImportError, AttributeError, RewardError) as err:
            problems.append(ConfigError("reward.name", f"reward {name!r} cannot be imported: {err}"))
            continue
        embedding.append(info.embeds)
        options = reward.options if single else (reward.options.get(name) or {})
        checkpoint = reward.checkpoint if single else reward.checkpoints.get(name)
        if not isinstance(options, dict):
            problems.append(ConfigError(prefix_opts, f"expected a mapping of {name!r} options, got {options!r}"))
            continue
        if info.families is not None and config.model.family not in info.families:
            problems.append(ConfigError("reward.name", f"reward {name!r} scores {', '.join(info.families)} outputs "
                                        f"only (model.family={config.model.family})"))
        if modality is not None and info.modality != modality:
            if modality == "video":
                hint = (f"; average it over frames with reward.name=frames and {prefix_opts}.image_reward={name}, "
                        "or use videoalign")
            else:
                hint = ""
            problems.append(ConfigError("reward.name", f"model.family={config.model.family} decodes {modality}s; "
                                        f"reward {name!r} scores {info.modality}s{hint}"))
        if info.options is not None:
            unknown = [k for k in options if k not in info.options]
            if unknown:
                problems.append(ConfigError(f"{prefix_opts}.{unknown[0]}", f"reward {name!r} has no such option; "
                                            f"its options: {', '.join(info.options) or '(none)'}"))
        problems += _rule_problems(name, options, prefix_opts, checkpoint)
        needs = info.needs_checkpoint
        if name == "videoalign" and options.get("url") is None and options.get("entry_point") is None:
            needs = True  # the VideoReward model itself
        if needs is None and name == "frames":
            inner = options.get("image_reward")
            needs = bool(inner) and inner in known and reward_info(inner).needs_checkpoint is not False
        fetch_info = info
        if name == "frames" and options.get("image_reward") in known:
            fetch_info = reward_info(options["image_reward"])  # its checkpoint is the image reward's
        if needs and checkpoint is None:
            problems.append(ConfigError(prefix_ckpt, f"reward {name!r} needs its checkpoint; set {prefix_ckpt}=PATH "
                                        "(see docs/rewards.md)"))
        elif checkpoint is not None and needs and not Path(checkpoint).exists():
            fetch = fetch_info.fetch_hint(str(checkpoint))
            how = f"fetch it with `{fetch}`" if fetch else "see docs/rewards.md"
            problems.append(ConfigError(prefix_ckpt, f"checkpoint {checkpoint} for reward {name!r} does not exist; "
                                        f"{how}"))
    if needs_reward_embedding(config.method.advantage) and embedding and not any(embedding):
        with_one = [n for n in known if _embeds(n)]
        problems.append(ConfigError("advantage.diversity_space", f"'reward' measures the bonus in the reward model's "
                                    f"image embedding, which reward.name={reward.name!r} does not have; rewards with "
                                    f"one: {', '.join(with_one)} (or use 'latent' or 'image')"))
    return problems


def _embeds(name: str) -> bool:
    from branchgrpo.rewards.registry import reward_info

    try:
        return reward_info(name).embeds
    except (ImportError, AttributeError, RewardError):
        return False


def _rule_problems(name: str, options: dict, prefix: str, checkpoint=None) -> list[ConfigError]:
    """Rules between a built-in reward's options that a signature cannot say."""
    hooks = (options.get("url") is not None) + (options.get("entry_point") is not None)
    if name == "videoalign" and (hooks == 2 or (hooks == 0 and checkpoint is None)):
        return [ConfigError(prefix, "videoalign needs its VideoReward checkpoint (reward.checkpoint, see "
                            "docs/rewards.md) or exactly one of url (your reward server) and entry_point "
                            "('package.module:function' returning a video scorer); see docs/adapters.md")]
    if name == "frames" and not options.get("image_reward"):
        return [ConfigError(f"{prefix}.image_reward", "the frames reward averages an image reward over frames; "
                            "name it (e.g. hps, pickscore, clip)")]
    if name == "remote" and not options.get("url"):
        return [ConfigError(f"{prefix}.url", "the remote reward needs the server's address, e.g. "
                            "http://127.0.0.1:8765 (python -m branchgrpo.rewards.server)")]
    return []


def check_reward_config(config: TrainConfig) -> None:
    """Raise the reward section's problems (all of them), as :func:`validate_job` would."""
    problems = reward_problems(config, get_family(config.model.family).modality)
    if problems:
        raise ConfigErrors(problems)


# -- building ------------------------------------------------------------------------------------
def lora_spec(config: TrainConfig, bundle: PolicyBundle):
    """The :class:`~branchgrpo.models.lora.LoraSpec` of ``model.lora`` (set): its rank, alpha, dropout,
    init and targets, the family's targets when ``target_modules`` is unset."""
    from branchgrpo.models.lora import LoraSpec

    lora = config.model.lora
    targets = (lora.target_modules if lora.target_modules is not None
               else get_family(config.model.family).lora_target_modules(bundle))
    return LoraSpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, init=lora.init, target_modules=targets)


def build_policy(config: TrainConfig, device: torch.device) -> PolicyBundle:
    """The ``model.family`` generator on ``device``, with LoRA, prompt files and checkpointing applied."""
    family = get_family(config.model.family)
    bundle = family.build(config, device, weights_dtype(config, device))
    model = config.model
    if model.lora is None:  # loaders hand every module over frozen; a full fine-tune trains the whole transformer
        bundle.trainable.requires_grad_(True)
    if model.lora is not None:
        from branchgrpo.models.lora import LoraWeights, add_lora

        add_lora(bundle.trainable, lora_spec(config, bundle))
        bundle.trainable = LoraWeights(bundle.trainable)
    if config.data.train_prompts is not None:
        bundle.train_prompts = read_prompt_file(config.data.train_prompts, "data.train_prompts")
    if config.data.heldout_prompts is not None:
        bundle.heldout_prompts = read_prompt_file(config.data.heldout_prompts, "data.heldout_prompts")
    if model.gradient_checkpointing:
        # under LoRA the trainable module is a view of the adapters; the blocks to recompute are its transformer's
        module = bundle.trainable.transformer if model.lora is not None else bundle.trainable
        if not hasattr(module, "enable_gradient_checkpointing"):
            raise ConfigError("model.gradient_checkpointing", f"the {model.family} model does not support it")
        module.enable_gradient_checkpointing()
    if not bundle.train_prompts:
        raise ConfigError("data.train_prompts", f"model family {model.family} has no built-in prompts; give a prompt file")
    from branchgrpo.resources.auto import resolve_micro_batches

    resolve_micro_batches(config, device)  # engine.*_micro_batch=auto: once, now that the weights are resident
    return bundle


def apply_speed_settings(model: ModelConfig, bundle: PolicyBundle) -> None:
    """``model.attention`` (the CUDA attention kernel, process-wide) and ``model.compile`` (regional
    compilation of the policy's repeated blocks): after LoRA and checkpointing, before FSDP."""
    from branchgrpo.models import speed

    speed.select_attention(model.attention)
    if model.compile == "blocks":
        try:
            speed.compile_blocks(bundle.policy)
        except ValueError as err:
            raise ConfigError("model.compile", str(err)) from None


def use_master_weights(bundle: PolicyBundle, dtype: torch.dtype) -> None:
    """Mixed precision: trainable tensors (and so their gradients and optimizer state) in float32,
    the policy's forward in ``dtype``.

    Without FSDP the forward runs under ``torch.autocast(dtype)`` (the policy's ``compute_dtype``):
    matmuls and attention in bf16 on bf16 casts of the float32 masters, reductions and norms in
    float32, gradients land on the masters in float32. That is the simplest correct choice: no
    second copy of the weights to keep in sync, and one code path for full and LoRA training
    (whose frozen base stays in bf16 and is cast for free). Under FSDP the same masters are the
    sharded parameters and ``MixedPrecisionPolicy`` all-gathers them in ``dtype``.
    """
    for param in bundle.trainable.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    if hasattr(bundle.policy, "compute_dtype"):
        bundle.policy.compute_dtype = None if dtype == torch.float32 else dtype
    elif dtype != torch.float32:
        raise ConfigError("model.dtype", f"the {bundle.family} policy has no compute_dtype (autocast); "
                          "use model.dtype=float32")


def build_reward(config: TrainConfig, bundle: PolicyBundle, device: torch.device) -> Reward:
    """The reward named by ``reward.name`` (its config checked first), as a :class:`Reward`."""
    from branchgrpo.rewards import build_reward as build

    check_reward_config(config)
    reward = config.reward
    if reward.name == "digits" and bundle.builtin_reward is not None and not needs_reward_embedding(config.method.advantage):
        return as_reward(bundle.builtin_reward, name="digits")  # the world's own classifier, already loaded
    options = dict(reward.options)
    try:
        if _is_list(reward.name):
            return build(reward.name, dict(reward.checkpoints), device=device, dtype=reward.dtype,
                         normalize=reward.normalize, components=options)
        return build(reward.name, reward.checkpoint, device=device, dtype=reward.dtype, **options)
    except (RewardError, ValueError, TypeError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ConfigError("reward", str(err)) from None


# -- scoring ---------------------------------------------------------------------------------------
def score_rewards(reward: Reward, outputs: Tensor, prompts: list[str], group_ids: Tensor,
                  batch_size: int, absolute: bool = False) -> RewardOutput:
    """Score decoded leaves ``[B, ...]``: components in batches of ``batch_size``, combined once (so a
    weighted list normalises over whole groups); rewards that judge whole groups get one call.
    ``absolute``: the total is the raw weighted sum, never normalised (held-out evaluation).

    Returns CPU float32 totals and components; refuses NaN/Inf and values outside float32's range.
    """
    group_ids = group_ids.cpu()
    return join_reward_chunks(reward, [score_reward_chunk(reward, outputs, prompts, group_ids, batch_size)],
                              group_ids, absolute)


def score_reward_chunk(reward: Reward, outputs: Tensor, prompts: list[str], group_ids: Tensor,
                       batch_size: int) -> RewardOutput | dict[str, Tensor]:
    """The part of :func:`score_rewards` that needs the images: raw CPU components ``{name: [B]}``
    in batches of ``batch_size``, or, for a reward that judges whole groups, its :class:`RewardOutput`.
    Chunks of whole prompt groups can be scored apart (and elsewhere) and joined by :func:`join_reward_chunks`."""
    if reward.needs_groups:
        return reward.score(outputs, prompts, group_ids.cpu())
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, outputs.shape[0], batch_size):
        chunk = reward.components(outputs[start : start + batch_size], prompts[start : start + batch_size])
        for name, value in chunk.items():
            parts.setdefault(name, []).append(value.detach().cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


def join_reward_chunks(reward: Reward, chunks: list[RewardOutput | dict[str, Tensor]], group_ids: Tensor,
                       absolute: bool = False) -> RewardOutput:
    """:func:`score_rewards`' result from the :func:`score_reward_chunk` of consecutive chunks of the
    leaves (``group_ids``: all of them): components joined, then combined once."""
    group_ids = group_ids.cpu()
    if reward.needs_groups:
        result = RewardOutput(
            total=torch.cat([chunk.total.detach().cpu() for chunk in chunks]),
            components={name: torch.cat([chunk.components[name].detach().cpu() for chunk in chunks])
                        for name in chunks[0].components},
            normalized={name: torch.cat([chunk.normalized[name].detach().cpu() for chunk in chunks])
                        for name in chunks[0].normalized},
        )
    else:
        components = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
        result = (RewardOutput(total=reward.raw_total(components), components=components) if absolute
                  else reward.combine(components, group_ids))
    total = _checked(reward, "total", result.total)
    components = {name: _checked(reward, name, value) for name, value in result.components.items()}
    return RewardOutput(total=total, components=components, normalized=result.normalized)


def _checked(reward: Reward, what: str, values: Tensor) -> Tensor:
    """``values`` as CPU float32 if every one is finite and inside float32's range (else one clear error)."""
    wide = values.detach().double().cpu()
    if not torch.isfinite(wide).all():
        bad = int((~torch.isfinite(wide)).sum())
        raise RewardError(f"reward {reward.name!r} ({what}) returned {bad} NaN/Inf values; "
                          "refusing to train on missing rewards")
    limit = float(torch.finfo(torch.float32).max)
    if wide.numel() and float(wide.abs().max()) > limit:
        raise RewardError(f"reward {reward.name!r} ({what}) returned {float(wide.abs().max()):.3g}, outside "
                          f"float32's range (±{limit:.3g}); rescale the reward")
    return wide.float()
