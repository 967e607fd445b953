"""Stable Diffusion 3 / 3.5 as a model family: classifier-free guidance in one batched call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily, PolicyBundle, require_model_path


@dataclass
class SD3Options:
    """SD3.5 settings (Flow-GRPO's: 512², CFG 4.5, 128 T5 tokens)."""

    height: int = 512  # image size in pixels, a multiple of 16
    width: int = 512  # image width in pixels, a multiple of 16
    guidance_scale: float = 4.5  # classifier-free guidance; <= 1 turns it off (one call instead of two rows)
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance
    max_sequence_length: int = 128  # T5 tokens (Flow-GRPO); the pipeline's default is 256

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ConfigError(f"model.options.{name}", f"SD3 images are a multiple of 16 pixels, got {value}")
        if self.max_sequence_length < 1:
            raise ConfigError("model.options.max_sequence_length", f"must be >= 1, got {self.max_sequence_length}")


class SD3Family(ModelFamily):
    name = "sd3"
    modality = "image"
    options_class = SD3Options
    prompt_cache = True
    path_example = hub_repo = "stabilityai/stable-diffusion-3.5-medium"
    gated = True
    # load_sd3_adapter with its default load_t5=True (the family never turns T5 off)
    text_parts = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3")
    model_parts = ("transformer", "vae")
    download = ("model_index.json", "scheduler", "transformer", "vae", "text_encoder", "text_encoder_2",
                "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    description = "Stable Diffusion 3/3.5 (SD3Transformer2DModel + CLIP-L/G, T5), classifier-free guidance"

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.models.sd3 import SD3Adapter

        path = require_model_path(config, self.name, "stabilityai/stable-diffusion-3.5-medium")
        opts, model = self.options(config), config.model
        adapter = SD3Adapter.from_pretrained(
            path, dtype=dtype, device=device, vae_dtype=torch.float32,
            height=opts.height, width=opts.width, guidance_scale=opts.guidance_scale,
            negative_prompt=opts.negative_prompt, prompt_cache_dir=model.prompt_cache_dir,
            max_sequence_length=opts.max_sequence_length, decode_batch_size=model.decode_batch,
        )
        return PolicyBundle(
            family=self.name, policy=adapter.velocity_model(), trainable=adapter.transformer,
            latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
            decode=adapter.decode, modality="image", adapter=adapter,
        )

    def prompt_encoder(self, config, device: torch.device, dtype: torch.dtype):
        from branchgrpo.models.sd3 import load_sd3_adapter

        path = require_model_path(config, self.name, "stabilityai/stable-diffusion-3.5-medium")
        opts = self.options(config)
        return load_sd3_adapter(path, dtype=dtype, device=device, load_transformer=False, load_vae=False,
                                text_encoders="load", max_sequence_length=opts.max_sequence_length,
                                prompt_cache_dir=config.model.prompt_cache_dir, negative_prompt=opts.negative_prompt)

    def export(self, bundle: PolicyBundle, config, out: Path, link: str) -> str:
        from branchgrpo.models.export import export_full

        path = export_full(bundle.policy.transformer, config.model.path, out, link=link)
        return f"wrote pipeline folder {path}; load it with DiffusionPipeline.from_pretrained({str(path)!r})"
