"""Loading FLUX.1 weights from a diffusers-layout folder or the Hugging Face hub.

Everything goes through the libraries' own ``from_pretrained`` with ``subfolder=`` (transformer,
vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2), safetensors weights only, never
``trust_remote_code``. A local folder is checked first and loaded with ``local_files_only``; a
hub id is resolved from the local hub cache when offline. Missing files raise one
:class:`ModelFilesNotFoundError` that names what to download and where to put it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal

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


class ModelFilesNotFoundError(FileNotFoundError):
    """Model weights or configs are missing; the message says what to download and where."""

    def __init__(self, location: str, missing: Iterable[str], hub_id: str = FLUX_DEV_HUB_ID,
                 layout: str = FLUX_LAYOUT_TEXT, detail: str | None = None):
        self.location = location
        self.missing = list(missing)
        self.hub_id = hub_id
        lines = [f"FLUX weights not found at {location!r}."]
        if self.missing:
            lines.append("Missing: " + "; ".join(self.missing) + ".")
        if detail:
            lines.append(f"({detail})")
        target = location if not _looks_like_hub_id(location) or os.path.isabs(location) else "/path/to/FLUX.1-dev"
        include = " ".join(f"--include '{pattern}'" for pattern in _DOWNLOAD_PATTERNS)
        lines += [
            f"Download {hub_id} (gated: accept its licence on https://huggingface.co/{hub_id} and run "
            "`hf auth login` first), only the diffusers subfolders:",
            f"    hf download {hub_id} --local-dir {target} {include}",
            "and pass that folder as the model path. Expected layout:",
            layout,
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


def _resolve_local(path_or_hub_id: str, local_files_only: bool | None) -> tuple[str, bool]:
    """``(location, is_local_folder)``; an offline hub id becomes its cached snapshot folder."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists() or not _looks_like_hub_id(path_or_hub_id):
        return str(path.resolve()), True
    if not (local_files_only or (local_files_only is None and is_offline())):
        return path_or_hub_id, False
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_hub_id, local_files_only=True), True
    except Exception as err:  # noqa: BLE001 - any hub failure means "not downloaded"
        raise ModelFilesNotFoundError(
            path_or_hub_id, ["the whole model (not in the local hub cache; offline)"],
            detail=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
        ) from None


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_flux_adapter(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    *,
    vae_dtype: torch.dtype | None = None,
    text_encoders: Literal["load", "lazy", "none"] = "lazy",
    load_transformer: bool = True,
    load_vae: bool = True,
    local_files_only: bool | None = None,
    revision: str | None = None,
    **adapter_kwargs: Any,
):
    """Build a :class:`~branchgrpo.models.flux.FluxAdapter` from pretrained FLUX weights.

    Args:
        path_or_hub_id: a diffusers-layout folder (see ``FLUX_LAYOUT_TEXT``) or a hub id such as
            ``black-forest-labs/FLUX.1-dev``.
        dtype: weights dtype of the transformer and text encoders (bfloat16 for FLUX.1-dev).
        device: where the modules go (default: stay on CPU).
        vae_dtype: VAE weights dtype (default ``dtype``).
        text_encoders: ``"load"`` now; ``"lazy"`` on the first prompt not in the cache (tokenizers
            and configs are read now, for the cache identity); ``"none"`` never (cache only).
        load_transformer, load_vae: skip parts a job does not need (e.g. prompt preprocessing).
        local_files_only: ``None`` = only for folders or when the hub is offline.
        adapter_kwargs: passed to ``FluxAdapter`` (max_sequence_length, guidance_scale, height, …).
    Raises:
        ModelFilesNotFoundError: a folder lacks files, or a hub id cannot be fetched.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from huggingface_hub.errors import EntryNotFoundError
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from branchgrpo.models.flux import FluxAdapter, flux_encoder_config

    if text_encoders not in ("load", "lazy", "none"):
        raise ValueError(f"text_encoders must be 'load', 'lazy' or 'none', got {text_encoders!r}")
    requested = str(path_or_hub_id)
    location, is_local = _resolve_local(requested, local_files_only)
    needed = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"]
    needed += ["transformer"] * load_transformer + ["vae"] * load_vae
    if is_local:
        absent = missing_files(location, needed)
        if absent:
            raise ModelFilesNotFoundError(location if Path(requested).exists() else requested, absent)
    common = {"local_files_only": True} if is_local else {"local_files_only": bool(local_files_only)}
    if revision is not None:
        common["revision"] = revision
    weights = {**common, "use_safetensors": True}
    device = torch.device(device) if device is not None else None

    def place(module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(device) if device is not None else module
        return module.eval().requires_grad_(False)

    def load_text_encoders():
        clip = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", **weights, **_dtype_kwarg(dtype))
        t5 = T5EncoderModel.from_pretrained(location, subfolder="text_encoder_2", **weights, **_dtype_kwarg(dtype))
        return place(clip), place(t5)

    try:
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **common)
        tokenizer_2 = T5TokenizerFast.from_pretrained(location, subfolder="tokenizer_2", **common)
        clip_config = CLIPTextConfig.from_pretrained(location, subfolder="text_encoder", **common)
        t5_config = T5Config.from_pretrained(location, subfolder="text_encoder_2", **common)
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = flux_encoder_config(clip_config, t5_config, tokenizer, tokenizer_2, max_sequence_length, dtype)
        text_encoder = text_encoder_2 = None
        if text_encoders == "load":
            text_encoder, text_encoder_2 = load_text_encoders()
        transformer = vae = None
        if load_transformer:
            transformer = place(FluxTransformer2DModel.from_pretrained(
                location, subfolder="transformer", torch_dtype=dtype, **weights))
        if load_vae:
            vae = place(AutoencoderKL.from_pretrained(
                location, subfolder="vae", torch_dtype=vae_dtype or dtype, **weights))
    except (OSError, EntryNotFoundError) as err:  # what the hub and from_pretrained raise for absent files
        if isinstance(err, ModelFilesNotFoundError):
            raise
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelFilesNotFoundError(requested, needed if not is_local else [],
                                      detail=f"{type(err).__name__}: {first_line}") from None
    return FluxAdapter(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        source=location if Path(requested).expanduser().exists() else requested,  # hub id stays a hub id
        max_sequence_length=max_sequence_length,
        device=device,
        text_encoder_loader=load_text_encoders if text_encoders == "lazy" else None,
        encoder_config=encoder_config,
        **adapter_kwargs,
    )


__all__ = [
    "FLUX_DEV_HUB_ID",
    "FLUX_LAYOUT",
    "FLUX_LAYOUT_TEXT",
    "ModelFilesNotFoundError",
    "is_offline",
    "load_flux_adapter",
    "missing_files",
]
