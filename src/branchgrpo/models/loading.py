"""Loading diffusers-layout weights from a folder or the Hugging Face hub (every family), and FLUX.1's loader.

Everything goes through the libraries' own ``from_pretrained`` with ``subfolder=`` (transformer,
vae, text_encoder, tokenizer, …), safetensors weights only, never ``trust_remote_code``. A local
folder is checked first and loaded with ``local_files_only``; a hub id is resolved from the local
hub cache when offline. Missing files raise one :class:`ModelFilesNotFoundError` (or a family's
subclass) that names what to download and where to put it. :class:`PretrainedFolder` does this for
FLUX (:func:`load_flux_adapter`), SD3 (``models/sd3.py``) and Wan (``models/wan.py``); a family
describes its folder with a :class:`ModelFiles`.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch

FLUX_DEV_HUB_ID = "black-forest-labs/FLUX.1-dev"

# subfolder -> groups of glob patterns; each group needs at least one match
FLUX_LAYOUT: dict[str, tuple[tuple[str, ...], ...]] = {
    "transformer": (("config.json",), ("*.safetensors",)),
    "vae": (("config.json",), ("*.safetensors",)),
    "text_encoder": (("config.json",), ("*.safetensors",)),
    "text_encoder_2": (("config.json",), ("*.safetensors",)),
    "tokenizer": (("tokenizer.json", "vocab.json"),),
    "tokenizer_2": (("tokenizer.json", "spiece.model"),),
}

_DOWNLOAD_PATTERNS = ("model_index.json", "transformer/*", "vae/*", "text_encoder/*", "text_encoder_2/*",
                      "tokenizer/*", "tokenizer_2/*")

FLUX_LAYOUT_TEXT = """\
  <folder>/
    model_index.json
    transformer/      config.json, diffusion_pytorch_model-0000{1,2,3}-of-00003.safetensors,
                      diffusion_pytorch_model.safetensors.index.json
    vae/              config.json, diffusion_pytorch_model.safetensors
    text_encoder/     config.json, model.safetensors                       (CLIP ViT-L/14 text)
    text_encoder_2/   config.json, model-0000{1,2}-of-00002.safetensors,
                      model.safetensors.index.json                         (T5-v1.1-XXL encoder)
    tokenizer/        vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    tokenizer_2/      spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json"""


@dataclass(frozen=True)
class ModelFiles:
    """What one family's diffusers folder must hold and how to get it (for checks and error messages)."""

    title: str  # "FLUX", "Stable Diffusion 3", ... as the error message names the family
    hub_id: str  # the default model to download
    layout: Mapping[str, tuple[tuple[str, ...], ...]]  # subfolder -> groups of globs (see FLUX_LAYOUT)
    layout_text: str  # the expected layout, for humans
    download_patterns: tuple[str, ...]  # ``hf download --include`` patterns: only the diffusers subfolders
    placeholder: str  # the ``--local-dir`` suggested when the user gave a hub id
    gated: bool = True  # needs a licence click and ``hf auth login``
    error_class: type | None = None  # the family's ModelFilesNotFoundError subclass (None: the base class)

    def __post_init__(self) -> None:
        if self.error_class is not None:  # so the subclass, raised by itself, knows its family
            _FAMILY_FILES[self.error_class] = self

    def error(self, location: str, missing: Iterable[str], detail: str | None = None) -> "ModelFilesNotFoundError":
        """The family's error for ``missing`` files at ``location``."""
        return (self.error_class or ModelFilesNotFoundError)(location, missing, detail=detail, files=self)


_FAMILY_FILES: dict[type, ModelFiles] = {}

FLUX_FILES = ModelFiles(
    title="FLUX", hub_id=FLUX_DEV_HUB_ID, layout=FLUX_LAYOUT, layout_text=FLUX_LAYOUT_TEXT,
    download_patterns=_DOWNLOAD_PATTERNS, placeholder="/path/to/FLUX.1-dev",
)


class ModelFilesNotFoundError(FileNotFoundError):
    """Model weights or configs are missing; the message says what to download and where.

    Every family raises this class or a subclass (``SD3FilesNotFoundError``, ``WanFilesNotFoundError``),
    so one ``except`` serves all; ``files`` says which family (default: the subclass's, else FLUX).
    """

    def __init__(self, location: str, missing: Iterable[str], hub_id: str | None = None,
                 layout: str | None = None, detail: str | None = None, *, files: ModelFiles | None = None):
        files = files or _FAMILY_FILES.get(type(self), FLUX_FILES)
        self.location = location
        self.missing = list(missing)
        self.hub_id = hub_id = hub_id or files.hub_id
        self.files = files
        lines = [f"{files.title} weights not found at {location!r}."]
        if self.missing:
            lines.append("Missing: " + "; ".join(self.missing) + ".")
        if detail:
            lines.append(f"({detail})")
        target = location if not _looks_like_hub_id(location) or os.path.isabs(location) else files.placeholder
        include = " ".join(f"--include '{pattern}'" for pattern in files.download_patterns)
        access = (f" (gated: accept its licence on https://huggingface.co/{hub_id} and run `hf auth login` first)"
                  if files.gated else "")
        lines += [
            f"Download {hub_id}{access}, only the diffusers subfolders:",
            f"    hf download {hub_id} --local-dir {target} {include}",
            "and pass that folder as the model path. Expected layout:",
            layout or files.layout_text,
        ]
        super().__init__("\n".join(lines))


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith(".")


def is_offline() -> bool:
    """Whether the hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    if callable(check):
        return bool(check())
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or os.environ.get("TRANSFORMERS_OFFLINE") == "1"


def missing_files(folder: str | os.PathLike, subfolders: Iterable[str], layout=FLUX_LAYOUT) -> list[str]:
    """What a diffusers-layout ``folder`` lacks for ``subfolders``, incl. shards named by an index."""
    folder = Path(folder)
    missing = []
    if not folder.is_dir():
        return [f"the folder {folder} itself"]
    for name in subfolders:
        sub = folder / name
        if not sub.is_dir():
            missing.append(f"{name}/")
            continue
        for alternatives in layout[name]:
            if not any(list(sub.glob(pattern)) for pattern in alternatives):
                missing.append(f"{name}/{' or '.join(alternatives)}")
        for index in sub.glob("*.safetensors.index.json"):
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError) as err:
                missing.append(f"{name}/{index.name} (unreadable: {err})")
                continue
            absent = sorted(s for s in shards if not (sub / s).is_file())
            if absent:
                missing.append(f"{name}/{', '.join(absent)} (listed in {index.name})")
    return missing


def _resolve_local(path_or_hub_id: str, local_files_only: bool | None,
                   files: ModelFiles = FLUX_FILES) -> tuple[str, bool]:
    """``(location, is_local_folder)``; an offline hub id becomes its cached snapshot folder."""
    from branchgrpo.families.base import looks_local

    path = Path(path_or_hub_id).expanduser()
    if path.exists() or not _looks_like_hub_id(path_or_hub_id) or looks_local(path_or_hub_id):  # data/flux: never the hub
        return str(path.resolve()), True
    if not (local_files_only or (local_files_only is None and is_offline())):
        return path_or_hub_id, False
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_hub_id, local_files_only=True), True
    except Exception as err:  # noqa: BLE001 - any hub failure means "not downloaded"
        raise files.error(
            path_or_hub_id, ["the whole model (not in the local hub cache; offline)"],
            detail=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
        ) from None


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


TEXT_ENCODER_MODES = ("load", "lazy", "none")


class PretrainedFolder:
    """One ``from_pretrained`` source, shared by every family's loader.

    Resolves ``path_or_hub_id`` (a folder, or a hub id: from the local cache when offline),
    checks a folder for the ``needed`` subfolders up front, and loads parts through the libraries'
    ``from_pretrained(subfolder=...)`` (safetensors only, never remote code). Library errors about
    absent files become the family's :class:`ModelFilesNotFoundError` inside :meth:`errors`.
    """

    def __init__(self, path_or_hub_id: str | os.PathLike, files: ModelFiles, needed: Sequence[str], *,
                 text_encoders: str = "lazy", local_files_only: bool | None = None, revision: str | None = None,
                 device: torch.device | str | None = None):
        if text_encoders not in TEXT_ENCODER_MODES:
            raise ValueError(f"text_encoders must be 'load', 'lazy' or 'none', got {text_encoders!r}")
        self.text_encoders = text_encoders
        self.requested = str(path_or_hub_id)
        self.files = files
        self.needed = list(needed)
        self.location, self.is_local = _resolve_local(self.requested, local_files_only, files)
        if self.is_local:
            absent = missing_files(self.location, self.needed, layout=files.layout)
            if absent:
                raise files.error(self.location if self._exists else self.requested, absent)
        self.common: dict[str, Any] = {"local_files_only": True if self.is_local else bool(local_files_only)}
        if revision is not None:
            self.common["revision"] = revision
        self.device = torch.device(device) if device is not None else None

    @property
    def _exists(self) -> bool:
        return Path(self.requested).expanduser().exists()

    @property
    def source(self) -> str:
        """What the prompt-cache identity records: the resolved folder, or the hub id as given."""
        return self.location if self._exists else self.requested

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Onto the target device, frozen, in eval mode (training code switches what it trains)."""
        module = module.to(self.device) if self.device is not None else module
        return module.eval().requires_grad_(False)

    def model(self, cls: Any, subfolder: str, dtype: torch.dtype) -> torch.nn.Module:
        """``cls.from_pretrained(subfolder=...)`` weights in ``dtype``, placed (diffusers or transformers)."""
        dtype_kwarg = _dtype_kwarg(dtype) if cls.__module__.startswith("transformers") else {"torch_dtype": dtype}
        return self.place(cls.from_pretrained(self.location, subfolder=subfolder, use_safetensors=True,
                                              **self.common, **dtype_kwarg))

    def config(self, cls: Any, subfolder: str) -> Any:
        """A tokenizer or config (no weights) from ``subfolder``."""
        return cls.from_pretrained(self.location, subfolder=subfolder, **self.common)

    def initial_text_encoders(self, load: Callable[[], tuple], count: int) -> tuple:
        """The text encoders now (``text_encoders="load"``) or ``count`` Nones (lazy / cache only)."""
        return load() if self.text_encoders == "load" else (None,) * count

    def adapter_kwargs(self, load_text_encoders: Callable[[], tuple], encoder_config: Mapping[str, Any],
                       max_sequence_length: int) -> dict[str, Any]:
        """What every adapter's constructor takes from its loader (source, device, lazy loading, cache identity)."""
        return {
            "source": self.source,  # a hub id stays a hub id
            "max_sequence_length": max_sequence_length,
            "device": self.device,
            "text_encoder_loader": load_text_encoders if self.text_encoders == "lazy" else None,
            "encoder_config": encoder_config,
        }

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turn what the hub and ``from_pretrained`` raise for absent files into the family's error."""
        from huggingface_hub.errors import EntryNotFoundError

        try:
            yield
        except (OSError, EntryNotFoundError) as err:
            if isinstance(err, ModelFilesNotFoundError):
                raise
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise self.files.error(self.requested, self.needed if not self.is_local else [],
                                   detail=f"{type(err).__name__}: {first_line}") from None


__all__ = [
    "FLUX_DEV_HUB_ID",
    "FLUX_FILES",
    "FLUX_LAYOUT",
    "FLUX_LAYOUT_TEXT",
    "ModelFiles",
    "ModelFilesNotFoundError",
    "PretrainedFolder",
    "TEXT_ENCODER_MODES",
    "is_offline",
    "missing_files",
]
