"""What the trainer needs of a model family: :class:`PolicyBundle` and the :class:`ModelFamily` plug-in.

A family is one module that declares, for one kind of generator (the digits world, FLUX.1,
SD3, Wan, or yours): its typed options (``model.options``), its output modality, the method
settings it recommends, the checks it can run before anything loads, and how it builds the
:class:`PolicyBundle` the trainer drives. The trainer and the CLI only ever talk to this
interface, so adding a family is one module plus :func:`branchgrpo.register_family`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping

import torch
from torch import Tensor

from branchgrpo.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from branchgrpo.rewards.base import Reward
    from branchgrpo.train.config import TrainConfig

Modality = Literal["image", "video"]


@dataclass
class PolicyBundle:
    """A loaded generator as the trainer sees it.

    ``policy`` is the velocity model ``vθ(x, σ, c)`` that rollouts and updates call; ``trainable``
    the module whose parameters GRPO updates and whose state dict checkpoints hold (the
    transformer, or its LoRA view). ``decode`` maps leaf x̂0 latents to ``[B, C, H, W]`` images
    (``[B, F, C, H, W]`` videos) in ``[0, 1]``.
    """

    family: str
    policy: torch.nn.Module
    trainable: torch.nn.Module
    latent_shape: tuple[int, ...]
    encode_prompts: Callable[[list[str]], dict[str, Tensor]]
    decode: Callable[[Tensor], Tensor]
    train_prompts: list[str] = field(default_factory=list)
    heldout_prompts: list[str] = field(default_factory=list)
    builtin_reward: "Reward | None" = None  # the family's own reward (the digits classifier), if any
    modality: Modality = "image"
    adapter: Any = None  # the family's adapter object (export, preprocessing), if it has one


@dataclass
class NoOptions:
    """A family without options of its own."""


class ModelFamily:
    """Base class of a model family (subclass it and register an instance).

    Class attributes to set:
        name: the ``model.family`` value.
        modality: ``"image"`` or ``"video"``: what ``decode`` returns, checked against the reward's.
        options_class: a dataclass of the family's own settings (``model.options``).
        method_defaults: method settings this family recommends over any preset (a partial
            ``method`` mapping). They are applied in the open: ``branchgrpo presets`` and
            ``plan --family`` list them and the run's ``config.yaml`` records the result.
        supports_lora: whether ``model.lora`` applies.
        prompt_cache: whether ``branchgrpo preprocess`` can fill a prompt-embedding cache.
        description: one line for ``branchgrpo families``.
    """

    name: ClassVar[str] = ""
    modality: ClassVar[Modality] = "image"
    options_class: ClassVar[type] = NoOptions
    method_defaults: ClassVar[Mapping[str, Any]] = {}
    supports_lora: ClassVar[bool] = True
    prompt_cache: ClassVar[bool] = False
    builtin_prompts: ClassVar[bool] = False  # True: train without data.train_prompts (the digits world)
    description: ClassVar[str] = ""
    path_example: ClassVar[str | None] = None  # set: model.path is required (e.g. a hub id users know)

    # -- configuration ------------------------------------------------------------------------
    def options(self, config: "TrainConfig") -> Any:
        """``model.options`` as this family's typed options (a validated ``options_class``)."""
        return resolve_options(self, config.model.options)

    def check(self, config: "TrainConfig") -> list[ConfigError]:
        """Problems found without loading anything (missing files, sizes); empty when fine.
        The default: ``model.path`` is set when the family has a :attr:`path_example`, and the options fit."""
        problems = []
        path = config.model.path
        if self.path_example is not None and path is None:
            problems.append(ConfigError("model.path", f"the {self.name} family needs a local diffusers folder or a "
                                        f"hub id (e.g. {self.path_example})"))
        elif self.path_example is not None and looks_local(path) and not Path(path).exists():
            problems.append(ConfigError("model.path", f"{path} does not exist: no {self.name} weights there (a "
                                        f"diffusers folder; a hub id looks like {self.path_example})"))
        try:
            self.options(config)
        except ConfigError as err:
            problems.append(err)
        return problems

    # -- building -----------------------------------------------------------------------------
    def build(self, config: "TrainConfig", device: torch.device, dtype: torch.dtype) -> PolicyBundle:  # pragma: no cover
        """Load the generator on ``device`` (frozen parts in ``dtype``) as a :class:`PolicyBundle`."""
        raise NotImplementedError

    def lora_target_modules(self, bundle: PolicyBundle) -> list[str]:
        """Module-name patterns ``model.lora`` adapts when ``model.lora.target_modules`` is unset
        (default: the attention and feed-forward projections of FLUX-style blocks)."""
        from branchgrpo.models.lora import default_target_modules

        return default_target_modules(bundle.trainable)

    def prompt_encoder(self, config: "TrainConfig", device: torch.device, dtype: torch.dtype) -> Any:
        """An object with ``preprocess_prompts(prompts, cache_dir)`` (text encoders only), for
        ``branchgrpo preprocess``; families without a prompt cache refuse."""
        raise ConfigError("model.family", f"the {self.name} family has no prompt-embedding cache to fill")

    def export(self, bundle: PolicyBundle, config: "TrainConfig", out: Path, link: str) -> str:
        """Write the fully fine-tuned transformer for diffusers; returns the line the CLI prints."""
        transformer = bundle.policy.transformer
        transformer.save_pretrained(out, safe_serialization=True)
        return f"wrote {out} ({type(transformer).__name__}.from_pretrained({str(out)!r}))"

    def export_lora(self, bundle: PolicyBundle, config: "TrainConfig", out: Path) -> str:
        """Write the LoRA for the pipeline's ``load_lora_weights`` (``out``: a ``.safetensors`` file or a
        folder); returns the line the CLI prints. Families with several trained modules override it."""
        from branchgrpo.models.export import export_lora

        target = out if out.suffix == ".safetensors" else out / "lora.safetensors"
        path = export_lora(bundle.policy.transformer, target)
        return f"wrote LoRA {path}; load it with pipe.load_lora_weights({str(path)!r})"


def resolve_options(family: ModelFamily, options: Any) -> Any:
    """Build the family's options dataclass from a mapping (or pass an instance through)."""
    from branchgrpo.config import build

    cls = family.options_class
    if isinstance(options, cls):
        return options
    if dataclasses.is_dataclass(options):
        raise ConfigError("model.options", f"got {type(options).__name__}; the {family.name} family takes "
                          f"{cls.__name__} (or a mapping of its fields)")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigError("model.options", f"expected a mapping of {cls.__name__} fields, got {options!r}")
    return build(cls, options, prefix="model.options")


def looks_local(path: str) -> bool:
    """A path meant for this machine (absolute, relative with ./ or ../, ~, or an existing path), never
    a hub id (``org/name``)."""
    text = str(path)
    if text.startswith(("/", "./", "../", "~", ".\\")) or Path(text).exists():
        return True
    parts = text.split("/")
    if len(parts) == 2 and all(parts):
        return Path(parts[0]).is_dir()  # data/flux with a local data/ folder: a missing download, not a hub id
    return True


def require_model_path(config: "TrainConfig", family: str, example: str) -> str:
    """``model.path`` or one error line saying what to give."""
    if config.model.path is None:
        raise ConfigError("model.path", f"the {family} family needs a local diffusers folder or a hub id (e.g. {example})")
    return config.model.path
