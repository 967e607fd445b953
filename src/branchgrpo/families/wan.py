"""Wan2.1 text-to-video as a model family: videos ``[B, F, C, H, W]``, classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily, PolicyBundle, require_model_path


@dataclass
class WanOptions:
    """Wan2.1 T2V settings (WanPipeline's defaults: 480×832, guidance 5.0)."""

    height: int = 480  # pixels, a multiple of 16 (VAE 8 × patch 2)
    width: int = 832  # pixels, a multiple of 16
    num_frames: int = 33  # 4k + 1: the VAE codes frame 0 alone, then 4 frames per latent frame
    guidance_scale: float = 5.0  # classifier-free guidance; <= 1 turns it off
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance
    max_sequence_length: int = 512  # UMT5 tokens

    def __post_init__(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ConfigError("model.options.num_frames",
                              f"Wan videos have 4k + 1 frames (1, 5, ..., 33, ..., 81), got {self.num_frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ConfigError(f"model.options.{name}", f"Wan frames are a multiple of 16 pixels, got {value}")
        if self.max_sequence_length < 1:
            raise ConfigError("model.options.max_sequence_length", f"must be >= 1, got {self.max_sequence_length}")


class WanFamily(ModelFamily):
    name = "wan"
    modality = "video"
    options_class = WanOptions
    prompt_cache = True
    path_example = hub_repo = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    text_parts = ("tokenizer", "text_encoder")  # load_wan_adapter
    model_parts = ("transformer", "vae")
    download = ("model_index.json", "scheduler", "transformer", "vae", "text_encoder", "tokenizer")
    description = "Wan2.1 text-to-video (WanTransformer3DModel + UMT5), classifier-free guidance"

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.models.wan import WanAdapter

        path = require_model_path(config, self.name, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        opts, model = self.options(config), config.model
        adapter = WanAdapter.from_pretrained(
            path, dtype=dtype, device=device, vae_dtype=torch.float32,
            height=opts.height, width=opts.width, num_frames=opts.num_frames,
            guidance_scale=opts.guidance_scale, negative_prompt=opts.negative_prompt,
            prompt_cache_dir=model.prompt_cache_dir, max_sequence_length=opts.max_sequence_length,
            decode_batch_size=model.decode_batch,
        )
        return PolicyBundle(
            family=self.name, policy=adapter.velocity_model(), trainable=adapter.transformer,
            latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
            decode=adapter.decode, modality="video", adapter=adapter,
        )

    def prompt_encoder(self, config, device: torch.device, dtype: torch.dtype):
        from branchgrpo.models.wan import load_wan_adapter

        path = require_model_path(config, self.name, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        opts = self.options(config)
        return load_wan_adapter(path, dtype=dtype, device=device, load_transformer=False, load_vae=False,
                                text_encoders="load", max_sequence_length=opts.max_sequence_length,
                                prompt_cache_dir=config.model.prompt_cache_dir, negative_prompt=opts.negative_prompt)

    def export(self, bundle: PolicyBundle, config, out: Path, link: str) -> str:
        from branchgrpo.models.export import export_full

        path = export_full(bundle.policy.transformer, config.model.path, out, link=link)
        return f"wrote pipeline folder {path}; load it with DiffusionPipeline.from_pretrained({str(path)!r})"
