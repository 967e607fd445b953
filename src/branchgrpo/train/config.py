"""The training job's config: method (a preset plus changes) + model, reward, data, eval, run.

Resolution order: dataclass defaults (the digits world) ← YAML file (``--config``) ← ``--preset``
← dotted ``key=value`` overrides. Every key and value is checked; mistakes are ConfigErrors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from branchgrpo.config import ConfigError, build, merge, parse_overrides, read_yaml_file, to_dict
from branchgrpo.tree.presets import preset_mapping
from branchgrpo.tree.spec import MethodConfig


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the transformer; only they are trained (see models/lora.py)."""

    rank: int = 32  # LoRA rank r
    alpha: float = 64.0  # LoRA scale numerator: the update is (alpha / rank) · B·A
    dropout: float = 0.0  # > 0 makes the on-policy ratio differ from 1 (dropout in training mode)
    target_modules: list[str] | None = None  # None = the model family's default (its attention projections)
    init: str = "gaussian"  # peft's init_lora_weights (gaussian: A ~ N(0, 1/r), B = 0, so training starts at the base model)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError("model.lora", "rank >= 1, alpha > 0 and 0 <= dropout < 1 are required")


@dataclass
class ModelConfig:
    """Which generator to train; settings every family shares. The family's own settings (image
    size, guidance, ...) are ``options``, checked against the family's options dataclass."""

    family: str = "digits"  # a registered model family (branchgrpo families): digits | flux | sd3 | wan | yours
    path: str | None = None  # diffusers folder or hub id (digits: generator .safetensors; None = shipped)
    options: dict[str, Any] = field(default_factory=dict, metadata={"merge": "deep"})  # the family's settings (branchgrpo config --family NAME)
    lora: LoraConfig | None = None  # train LoRA adapters instead of all weights
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 compute on GPU, fp32 on CPU
    prompt_cache_dir: str | None = None  # on-disk prompt-embedding cache (branchgrpo preprocess)
    decode_batch: int = 8  # latents per VAE decode call
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% slower)
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = "flash"  # CUDA attention kernel (auto: torch's; its cuDNN backward failed on H100, torch 2.11)
    compile: Literal["off", "blocks"] = "off"  # blocks: torch.compile each repeated transformer block (1.48x forward on H100)

    def __post_init__(self) -> None:
        if self.decode_batch < 1:
            raise ConfigError("model.decode_batch", f"must be >= 1, got {self.decode_batch}")


@dataclass
class RewardConfig:
    """What the leaves are scored by (see docs/rewards.md and :mod:`branchgrpo.rewards`)."""

    name: str = "digits"  # a reward (digits | hps | pickscore | imagereward | clip | aesthetic | remote) or "hps:1.0,clip:0.5"
    checkpoint: str | None = None  # checkpoint file/folder of a single reward
    checkpoints: dict[str, str] = field(default_factory=dict)  # per component of a weighted list
    options: dict[str, Any] = field(default_factory=dict, metadata={"merge": "deep"})  # reward options (e.g. processor, tokenizer, url); per component for lists
    normalize: Literal["none", "group", "batch"] = "none"  # z-score each component per prompt group before the weighted sum
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    batch_size: int = 64  # images per reward call
    overlap: bool = False  # score each chunk of prompt groups while the next chunk rolls out (docs/rewards.md)
    overlap_chunk: int = 1  # prompt groups per rolled-out chunk when reward.overlap is on
    worker: Literal["thread", "process"] = "thread"  # overlapped scoring: a thread, or a process that builds its reward
    worker_device: str | None = None  # reward.worker=process: device the worker's reward runs on (None = run.device)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("reward.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.overlap_chunk < 1:
            raise ConfigError("reward.overlap_chunk", f"must be >= 1, got {self.overlap_chunk}")
        device = self.worker_device
        if device is not None and not (device in ("auto", "cpu") or device.startswith("cuda")):
            raise ConfigError("reward.worker_device", f"allowed values: auto, cpu, cuda, cuda:N; got {device!r}")


@dataclass
class DataConfig:
    """Prompts: files with one prompt per line, or the model family's built-in prompts."""

    train_prompts: str | None = None  # None = built-in (digits world)
    heldout_prompts: str | None = None  # None = built-in held-out prompts
    prompts_per_iteration: int = 4  # prompt groups (trees) per iteration, over all processes (a multiple of their number)
    prompts_per_process: int = 0  # > 0: prompt groups each process rolls out per iteration (replaces prompts_per_iteration)

    def __post_init__(self) -> None:
        if self.prompts_per_iteration < 1:
            raise ConfigError("data.prompts_per_iteration", f"must be >= 1, got {self.prompts_per_iteration}")
        if self.prompts_per_process < 0:
            raise ConfigError("data.prompts_per_process", f"must be >= 0, got {self.prompts_per_process}")

    def global_prompts(self, processes: int) -> int:
        """Prompt groups per iteration over ``processes`` processes."""
        return self.prompts_per_process * processes if self.prompts_per_process else self.prompts_per_iteration

    def check_processes(self, processes: int) -> None:
        """Refuse a job of ``processes`` processes whose prompt groups cannot be shared evenly (the
        trainer's check at start-up; no model needed)."""
        if self.global_prompts(processes) % processes:
            total = self.prompts_per_iteration
            raise ConfigError(
                "data.prompts_per_iteration",
                f"{total} prompts cannot be shared evenly by {processes} processes; set "
                f"data.prompts_per_iteration={processes * max(1, round(total / processes))} or data.prompts_per_process=1",
            )


@dataclass
class EvalConfig:
    """Held-out evaluation: fixed prompts and seeds, flat sampling."""

    every: int = 10  # iterations between evaluations (also at the start and the end); 0 = start/end only
    samples_per_prompt: int = 4  # held-out samples per prompt
    eta: float | None = None  # sampler η for evaluation; None = the method's η (0 = ODE)
    seed: int = 1234  # evaluation noise seed (the same samples at every evaluation)
    max_prompts: int = 0  # 0 = all held-out prompts

    def __post_init__(self) -> None:
        if self.every < 0 or self.samples_per_prompt < 1 or self.max_prompts < 0:
            raise ConfigError("eval", "every >= 0, samples_per_prompt >= 1 and max_prompts >= 0 are required")
        if self.eta is not None and self.eta < 0:
            raise ConfigError("eval.eta", f"must be >= 0 or null, got {self.eta}")


@dataclass
class RunConfig:
    """Where results go, how long, how often things are written."""

    output_dir: str = "runs/{family}-{preset}"  # the run folder (config.yaml, metrics.jsonl, samples/, trees/, checkpoints/, weights/); {family} and {preset} are filled in
    iterations: int = 50  # training iterations (GRPO rollout + update rounds)
    seed: int = 0  # seed of every random stream of the run (prompts, rollout and split noise, edge order)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    dump_tree_every: int = 10  # write a tree dump every N iterations (0 = never)
    sample_grid_every: int = 10  # write a held-out sample grid at each evaluation when > 0
    progress: bool = True  # progress bar on stderr
    tensorboard: bool = True  # write TensorBoard events to RUN/tensorboard
    checkpoint_every: int = 10  # iterations between checkpoints (0 = only at the end / on SIGTERM)
    keep_checkpoints: int = 3  # complete checkpoints kept (older ones deleted)
    resume: str | None = None  # "auto" = newest complete checkpoint in output_dir, or a checkpoint folder
    overwrite: bool = False  # replace (delete) a run already in output_dir instead of refusing to start; not with resume
    ema_decay: float = 0.0  # EMA of the trained weights (paper: 0.995); 0 = off
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works without network)
    wandb_project: str = "branchgrpo"  # Weights & Biases project (run.wandb=true)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # ddp: whole model per rank; fsdp: FSDP2 shards (docs/distributed.md)
    cpu_offload: bool = False  # fsdp only: sharded weights, grads and optimizer state in host memory

    def __post_init__(self) -> None:
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError("run.parallel", f"got {self.parallel!r}; allowed values: ddp, fsdp")
        if self.cpu_offload and self.parallel != "fsdp":
            raise ConfigError("run.cpu_offload", "CPU offload works through FSDP; set run.parallel=fsdp "
                              "(or run.cpu_offload=false)")
        if not self.output_dir.strip():
            raise ConfigError("run.output_dir", "must name a folder (empty would train into the current folder)")
        if self.iterations < 0:
            raise ConfigError("run.iterations", f"must be >= 0, got {self.iterations}")
        if self.threads < 0:
            raise ConfigError("run.threads", f"must be >= 0, got {self.threads}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("run.checkpoint_every", "checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("run.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.overwrite and self.resume is not None:
            raise ConfigError("run.overwrite", "cannot be combined with run.resume: resume continues the run in "
                              "output_dir, overwrite replaces it; set one of them")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError("run.device", f"allowed values: auto, cpu, cuda, cuda:N; got {self.device!r}")


@dataclass
class TrainConfig:
    """A whole training job."""

    preset: str = "branchgrpo"  # method preset the method section starts from (branchgrpo presets)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    imports: list[str] = field(default_factory=list)  # modules imported first: where your register_family/register_reward calls live


_SECTIONS = {"method": "MethodConfig", "model": "ModelConfig", "reward": "RewardConfig", "data": "DataConfig",
             "eval": "EvalConfig", "run": "RunConfig"}


def import_plugins(modules: list[str], field_name: str = "imports") -> None:
    """Import the modules that register custom families and rewards (one error line if one fails)."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any failure of a user module is one line
            raise ConfigError(field_name, f"cannot import {module!r}: {type(err).__name__}: {err}") from None


def family_defaults(family_name: str) -> dict[str, Any]:
    """The method settings the family recommends, as dotted ``{method.key: value}`` (what is applied)."""
    from branchgrpo.families import get_family

    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("method.", get_family(family_name).method_defaults)
    return flat


def load_train_config(
    config_file: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """Resolve a :class:`TrainConfig`: defaults ← preset ← the family's method defaults ← YAML file
    (``--config``) ← dotted ``key=value`` overrides. The family's defaults are listed by
    ``branchgrpo presets`` and recorded in the run's ``config.yaml``; a file or override wins over them."""
    from branchgrpo.families import get_family

    data: dict[str, Any] = {}
    if config_file is not None:
        data = read_yaml_file(config_file) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(str(config_file), "a config file is a YAML mapping of sections (model, reward, method, ...)")
        data = dict(data)
        for section, value in data.items():
            if section in _SECTIONS and value is not None and not isinstance(value, Mapping):
                raise ConfigError(section, f"expected a mapping of {_SECTIONS[section]} fields, got {value!r} "
                                  f"(in {config_file})")
    override_map = parse_overrides(TrainConfig, overrides or [])
    import_plugins([*(data.get("imports") or []), *(override_map.get("imports") or [])])
    preset_name = preset or override_map.pop("preset", None) or data.get("preset") or "branchgrpo"
    override_model = override_map.get("model") if isinstance(override_map.get("model"), Mapping) else {}
    family_name = override_model.get("family") or (data.get("model") or {}).get("family") or "digits"
    family = get_family(str(family_name))
    method = preset_mapping(str(preset_name))
    method = merge(method, family.method_defaults, MethodConfig)
    method = merge(method, data.get("method") or {}, MethodConfig)
    data = merge(data, {"preset": preset_name, "method": method}, TrainConfig)
    data = merge(data, override_map, TrainConfig)
    config = build(TrainConfig, data)
    given = override_map.get("data") if isinstance(override_map.get("data"), Mapping) else {}
    if "prompts_per_iteration" in given and config.data.prompts_per_process > 0:
        raise ConfigError("data.prompts_per_iteration", (
            f"the override would be ignored: data.prompts_per_process={config.data.prompts_per_process} "
            "takes precedence over it; override data.prompts_per_process instead, or add "
            "data.prompts_per_process=0 to count prompts over all processes"))
    return resolve_config(config)


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Check the family-dependent parts of a built config: ``model.family`` is registered and
    ``model.options`` fits its options dataclass (filled in with the family's defaults)."""
    from branchgrpo.families import get_family

    family = get_family(config.model.family)
    config.model.options = to_dict(family.options(config))
    fill_output_dir(config)
    if config.model.lora is not None and not family.supports_lora:
        raise ConfigError("model.lora", f"the {family.name} family does not support LoRA")
    return config


def record_custom_parts(config: TrainConfig, policy: Any = None, reward: Any = None) -> None:
    """Make ``config`` say what a run started from Python really uses: the family of a given policy
    bundle, the name of a given reward, and the importable modules that registered them (``imports``),
    so that ``eval``/``sample``/``export`` in a new process find them or fail in one line."""
    if policy is not None:
        config.model.family = policy.family
    if reward is not None:
        config.reward.name = str(getattr(reward, "name", None) or getattr(reward, "__name__", "custom"))
    config.imports = sorted(set(config.imports) | plugin_modules(config))
    fill_output_dir(config)


def fill_output_dir(config: TrainConfig) -> None:
    """``run.output_dir`` with ``{family}`` and ``{preset}`` filled in (the default is runs/{family}-{preset},
    so runs of different presets do not meet in one folder)."""
    try:
        config.run.output_dir = config.run.output_dir.format(family=config.model.family, preset=config.preset)
    except (KeyError, IndexError, ValueError):
        raise ConfigError("run.output_dir", f"{config.run.output_dir!r}: only {{family}} and {{preset}} can be "
                          "filled in (double other braces)") from None


def plugin_modules(config: TrainConfig) -> set[str]:
    """Importable modules (not ``__main__``, not branchgrpo's own) that registered this config's
    family and rewards."""
    from branchgrpo.families.registry import registered_family
    from branchgrpo.rewards.registry import factory_module

    modules = set()
    family = registered_family(config.model.family)
    if family is not None:
        modules.add(type(family).__module__)
    for name in config.reward.name.replace(":", ",").split(","):
        module = factory_module(name.strip())
        if module:
            modules.add(module)
    return {m for m in modules if m and m != "__main__" and not m.startswith("branchgrpo.")}


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML (what a run directory stores), headed by the family's applied defaults."""
    import yaml

    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    try:
        defaults = family_defaults(config.model.family)
    except ConfigError:
        defaults = {}
    if defaults:
        listed = ", ".join(f"{k}={v}" for k, v in defaults.items())
        text = f"# model family {config.model.family} recommends (applied unless set here): {listed}\n" + text
    return text
