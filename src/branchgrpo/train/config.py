"""The training job's config: method (a preset plus changes) + model, reward, data, eval, run.

Resolution order: dataclass defaults (the digits world) ← YAML file (``--config``) ← ``--preset``
← dotted ``key=value`` overrides. Every key and value is checked; mistakes are ConfigErrors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from branchgrpo.config import ConfigError, build, load_yaml, merge, parse_overrides, to_dict
from branchgrpo.tree.presets import preset_mapping
from branchgrpo.tree.spec import MethodConfig


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the transformer; only they are trained (see models/lora.py)."""

    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0  # > 0 makes the on-policy ratio differ from 1 (dropout in training mode)
    target_modules: list[str] | None = None  # None = the attention/feed-forward projections (Flow-GRPO's list)
    init: str = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError("model.lora", "rank >= 1, alpha > 0 and 0 <= dropout < 1 are required")


@dataclass
class ModelConfig:
    """Which generator to train and how to run it."""

    family: Literal["digits", "flux", "sd3", "wan"] = "digits"
    path: str | None = None  # flux: diffusers folder or hub id; digits: generator .safetensors (None = shipped)
    height: int = 720  # flux image size in pixels
    width: int = 720
    guidance_scale: float = 3.5  # FLUX.1-dev guidance embedding; SD3: classifier-free guidance scale
    negative_prompt: str = ""  # SD3 classifier-free guidance
    lora: LoraConfig | None = None  # train LoRA adapters instead of all weights
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 compute on GPU, fp32 on CPU
    prompt_cache_dir: str | None = None  # flux: on-disk prompt-embedding cache (branchgrpo preprocess)
    max_sequence_length: int = 512  # flux T5 tokens
    decode_batch: int = 8  # latents per VAE decode call
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% slower)
    num_frames: int = 33  # wan: frames per video, 4k + 1 (the VAE codes frame 0 alone, then 4 per latent frame)

    def __post_init__(self) -> None:
        for name in ("height", "width", "decode_batch", "max_sequence_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ConfigError("model.num_frames",
                              f"Wan videos have 4k + 1 frames (1, 5, ..., 33, ..., 81), got {self.num_frames}")


@dataclass
class RewardConfig:
    """What the leaves are scored by (see docs/rewards.md and :mod:`branchgrpo.rewards`)."""

    name: str = "digits"  # a reward (digits | hps | pickscore | imagereward | clip | aesthetic | remote) or "hps:1.0,clip:0.5"
    checkpoint: str | None = None  # checkpoint file/folder of a single reward
    checkpoints: dict[str, str] = field(default_factory=dict)  # per component of a weighted list
    options: dict[str, Any] = field(default_factory=dict)  # reward options (e.g. processor, tokenizer, url); per component for lists
    normalize: Literal["none", "group", "batch"] = "none"  # z-score each component per prompt group before the weighted sum
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    batch_size: int = 64  # images per reward call

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("reward.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class DataConfig:
    """Prompts: files with one prompt per line, or the model family's built-in prompts."""

    train_prompts: str | None = None  # None = built-in (digits world)
    heldout_prompts: str | None = None  # None = built-in held-out prompts
    prompts_per_iteration: int = 4  # prompt groups (trees) per iteration

    def __post_init__(self) -> None:
        if self.prompts_per_iteration < 1:
            raise ConfigError("data.prompts_per_iteration", f"must be >= 1, got {self.prompts_per_iteration}")


@dataclass
class EvalConfig:
    """Held-out evaluation: fixed prompts and seeds, flat sampling."""

    every: int = 10  # iterations between evaluations (also at the start and the end); 0 = start/end only
    samples_per_prompt: int = 4
    eta: float | None = None  # sampler η for evaluation; None = the method's η (0 = ODE)
    seed: int = 1234
    max_prompts: int = 0  # 0 = all held-out prompts

    def __post_init__(self) -> None:
        if self.every < 0 or self.samples_per_prompt < 1 or self.max_prompts < 0:
            raise ConfigError("eval", "every >= 0, samples_per_prompt >= 1 and max_prompts >= 0 are required")
        if self.eta is not None and self.eta < 0:
            raise ConfigError("eval.eta", f"must be >= 0 or null, got {self.eta}")


@dataclass
class RunConfig:
    """Where results go, how long, how often things are written."""

    output_dir: str = "runs/digits-branchgrpo"
    iterations: int = 50
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    dump_tree_every: int = 10  # write a tree dump every N iterations (0 = never)
    sample_grid_every: int = 10  # write a held-out sample grid at each evaluation when > 0
    progress: bool = True  # progress bar on stderr
    tensorboard: bool = True
    checkpoint_every: int = 10  # iterations between checkpoints (0 = only at the end / on SIGTERM)
    keep_checkpoints: int = 3  # complete checkpoints kept (older ones deleted)
    resume: str | None = None  # "auto" = newest complete checkpoint in output_dir, or a checkpoint folder
    ema_decay: float = 0.0  # EMA of the trained weights (paper: 0.995); 0 = off
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works without network)
    wandb_project: str = "branchgrpo"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # ddp: whole model per rank; fsdp: FSDP2 shards (docs/distributed.md)
    cpu_offload: bool = False  # fsdp only: sharded weights, grads and optimizer state in host memory

    def __post_init__(self) -> None:
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError("run.parallel", f"got {self.parallel!r}; allowed values: ddp, fsdp")
        if self.cpu_offload and self.parallel != "fsdp":
            raise ConfigError("run.cpu_offload", "CPU offload works through FSDP; set run.parallel=fsdp "
                              "(or run.cpu_offload=false)")
        if self.iterations < 0:
            raise ConfigError("run.iterations", f"must be >= 0, got {self.iterations}")
        if self.threads < 0:
            raise ConfigError("run.threads", f"must be >= 0, got {self.threads}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("run.checkpoint_every", "checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("run.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError("run.device", f"allowed values: auto, cpu, cuda, cuda:N; got {self.device!r}")


@dataclass
class TrainConfig:
    """A whole training job."""

    preset: str = "branchgrpo"
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Method settings the digits world uses on top of any preset: its tiny transformer needs a larger
# step than FLUX.1-dev's 1e-5. Sweep (30 iterations, held-out reward from 0.386): lr 1e-3 collapsed
# (0.10 at 20), 3e-4 reached 0.62 at 20, 3e-4 × 4 updates 0.75 at 30, 5e-4 × 2 updates 0.82 at 30.
DIGITS_METHOD_DEFAULTS: dict[str, Any] = {
    "update": {"learning_rate": 5e-4, "updates_per_iteration": 2, "clip_range": 1e-3},
}


def load_train_config(
    config_file: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """Resolve a :class:`TrainConfig` (defaults ← file ← preset ← overrides)."""
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError("--config", f"config file {path} does not exist")
        try:
            data = load_yaml(path.read_text()) or {}
        except ConfigError as err:
            raise ConfigError(f"{path}", str(err)) from None
        if not isinstance(data, Mapping):
            raise ConfigError(str(path), "a config file is a YAML mapping of sections (model, reward, method, ...)")
        data = dict(data)
    override_map = parse_overrides(TrainConfig, overrides or [])
    preset_name = preset or override_map.pop("preset", None) or data.get("preset") or "branchgrpo"
    family = (override_map.get("model", {}) or {}).get("family") or (data.get("model") or {}).get("family") or "digits"
    method = preset_mapping(str(preset_name))
    if family == "digits":
        method = merge(method, DIGITS_METHOD_DEFAULTS, MethodConfig)
    method = merge(method, data.get("method") or {}, MethodConfig)
    data = merge(data, {"preset": preset_name, "method": method}, TrainConfig)
    data = merge(data, override_map, TrainConfig)
    return build(TrainConfig, data)


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML (what a run directory stores)."""
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)
