"""Qwen-Image (text-to-image) as a model family: true classifier-free guidance with a norm-preserving
mix, Qwen2.5-VL prompts of any length (masked), a resolution-dependent schedule shift."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily, PolicyBundle, require_model_path

QWEN_IMAGE_EXAMPLE = "Qwen/Qwen-Image"

# LoRA targets: the q/k/v/out projections of both streams of every MMDiT block (image: to_*, text:
# add_*_proj / to_add_out), the same names as FLUX's and SD3's attention.
QWENIMAGE_TARGET_MODULES: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@dataclass
class QwenImageOptions:
    """Qwen-Image settings (the model card's: 1328×1328 for 1:1, true CFG 4.0 with the negative prompt " ")."""

    height: int = 1328  # image height in pixels, a multiple of 16 (VAE 8 × 2×2 packing); the model card's 1:1 size
    width: int = 1328  # image width in pixels, a multiple of 16 (16:9 in the model card: 1664 wide × 928 high)
    guidance_scale: float = 4.0  # true classifier-free guidance (the pipeline's true_cfg_scale); <= 1 turns it off
    negative_prompt: str = " "  # the unconditional prompt of true CFG (the model card's: one space)
    max_sequence_length: int = 512  # text tokens kept after the chat template (QwenImagePipeline: 512, at most 1024)

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ConfigError(f"model.options.{name}", f"Qwen-Image sizes are a multiple of 16 pixels, got {value}")
        if not 1 <= self.max_sequence_length <= 1024:
            raise ConfigError("model.options.max_sequence_length",
                              f"must be in [1, 1024] (QwenImagePipeline's limit), got {self.max_sequence_length}")
        if self.guidance_scale <= 0:
            raise ConfigError("model.options.guidance_scale",
                              f"must be > 0 (<= 1 turns guidance off), got {self.guidance_scale}")


class QwenImageFamily(ModelFamily):
    name = "qwenimage"
    modality = "image"
    options_class = QwenImageOptions
    prompt_cache = True
    path_example = hub_repo = QWEN_IMAGE_EXAMPLE
    text_parts = ("tokenizer", "text_encoder")  # load_qwenimage_adapter
    model_parts = ("transformer", "vae")
    download = ("model_index.json", "scheduler", "transformer", "vae", "text_encoder", "tokenizer")
    description = "Qwen-Image (QwenImageTransformer2DModel + Qwen2.5-VL), true classifier-free guidance"

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.models.qwenimage import QwenImageAdapter

        path = require_model_path(config, self.name, QWEN_IMAGE_EXAMPLE)
        opts, model = self.options(config), config.model
        adapter = QwenImageAdapter.from_pretrained(
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

    def lora_target_modules(self, bundle: PolicyBundle) -> list[str]:
        return list(QWENIMAGE_TARGET_MODULES)

    def prompt_encoder(self, config, device: torch.device, dtype: torch.dtype):
        from branchgrpo.models.qwenimage import load_qwenimage_adapter

        path = require_model_path(config, self.name, QWEN_IMAGE_EXAMPLE)
        opts = self.options(config)
        return load_qwenimage_adapter(path, dtype=dtype, device=device, load_transformer=False, load_vae=False,
                                      text_encoders="load", max_sequence_length=opts.max_sequence_length,
                                      prompt_cache_dir=config.model.prompt_cache_dir,
                                      negative_prompt=opts.negative_prompt, height=opts.height, width=opts.width)

    def export(self, bundle: PolicyBundle, config, out: Path, link: str) -> str:
        from branchgrpo.models.export import export_full

        path = export_full(bundle.policy.transformer, config.model.path, out, link=link)
        return f"wrote pipeline folder {path}; load it with QwenImagePipeline.from_pretrained({str(path)!r})"
