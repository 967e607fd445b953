"""HunyuanVideo 1.5 text-to-video as a model family: videos ``[B, F, C, H, W]``, classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily, PolicyBundle, require_model_path

_HUB_EXAMPLE = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"


@dataclass
class HunyuanVideo15Options:
    """HunyuanVideo 1.5 T2V settings (the authors' 480p: 480×848, CFG 6.0; shorter videos for training)."""

    height: int = 480  # pixels, a multiple of 16 (VAE 16 × patch 1); 480p is the pipeline's 16:9 bucket 480×848
    width: int = 848  # pixels, a multiple of 16
    # 4k + 1: the VAE codes frame 0 alone, then 4 frames per latent frame (the pipeline's default is 121)
    num_frames: int = 33
    guidance_scale: float = 6.0  # classifier-free guidance (the T2V guider's 6.0); 1 turns it off
    negative_prompt: str = ""  # the unconditional prompt ("" is what the pipeline encodes for None)
    # Qwen2.5-VL tokens after the chat template (the pipeline's 1000); fewer cost less and change nothing
    # for prompts that fit (padding is masked out)
    max_sequence_length: int = 1000
    glyph_max_length: int = 256  # ByT5 tokens of the prompt's quoted text (the pipeline's 256)

    def __post_init__(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ConfigError("model.options.num_frames", "HunyuanVideo 1.5 videos have 4k + 1 frames (1, 5, ..., "
                              f"33, ..., 121), got {self.num_frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ConfigError(f"model.options.{name}", f"HunyuanVideo 1.5 frames are a multiple of 16 pixels, "
                                  f"got {value}")
        if self.guidance_scale < 1.0:
            raise ConfigError("model.options.guidance_scale", f"must be >= 1 (1 turns guidance off), got "
                              f"{self.guidance_scale}")
        for name in ("max_sequence_length", "glyph_max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.options.{name}", f"must be >= 1, got {getattr(self, name)}")


class HunyuanVideo15Family(ModelFamily):
    name = "hunyuanvideo15"
    modality = "video"
    options_class = HunyuanVideo15Options
    prompt_cache = True
    path_example = hub_repo = _HUB_EXAMPLE
    text_parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")  # load_hunyuanvideo15_adapter
    model_parts = ("transformer", "vae")
    download = ("model_index.json", "scheduler", "guider", "transformer", "vae", "text_encoder", "text_encoder_2",
                "tokenizer", "tokenizer_2")
    description = ("HunyuanVideo 1.5 text-to-video (HunyuanVideo15Transformer3DModel + Qwen2.5-VL, glyph-ByT5), "
                   "classifier-free guidance")

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.models.hunyuanvideo15 import HunyuanVideo15Adapter

        path = require_model_path(config, self.name, _HUB_EXAMPLE)
        opts, model = self.options(config), config.model
        adapter = HunyuanVideo15Adapter.from_pretrained(
            path, dtype=dtype, device=device, vae_dtype=torch.float32, height=opts.height, width=opts.width,
            num_frames=opts.num_frames, guidance_scale=opts.guidance_scale, negative_prompt=opts.negative_prompt,
            prompt_cache_dir=model.prompt_cache_dir, max_sequence_length=opts.max_sequence_length,
            glyph_max_length=opts.glyph_max_length,
        )
        if model.lora is None:  # full fine-tuning (loading froze the transformer; add_lora freezes the base)
            adapter.transformer.requires_grad_(True)
        return PolicyBundle(
            family=self.name, policy=adapter.velocity_model(), trainable=adapter.transformer,
            latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
            decode=adapter.decode, modality="video", adapter=adapter,
        )

    def lora_target_modules(self, bundle: PolicyBundle) -> list[str]:
        """The attention projections (image and text streams of every block, and the token refiner's)."""
        from branchgrpo.models.lora import DEFAULT_TARGET_MODULES

        return list(DEFAULT_TARGET_MODULES)

    def prompt_encoder(self, config, device: torch.device, dtype: torch.dtype):
        from branchgrpo.models.hunyuanvideo15 import load_hunyuanvideo15_adapter

        path = require_model_path(config, self.name, _HUB_EXAMPLE)
        opts = self.options(config)
        return load_hunyuanvideo15_adapter(
            path, dtype=dtype, device=device, load_transformer=False, load_vae=False, text_encoders="load",
            max_sequence_length=opts.max_sequence_length, glyph_max_length=opts.glyph_max_length,
            prompt_cache_dir=config.model.prompt_cache_dir, negative_prompt=opts.negative_prompt)

    def export(self, bundle: PolicyBundle, config, out: Path, link: str) -> str:
        from branchgrpo.models.export import export_full

        path = export_full(bundle.adapter.transformer, config.model.path, out, link=link)
        return f"wrote pipeline folder {path}; load it with HunyuanVideo15Pipeline.from_pretrained({str(path)!r})"

    def export_lora(self, bundle: PolicyBundle, config, out: Path) -> str:
        from branchgrpo.models.hunyuanvideo15 import export_hunyuanvideo15_lora

        target = out if out.suffix == ".safetensors" else out / "lora.safetensors"
        path = export_hunyuanvideo15_lora(bundle.adapter.transformer, target)
        return (f"wrote LoRA {path}; HunyuanVideo15Pipeline has no load_lora_weights in diffusers 0.42: load it with "
                f"branchgrpo.models.hunyuanvideo15.load_hunyuanvideo15_lora(pipe.transformer, {str(path)!r})")
