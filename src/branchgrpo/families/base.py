"""What the trainer needs of a model family: :class:`PolicyBundle` and the :class:`ModelFamily` plug-in.

A family is one module that declares, for one kind of generator (the digits world, FLUX.1,
SD3, Wan, or yours): its typed options (``model.options``), its output modality, the method
settings it recommends, the checks it can run before anything loads, and how it builds the
:class:`PolicyBundle` the trainer drives. The trainer and the CLI only ever talk to this
interface, so adding a family is one module plus :func:`branchgrpo.register_family`.
"""

from __future__ import annotations

import dataclasses
import os
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
    # What ``model.path`` must hold, checked before anything loads (:meth:`file_problems`):
    hub_repo: ClassVar[str | None] = None  # the hub repository `hf download` fetches the folder from
    gated: ClassVar[bool] = False  # the repository needs a licence click and `hf auth login`
    text_parts: ClassVar[tuple[str, ...]] = ()  # subfolders the tokenizers/text encoders load from (every job)
    model_parts: ClassVar[tuple[str, ...]] = ()  # subfolders of the generator (transformer, vae): not for preprocess
    required_files: ClassVar[tuple[str, ...]] = ()  # files at the folder's top the loader reads (model_index.json)
    download: ClassVar[tuple[str, ...]] = ()  # what the fetch command includes: files and subfolders

    # -- configuration ------------------------------------------------------------------------
    def options(self, config: "TrainConfig") -> Any:
        """``model.options`` as this family's typed options (a validated ``options_class``)."""
        return resolve_options(self, config.model.options)

    def check(self, config: "TrainConfig") -> list[ConfigError]:
        """Problems of the settings found without loading anything (sizes, options); empty when fine.
        The default: ``model.path`` is set when the family has a :attr:`path_example`, and the options fit.
        Missing files are :meth:`file_problems`' business."""
        problems = []
        if self.path_example is not None and config.model.path is None:
            problems.append(ConfigError("model.path", f"the {self.name} family needs a local diffusers folder or a "
                                        f"hub id (e.g. {self.path_example})"))
        try:
            self.options(config)
        except ConfigError as err:
            problems.append(err)
        return problems

    # -- files ----------------------------------------------------------------------------------
    def repo_for(self, config: "TrainConfig") -> str | None:
        """The hub repository the fetch command names (default :attr:`hub_repo`; a family with
        variants picks by its options)."""
        return self.hub_repo

    def folder_parts(self, config: "TrainConfig", job: str = "train") -> tuple[str, ...]:
        """What ``model.path`` must hold for ``job``: :attr:`required_files`, :attr:`text_parts` and,
        except for ``preprocess`` (text encoders only), :attr:`model_parts`."""
        return self.required_files + self.text_parts + (() if job == "preprocess" else self.model_parts)

    def fetch_command(self, config: "TrainConfig", target: str | None, repo: str | None = None,
                      parts: tuple[str, ...] | None = None) -> str | None:
        """The ``hf download`` line that fetches ``parts`` (default :attr:`download`) of ``repo`` (default
        :meth:`repo_for`) into ``target`` (None: into the hub cache); None without a repository."""
        repo = repo or self.repo_for(config)
        if repo is None:
            return None
        return hf_download_command(repo, target, self.download if parts is None else parts)

    def file_problems(self, config: "TrainConfig", job: str = "train") -> list[ConfigError]:
        """Every file ``job`` needs from ``model.path`` that is not there, one problem each, with the command
        that fetches it; reads directories only (no hub call). See docs/reliability.md, "Nothing downloaded yet".

        A local path (:func:`looks_local`) must exist and hold :meth:`folder_parts`: a missing folder is one
        line with the whole fetch command, a missing or empty part one line each. A hub id is looked up in
        the local hub cache only when ``HF_HUB_OFFLINE`` is set (:func:`hub_offline`); otherwise the loader
        downloads it."""
        path = config.model.path
        if path is None or (self.path_example is None and not self.folder_parts(config, job)):
            return []
        repo = self.repo_for(config)
        if looks_local(path):
            folder = Path(path).expanduser()
            if not folder.exists():
                command = self.fetch_command(config, str(path))
                how = (f"fetch it with `{command}`{self._gated_note(repo)}" if command else
                       f"a diffusers folder; a hub id looks like {self.path_example}")
                return [ConfigError("model.path", f"{path} does not exist: no {self.name} weights there; {how}")]
            if not folder.is_dir():
                return [ConfigError("model.path", f"{path} is not a folder (the {self.name} family loads a "
                                    "diffusers folder)")]
            return self._part_problems(config, job, folder, str(path), str(path), repo)
        if not hub_offline():
            return []
        snapshot = cached_snapshot(str(path))
        if snapshot is None:
            command = hf_download_command(str(path), None, self.download) if self.download else f"hf download {path}"
            return [ConfigError("model.path", f"{path} is not in the local Hugging Face cache ({hub_cache_dir()}) "
                                f"and HF_HUB_OFFLINE is set; fetch it with `{command}`{self._gated_note(str(path))} "
                                "(or give a local folder)")]
        return self._part_problems(config, job, snapshot, f"{path} (cached in {snapshot})", None, str(path))

    def _part_problems(self, config: "TrainConfig", job: str, folder: Path, where: str, target: str | None,
                       repo: str | None) -> list[ConfigError]:
        problems = []
        for part in self.folder_parts(config, job):
            found = folder / part
            if part in self.required_files:
                if not found.is_file():
                    problems.append(ConfigError("model.path", f"{where} has no {part}" + self._part_fetch(
                        config, repo, target, part)))
            elif not found.is_dir():
                problems.append(ConfigError("model.path", f"{where} has no {part}/ subfolder" + self._part_fetch(
                    config, repo, target, part)))
            elif not any(found.iterdir()):
                problems.append(ConfigError("model.path", f"{where}: the subfolder {part}/ is empty" +
                                            self._part_fetch(config, repo, target, part)))
        return problems

    def _part_fetch(self, config: "TrainConfig", repo: str | None, target: str | None, part: str) -> str:
        command = self.fetch_command(config, target, repo=repo, parts=(part,)) if repo else None
        return f"; fetch it with `{command}`" if command else ""

    def _gated_note(self, repo: str | None) -> str:
        if not self.gated or repo is None:
            return ""
        return f" (gated: accept the licence on https://huggingface.co/{repo} and run `hf auth login` first)"

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


# A relative ``a/b`` path whose first part is one of these names is a local folder even before ``a/``
# exists (``data/flux`` in a fresh checkout), never the hub id ``org/name``.
LOCAL_ROOTS: tuple[str, ...] = ("data", "models", "weights", "checkpoints", "ckpt", "pretrained", "outputs", "runs")
_TRUE = ("1", "ON", "YES", "TRUE")


def looks_local(path: str) -> bool:
    """A path meant for this machine, never sent to a hub: absolute, relative with ./ or ../, ~, an existing
    path, anything but two parts (``a``, ``a/b/c``), or ``a/b`` with ``a`` an existing folder or one of
    :data:`LOCAL_ROOTS`. Only ``org/name`` with neither is a hub id."""
    text = str(path)
    if text.startswith(("/", "./", "../", "~", ".\\")) or Path(text).exists():
        return True
    parts = text.split("/")
    if len(parts) == 2 and all(parts):
        return parts[0] in LOCAL_ROOTS or Path(parts[0]).is_dir()  # data/flux: a missing download, not a hub id
    return True


def hub_offline() -> bool:
    """Whether the Hugging Face hub must not be contacted: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)
    set to 1/ON/YES/TRUE, read from the environment now (not when huggingface_hub was imported)."""
    return any(os.environ.get(name, "").strip().upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The hub cache folder as huggingface_hub resolves it: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``), read from the environment now."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The snapshot folder of ``repo_id`` in the local hub cache (its ``main`` revision), or None when it
    was never downloaded; huggingface_hub's ``snapshot_download(local_files_only=True)``, no network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=hub_cache_dir(), local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, a malformed id, an unreadable cache: not cached
        return None


def hf_download_command(repo: str, target: str | None, parts: tuple[str, ...] = ()) -> str:
    """``hf download REPO [--local-dir TARGET] [--include PART ...]``: a subfolder ``x`` is included as
    ``'x/*'``, a file (a name with a dot) as itself, as docs/flux.md "Download layout" does by hand."""
    words = ["hf download", repo]
    if target is not None:
        words.append(f"--local-dir {_quote(target)}")
    words += [f"--include '{part}'" if "." in part else f"--include '{part}/*'" for part in parts]
    return " ".join(words)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def require_model_path(config: "TrainConfig", family: str, example: str) -> str:
    """``model.path`` or one error line saying what to give."""
    if config.model.path is None:
        raise ConfigError("model.path", f"the {family} family needs a local diffusers folder or a hub id (e.g. {example})")
    return config.model.path
