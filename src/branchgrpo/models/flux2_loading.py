"""Loading FLUX.2 ([dev], [klein]) from a diffusers-layout folder or the hub:
:func:`load_flux2_adapter`. Re-exported by :mod:`branchgrpo.models.flux2`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

import torch

from branchgrpo.models.flux2_text import PIPELINE_CLASSES, Variant, _check_variant, flux2_encoder_config
from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns

if TYPE_CHECKING:
    from branchgrpo.models.flux2 import Flux2Adapter

FLUX2_DEV_HUB_ID = "black-forest-labs/FLUX.2-dev"
FLUX2_KLEIN_HUB_ID = "black-forest-labs/FLUX.2-klein-base-4B"

FLUX2_LAYOUT = diffusers_layout(["transformer", "vae", "text_encoder"],
                                {"tokenizer": ("tokenizer.json", "vocab.json")})

FLUX2_LAYOUT_TEXT = """\
  <folder>/
    model_index.json                                              (Flux2Pipeline)
    scheduler/        scheduler_config.json                       (FlowMatchEulerDiscreteScheduler, dynamic shift)
    transformer/      config.json, diffusion_pytorch_model-*.safetensors + index   (Flux2Transformer2DModel, 32 B)
    vae/              config.json, diffusion_pytorch_model.safetensors            (AutoencoderKLFlux2)
    text_encoder/     config.json, model-*.safetensors + index    (Mistral3ForConditionalGeneration, 24 B)
    tokenizer/        tokenizer.json, tokenizer_config.json, processor_config.json, ...  (PixtralProcessor)"""

FLUX2_KLEIN_LAYOUT_TEXT = """\
  <folder>/
    model_index.json                                              (Flux2KleinPipeline, is_distilled)
    scheduler/        scheduler_config.json                       (FlowMatchEulerDiscreteScheduler, dynamic shift)
    transformer/      config.json, diffusion_pytorch_model*.safetensors   (Flux2Transformer2DModel, no guidance)
    vae/              config.json, diffusion_pytorch_model.safetensors    (AutoencoderKLFlux2)
    text_encoder/     config.json, model*.safetensors             (Qwen3ForCausalLM)
    tokenizer/        vocab.json, merges.txt, tokenizer.json, tokenizer_config.json  (Qwen2Tokenizer)"""


class Flux2FilesNotFoundError(ModelFilesNotFoundError):
    """FLUX.2 weights or configs are missing (a ``ModelFilesNotFoundError``; see :data:`FLUX2_FILES`)."""


class Flux2KleinFilesNotFoundError(Flux2FilesNotFoundError):
    """FLUX.2 [klein] weights or configs are missing (see :data:`FLUX2_KLEIN_FILES`)."""


FLUX2_FILES = ModelFiles(
    title="FLUX.2 [dev]", hub_id=FLUX2_DEV_HUB_ID, layout=FLUX2_LAYOUT, layout_text=FLUX2_LAYOUT_TEXT,
    download_patterns=download_patterns(FLUX2_LAYOUT), placeholder="/path/to/FLUX.2-dev",
    error_class=Flux2FilesNotFoundError,
)
FLUX2_KLEIN_FILES = ModelFiles(
    title="FLUX.2 [klein]", hub_id=FLUX2_KLEIN_HUB_ID, layout=FLUX2_LAYOUT, layout_text=FLUX2_KLEIN_LAYOUT_TEXT,
    download_patterns=download_patterns(FLUX2_LAYOUT), placeholder="/path/to/FLUX.2-klein-base-4B",
    gated=False, error_class=Flux2KleinFilesNotFoundError,
)


def _model_index(folder: PretrainedFolder) -> dict[str, Any]:
    """The folder's ``model_index.json`` (``{}`` when a local folder has none)."""
    if folder.is_local:
        path = Path(folder.location) / "model_index.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(folder.location, "model_index.json", **folder.common)).read_text())


def _variant_of(index: Mapping[str, Any]) -> str | None:
    name = index.get("_class_name")
    return next((v for v, cls in PIPELINE_CLASSES.items() if cls == name), None)


def load_flux2_adapter(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    *,
    variant: Variant | None = None,
    vae_dtype: torch.dtype | None = None,
    text_encoders: Literal["load", "lazy", "none"] = "lazy",
    load_transformer: bool = True,
    load_vae: bool = True,
    local_files_only: bool | None = None,
    revision: str | None = None,
    **adapter_kwargs: Any,
) -> Flux2Adapter:
    """Build a :class:`Flux2Adapter` from pretrained FLUX.2 weights (diffusers layout).

    Args:
        path_or_hub_id: a diffusers-layout folder (see ``FLUX2_LAYOUT_TEXT``) or a hub id such as
            ``black-forest-labs/FLUX.2-dev`` / ``black-forest-labs/FLUX.2-klein-base-4B``.
        variant: ``"dev"`` or ``"klein"``; ``None`` reads it from ``model_index.json``. A folder
            holding the other pipeline is an error.
        dtype: weights dtype of the transformer and text encoder.
        vae_dtype: VAE weights dtype (default ``dtype``).
        text_encoders: ``"load"`` now; ``"lazy"`` on the first prompt not in the cache (config and
            tokenizer are read now, for the cache identity); ``"none"`` never (cache only).
        load_transformer, load_vae: skip parts a job does not need.
        local_files_only: ``None`` = only for folders or when the hub is offline.
        adapter_kwargs: passed to :class:`Flux2Adapter` (max_sequence_length, guidance_scale, …).
    Raises:
        Flux2FilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from branchgrpo.models.flux2 import Flux2Adapter  # noqa: F811  (it imports this module)
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Mistral3ForConditionalGeneration
    from transformers import Qwen3ForCausalLM

    if variant is not None:
        _check_variant(variant)
    guess = variant or ("klein" if "klein" in str(path_or_hub_id).lower() else "dev")
    files = FLUX2_KLEIN_FILES if guess == "klein" else FLUX2_FILES
    needed = ["tokenizer", "text_encoder"] + ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, files, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)
    with folder.errors():
        index = _model_index(folder)
    found = _variant_of(index)
    if variant is not None and found is not None and found != variant:
        family = "flux2-klein" if found == "klein" else "flux2"
        raise ValueError(f"{folder.source} holds a {index['_class_name']} (FLUX.2 [{found}]), not FLUX.2 [{variant}]; "
                         f"use model.family={family}")
    variant = variant or found or guess
    encoder_cls = Mistral3ForConditionalGeneration if variant == "dev" else Qwen3ForCausalLM

    with folder.errors():
        tokenizer = folder.config(AutoProcessor if variant == "dev" else AutoTokenizer, "tokenizer")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = flux2_encoder_config(
            variant, folder.config(AutoConfig, "text_encoder"), tokenizer, max_sequence_length, dtype,
            adapter_kwargs.get("text_encoder_out_layers"),
        )
    return build_adapter(
        folder, Flux2Adapter, dtype=dtype, text_encoders={"text_encoder": encoder_cls},
        models={"transformer": (Flux2Transformer2DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKLFlux2, vae_dtype or dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer,
        variant=variant, is_distilled=bool(index.get("is_distilled", False)), **adapter_kwargs,
    )
