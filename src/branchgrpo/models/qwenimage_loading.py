"""Loading Qwen-Image from a diffusers-layout folder or the hub: :func:`load_qwenimage_adapter`.
Re-exported by :mod:`branchgrpo.models.qwenimage`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

import torch

from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns

if TYPE_CHECKING:
    from branchgrpo.models.qwenimage import QwenImageAdapter

QWEN_IMAGE_HUB_ID = "Qwen/Qwen-Image"

QWEN_IMAGE_LAYOUT = diffusers_layout(["transformer", "vae", "text_encoder"],
                                     {"tokenizer": ("tokenizer.json", "vocab.json")})

QWEN_IMAGE_LAYOUT_TEXT = """\
  <folder>/
    model_index.json
    scheduler/        scheduler_config.json         (FlowMatchEulerDiscreteScheduler, dynamic shift; not used)
    transformer/      config.json, diffusion_pytorch_model-000{01..09}-of-00009.safetensors,
                      diffusion_pytorch_model.safetensors.index.json       (QwenImageTransformer2DModel)
    vae/              config.json, diffusion_pytorch_model.safetensors     (AutoencoderKLQwenImage)
    text_encoder/     config.json, model-0000{1..4}-of-00004.safetensors,
                      model.safetensors.index.json                         (Qwen2.5-VL-7B-Instruct)
    tokenizer/        vocab.json, merges.txt, tokenizer_config.json, ...   (Qwen2Tokenizer)"""


class QwenImageFilesNotFoundError(ModelFilesNotFoundError):
    """Qwen-Image weights or configs are missing (a ``ModelFilesNotFoundError``; its family is
    :data:`QWEN_IMAGE_FILES`)."""


QWEN_IMAGE_FILES = ModelFiles(
    title="Qwen-Image", hub_id=QWEN_IMAGE_HUB_ID, layout=QWEN_IMAGE_LAYOUT, layout_text=QWEN_IMAGE_LAYOUT_TEXT,
    download_patterns=download_patterns(QWEN_IMAGE_LAYOUT), placeholder="/path/to/Qwen-Image",
    gated=False, error_class=QwenImageFilesNotFoundError,
)


def load_qwenimage_adapter(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    *,
    vae_dtype: torch.dtype = torch.float32,
    text_encoders: Literal["load", "lazy", "none"] = "lazy",
    load_transformer: bool = True,
    load_vae: bool = True,
    local_files_only: bool | None = None,
    revision: str | None = None,
    **adapter_kwargs: Any,
) -> QwenImageAdapter:
    """Build a :class:`QwenImageAdapter` from pretrained Qwen-Image weights (diffusers layout).

    Args:
        path_or_hub_id: a diffusers-layout folder (see ``QWEN_IMAGE_LAYOUT_TEXT``) or the hub id
            ``Qwen/Qwen-Image``.
        dtype: weights dtype of the transformer and the Qwen2.5-VL encoder.
        vae_dtype: VAE weights dtype (float32 by default).
        text_encoders: ``"load"`` now; ``"lazy"`` on the first prompt not in the cache (config and
            tokenizer are read now, for the cache identity); ``"none"`` never (cache only).
        load_transformer, load_vae: skip parts a job does not need.
        local_files_only: ``None`` = only for folders or when the hub is offline.
        adapter_kwargs: passed to :class:`QwenImageAdapter` (guidance_scale, negative_prompt, height, …).
    Raises:
        QwenImageFilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from branchgrpo.models.qwenimage import QwenImageAdapter, qwenimage_encoder_config  # (it imports this module)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    needed = ["tokenizer", "text_encoder"] + ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, QWEN_IMAGE_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)

    with folder.errors():
        tokenizer = folder.config(Qwen2Tokenizer, "tokenizer")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = qwenimage_encoder_config(folder.config(Qwen2_5_VLConfig, "text_encoder"), tokenizer,
                                                  max_sequence_length, dtype)
    return build_adapter(
        folder, QwenImageAdapter, dtype=dtype, text_encoders={"text_encoder": Qwen2_5_VLForConditionalGeneration},
        models={"transformer": (QwenImageTransformer2DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKLQwenImage, vae_dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer, **adapter_kwargs,
    )
