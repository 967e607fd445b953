"""Loading Wan2.2 (T2V-A14B, TI2V-5B) from a diffusers-layout folder or the hub:
:func:`load_wan22_adapter`. Re-exported by :mod:`branchgrpo.models.wan22`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns
from branchgrpo.models.wan import wan_encoder_config

if TYPE_CHECKING:
    from branchgrpo.models.wan22 import Wan22Adapter

WAN22_T2V_A14B_HUB_ID = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
WAN22_TI2V_5B_HUB_ID = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"

WAN22_LAYOUT = diffusers_layout(["transformer", "transformer_2", "vae", "text_encoder"],
                                {"tokenizer": ("tokenizer.json", "spiece.model")})

WAN22_LAYOUT_TEXT = """\
  <folder>/
    model_index.json  (WanPipeline; boundary_ratio 0.875 for T2V-A14B, expand_timesteps true for TI2V-5B)
    scheduler/        scheduler_config.json          (UniPCMultistepScheduler; not used)
    transformer/      config.json, diffusion_pytorch_model*.safetensors   (WanTransformer3DModel: high-noise expert)
    transformer_2/    config.json, diffusion_pytorch_model*.safetensors   (low-noise expert; T2V-A14B only)
    vae/              config.json, diffusion_pytorch_model.safetensors     (AutoencoderKLWan; z_dim 48 for TI2V-5B)
    text_encoder/     config.json, model*.safetensors (+ model.safetensors.index.json)   (UMT5-XXL encoder)
    tokenizer/        spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json"""


class Wan22FilesNotFoundError(ModelFilesNotFoundError):
    """Wan2.2 weights or configs are missing (a ``ModelFilesNotFoundError``; its family is :data:`WAN22_FILES`)."""


WAN22_FILES = ModelFiles(
    title="Wan2.2", hub_id=WAN22_T2V_A14B_HUB_ID, layout=WAN22_LAYOUT, layout_text=WAN22_LAYOUT_TEXT,
    download_patterns=download_patterns(WAN22_LAYOUT), placeholder="/path/to/Wan2.2-T2V-A14B-Diffusers",
    gated=False, error_class=Wan22FilesNotFoundError,
)


def read_model_index(path_or_hub_id: str | os.PathLike, *, local_files_only: bool | None = None,
                     revision: str | None = None) -> dict[str, Any]:
    """The folder's ``model_index.json`` (a hub id: through the hub cache), or a :class:`Wan22FilesNotFoundError`."""
    from branchgrpo.models.loading import _resolve_local

    location, is_local = _resolve_local(str(path_or_hub_id), local_files_only, WAN22_FILES)
    if is_local:
        index = Path(location) / "model_index.json"
        if not index.is_file():
            missing = ["model_index.json"] if Path(location).is_dir() else [f"the folder {location} itself"]
            raise WAN22_FILES.error(location if Path(location).exists() else str(path_or_hub_id), missing)
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(location, "model_index.json", revision=revision))
        except Exception as err:  # noqa: BLE001 - any hub failure: the file is not reachable
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise WAN22_FILES.error(str(path_or_hub_id), ["model_index.json"],
                                    detail=f"{type(err).__name__}: {first_line}") from None
    try:
        return json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise WAN22_FILES.error(str(path_or_hub_id), [f"model_index.json (unreadable: {err})"]) from None


def _is_component(entry: Any) -> bool:
    """A model_index entry names a component (``["diffusers", "WanTransformer3DModel"]``), not ``[null, null]``."""
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def load_wan22_adapter(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    *,
    vae_dtype: torch.dtype = torch.float32,
    text_encoders: Literal["load", "lazy", "none"] = "lazy",
    load_transformer: bool = True,
    load_vae: bool = True,
    boundary_ratio: float | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
    **adapter_kwargs: Any,
) -> Wan22Adapter:
    """Build a :class:`Wan22Adapter` from a Wan2.2 diffusers folder or hub id (T2V-A14B or TI2V-5B).

    ``model_index.json`` decides the structure: ``transformer_2`` listed → two experts switched at
    its ``boundary_ratio`` (``boundary_ratio=`` overrides it); ``expand_timesteps`` → per-token
    timesteps (TI2V-5B). Other arguments as :func:`branchgrpo.models.wan.load_wan_adapter`;
    ``adapter_kwargs`` go to :class:`Wan22Adapter` (sizes, guidance_scale, guidance_scale_2, …).

    Raises:
        Wan22FilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from branchgrpo.models.wan22 import Wan22Adapter  # (it imports this module)

    index = read_model_index(path_or_hub_id, local_files_only=local_files_only, revision=revision)
    two_experts = _is_component(index.get("transformer_2"))
    if boundary_ratio is None:
        boundary_ratio = index.get("boundary_ratio")
    if two_experts and boundary_ratio is None:
        raise WAN22_FILES.error(str(path_or_hub_id), [], detail="model_index.json lists transformer_2 but no "
                                "boundary_ratio; pass boundary_ratio=")
    experts = ["transformer", "transformer_2"] if two_experts else ["transformer"]
    needed = ["tokenizer", "text_encoder"] + experts * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, WAN22_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)

    with folder.errors():
        tokenizer = folder.config(AutoTokenizer, "tokenizer")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = wan_encoder_config(folder.config(UMT5Config, "text_encoder"), tokenizer,
                                            max_sequence_length, dtype)
    return build_adapter(
        folder, Wan22Adapter, dtype=dtype, text_encoders={"text_encoder": UMT5EncoderModel},
        models={**{name: (WanTransformer3DModel, dtype) if load_transformer else None for name in experts},
                "vae": (AutoencoderKLWan, vae_dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer,
        boundary_ratio=boundary_ratio if two_experts else None,
        expand_timesteps=bool(index.get("expand_timesteps", False)), **adapter_kwargs,
    )
