"""Qwen-Image-Edit as a model family: instruction editing, one source image per training row.

Rows are JSONL lines ``{"prompt": "<instruction>", "image": "<path>"}`` in ``data.train_prompts`` /
``data.heldout_prompts`` (relative image paths are read from the file's folder). The trainer treats
each line as the row's prompt (sampling, checkpoints); this family reads the same files in ``build``
and ``check`` to know every row's source image. Rewards are given the line too, so a reward can see
the instruction and the source (``branchgrpo.models.qwenimage_edit.parse_edit_row``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily, PolicyBundle, require_model_path
from branchgrpo.families.qwenimage import QWENIMAGE_TARGET_MODULES

QWEN_IMAGE_EDIT_EXAMPLE = "Qwen/Qwen-Image-Edit"


@dataclass
class QwenImageEditOptions:
    """Qwen-Image-Edit settings (the model card's: true CFG 4.0 with the negative prompt " "; the
    pipeline sees the source at ~1024² pixels and, by default, renders at that size)."""

    height: int = 1024  # edited image height in pixels, a multiple of 16 (the pipeline's default for a square source)
    width: int = 1024  # edited image width in pixels, a multiple of 16
    condition_area: int = 1048576  # pixels of the source image as the model sees it (the pipeline's 1024 * 1024)
    guidance_scale: float = 4.0  # true classifier-free guidance (the pipeline's true_cfg_scale); <= 1 turns it off
    negative_prompt: str = " "  # the unconditional prompt of true CFG, encoded with each row's source image

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ConfigError(f"model.options.{name}", f"Qwen-Image sizes are a multiple of 16 pixels, got {value}")
        if self.condition_area < 32 * 32:
            raise ConfigError("model.options.condition_area",
                              f"must be at least 1024 pixels, got {self.condition_area}")
        if self.guidance_scale <= 0:
            raise ConfigError("model.options.guidance_scale",
                              f"must be > 0 (<= 1 turns guidance off), got {self.guidance_scale}")


def edit_row_problems(config) -> list[ConfigError]:
    """What is wrong in the edit rows of ``data.train_prompts`` and ``data.heldout_prompts`` (a file
    that is missing is left to the job's file checks); shared by the editing families."""
    from branchgrpo.models.qwenimage_edit import read_edit_rows

    problems = []
    for field in ("train_prompts", "heldout_prompts"):
        path = getattr(config.data, field)
        if path is None or not Path(path).is_file():
            continue
        try:
            read_edit_rows(path, f"data.{field}")
        except ConfigError as err:
            problems.append(err)
    return problems


def data_rows(config) -> dict:
    """Every edit row of ``data.train_prompts`` and ``data.heldout_prompts`` (``ConfigError`` on a bad line)."""
    from branchgrpo.models.qwenimage_edit import read_edit_rows

    rows = {}
    for field in ("train_prompts", "heldout_prompts"):
        path = getattr(config.data, field)
        if path is not None:
            rows.update(read_edit_rows(path, f"data.{field}"))
    return rows


class QwenImageEditFamily(ModelFamily):
    name = "qwenimage-edit"
    modality = "image"
    options_class = QwenImageEditOptions
    prompt_cache = True
    path_example = hub_repo = QWEN_IMAGE_EDIT_EXAMPLE
    editing = True  # prompts are edit rows (instruction + source image): `branchgrpo sample --image`
    text_parts = ("tokenizer", "processor", "text_encoder")  # load_qwenimage_edit_adapter
    model_parts = ("transformer", "vae")
    download = ("model_index.json", "scheduler", "transformer", "vae", "text_encoder", "tokenizer", "processor")
    description = ("Qwen-Image-Edit (instruction + source image per JSONL row; QwenImageTransformer2DModel + "
                   "Qwen2.5-VL), true classifier-free guidance")

    def check(self, config) -> list[ConfigError]:
        """The base checks and every row of both data files (a missing file is :func:`validate_job`'s line)."""
        return super().check(config) + edit_row_problems(config)

    def _adapter_kwargs(self, config) -> dict:
        opts = self.options(config)
        return dict(height=opts.height, width=opts.width, guidance_scale=opts.guidance_scale,
                    negative_prompt=opts.negative_prompt, condition_area=opts.condition_area,
                    prompt_cache_dir=config.model.prompt_cache_dir, rows=data_rows(config))

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.models.qwenimage_edit import QwenImageEditAdapter

        path = require_model_path(config, self.name, QWEN_IMAGE_EDIT_EXAMPLE)
        adapter = QwenImageEditAdapter.from_pretrained(path, dtype=dtype, device=device, vae_dtype=torch.float32,
                                                       decode_batch_size=config.model.decode_batch,
                                                       **self._adapter_kwargs(config))
        return PolicyBundle(
            family=self.name, policy=adapter.velocity_model(), trainable=adapter.transformer,
            latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
            decode=adapter.decode, modality="image", adapter=adapter,
        )

    def lora_target_modules(self, bundle: PolicyBundle) -> list[str]:
        return list(QWENIMAGE_TARGET_MODULES)

    def prompt_encoder(self, config, device: torch.device, dtype: torch.dtype):
        """The text encoder and the processor, for ``branchgrpo preprocess`` (the source images are read
        at their condition size; no VAE: their latents are not cached)."""
        from branchgrpo.models.qwenimage_edit import load_qwenimage_edit_adapter

        path = require_model_path(config, self.name, QWEN_IMAGE_EDIT_EXAMPLE)
        return load_qwenimage_edit_adapter(path, dtype=dtype, device=device, load_transformer=False, load_vae=False,
                                           text_encoders="load", **self._adapter_kwargs(config))

    def export(self, bundle: PolicyBundle, config, out: Path, link: str) -> str:
        from branchgrpo.models.export import export_full

        path = export_full(bundle.policy.transformer, config.model.path, out, link=link)
        return f"wrote pipeline folder {path}; load it with QwenImageEditPipeline.from_pretrained({str(path)!r})"
