"""Z-Image / Z-Image-Turbo (Tongyi-MAI) as a model family: Qwen3 captions of variable length, Z-Image's guidance.

Guidance follows ``ZImagePipeline``: ``v = v_c + g·(v_c − v_u)``, on for ``g > 0``. The distilled
Z-Image-Turbo samples with ``g = 0`` (one transformer call per row); the base Z-Image with CFG
(its card: ``g = 4``, ``cfg_normalization=True``, a negative prompt). See ``branchgrpo.models.zimage``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily, PolicyBundle, require_model_path

_EXAMPLE = "Tongyi-MAI/Z-Image-Turbo"


@dataclass
class ZImageOptions:
    """Z-Image settings (defaults: Z-Image-Turbo's card, 1024², no guidance)."""

    height: int = 1024  # image height in pixels, a multiple of 16 (VAE 8 x patch 2)
    width: int = 1024  # image width in pixels, a multiple of 16
    guidance_scale: float = 0.0  # Z-Image's g in v_c + g*(v_c - v_u); 0 = off, one call (Turbo); base card: 4
    negative_prompt: str = ""  # the unconditional prompt when guidance_scale > 0
    cfg_normalization: float = 0.0  # > 0: cap each guided velocity's norm at this x the positive's (base card: true = 1.0)
    cfg_truncation: float = 1.0  # no guidance on steps with 1 - sigma above this; 1.0 = guidance on every step
    max_sequence_length: int = 512  # Qwen3 tokens per prompt, chat template included (ZImagePipeline's 512)

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ConfigError(f"model.options.{name}", f"Z-Image images are a multiple of 16 pixels, got {value}")
        for name in ("guidance_scale", "cfg_normalization", "cfg_truncation"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"model.options.{name}", f"must be a finite number >= 0, got {value}")
        if self.max_sequence_length < 1:
            raise ConfigError("model.options.max_sequence_length", f"must be >= 1, got {self.max_sequence_length}")


class ZImageFamily(ModelFamily):
    name = "zimage"
    modality = "image"
    options_class = ZImageOptions
    prompt_cache = True
    path_example = hub_repo = _EXAMPLE
    text_parts = ("tokenizer", "text_encoder")  # load_zimage_adapter
    model_parts = ("transformer", "vae")
    download = ("model_index.json", "scheduler", "transformer", "vae", "text_encoder", "tokenizer")
    description = "Z-Image / Z-Image-Turbo (ZImageTransformer2DModel + Qwen3), Z-Image's guidance (0 = off)"

    def _adapter_kwargs(self, config) -> dict:
        opts = self.options(config)
        return dict(guidance_scale=opts.guidance_scale, negative_prompt=opts.negative_prompt,
                    cfg_normalization=opts.cfg_normalization, cfg_truncation=opts.cfg_truncation,
                    max_sequence_length=opts.max_sequence_length, prompt_cache_dir=config.model.prompt_cache_dir)

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.models.zimage import ZImageAdapter

        path = require_model_path(config, self.name, _EXAMPLE)
        opts = self.options(config)
        adapter = ZImageAdapter.from_pretrained(
            path, dtype=dtype, device=device, vae_dtype=torch.float32, height=opts.height, width=opts.width,
            decode_batch_size=config.model.decode_batch, **self._adapter_kwargs(config),
        )
        return PolicyBundle(
            family=self.name, policy=adapter.velocity_model(), trainable=adapter.transformer,
            latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
            decode=adapter.decode, modality="image", adapter=adapter,
        )

    def lora_target_modules(self, bundle: PolicyBundle) -> list[str]:
        """The q/k/v/out projections of every block's ``attention`` (Z-Image has no ``attn.*``)."""
        from branchgrpo.models.zimage import ZIMAGE_TARGET_MODULES

        return list(ZIMAGE_TARGET_MODULES)

    def prompt_encoder(self, config, device: torch.device, dtype: torch.dtype):
        from branchgrpo.models.zimage import load_zimage_adapter

        path = require_model_path(config, self.name, _EXAMPLE)
        return load_zimage_adapter(path, dtype=dtype, device=device, load_transformer=False, load_vae=False,
                                   text_encoders="load", **self._adapter_kwargs(config))

    def export(self, bundle: PolicyBundle, config, out: Path, link: str) -> str:
        from diffusers import ZImagePipeline

        from branchgrpo.models.export import export_full

        path = export_full(bundle.policy.transformer, config.model.path, out, link=link, pipeline_class=ZImagePipeline)
        return f"wrote pipeline folder {path}; load it with ZImagePipeline.from_pretrained({str(path)!r})"
