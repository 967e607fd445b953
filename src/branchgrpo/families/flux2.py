"""FLUX.2 as model families: ``flux2`` ([dev], guidance-distilled: a guidance embedding, one call per
step) and ``flux2-klein`` ([klein] base: true classifier-free guidance with a negative prompt)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily, PolicyBundle, require_model_path

FLUX2_DEV_EXAMPLE = "black-forest-labs/FLUX.2-dev"
FLUX2_KLEIN_EXAMPLE = "black-forest-labs/FLUX.2-klein-base-4B"


def _check_size_and_length(options, family: str) -> None:
    for name in ("height", "width"):
        value = getattr(options, name)
        if value < 16 or value % 16:
            raise ConfigError(f"model.options.{name}", f"{family} images are a multiple of 16 pixels, got {value}")
    if options.max_sequence_length < 1:
        raise ConfigError("model.options.max_sequence_length", f"must be >= 1, got {options.max_sequence_length}")


@dataclass
class Flux2Options:
    """FLUX.2 [dev] settings (the authors' diffusers example: 1024², guidance 4, 50 steps)."""

    height: int = 1024  # image height in pixels, a multiple of 16 (VAE 8 × 2×2 patches); Flux2Pipeline's default
    width: int = 1024  # image width in pixels, a multiple of 16
    embedded_guidance: float = 4.0  # FLUX.2 [dev]'s distilled guidance, fed as an embedding (no CFG, one call)
    max_sequence_length: int = 512  # Mistral tokens after the chat template (Flux2Pipeline's 512)

    def __post_init__(self) -> None:
        _check_size_and_length(self, "FLUX.2")
        if not math.isfinite(self.embedded_guidance) or self.embedded_guidance < 0:
            raise ConfigError("model.options.embedded_guidance",
                              f"must be a finite number >= 0, got {self.embedded_guidance}")


@dataclass
class Flux2KleinOptions:
    """FLUX.2 [klein] base settings (Flux2KleinPipeline's defaults: 1024², CFG 4.0, negative prompt "")."""

    height: int = 1024  # image height in pixels, a multiple of 16 (VAE 8 × 2×2 patches)
    width: int = 1024  # image width in pixels, a multiple of 16
    guidance_scale: float = 4.0  # true classifier-free guidance; <= 1 turns it off (ignored by step-distilled models)
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance (the pipeline's: empty)
    max_sequence_length: int = 512  # Qwen3 tokens after the chat template (Flux2KleinPipeline's 512)

    def __post_init__(self) -> None:
        _check_size_and_length(self, "FLUX.2 [klein]")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale <= 0:
            raise ConfigError("model.options.guidance_scale",
                              f"must be a finite number > 0 (<= 1 turns guidance off), got {self.guidance_scale}")


def _bundle(name: str, adapter) -> PolicyBundle:
    return PolicyBundle(
        family=name, policy=adapter.velocity_model(), trainable=adapter.transformer,
        latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
        decode=adapter.decode, modality="image", adapter=adapter,
    )


class _Flux2Base(ModelFamily):
    modality = "image"
    prompt_cache = True
    text_parts = ("tokenizer", "text_encoder")  # load_flux2_adapter; model_index.json is read when present
    model_parts = ("transformer", "vae")
    download = ("model_index.json", "scheduler", "transformer", "vae", "text_encoder", "tokenizer")
    variant: str
    example: str

    def _adapter_kwargs(self, opts) -> dict:  # pragma: no cover - per variant
        raise NotImplementedError

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.models.flux2 import load_flux2_adapter

        path = require_model_path(config, self.name, self.example)
        opts, model = self.options(config), config.model
        adapter = load_flux2_adapter(
            path, dtype=dtype, device=device, variant=self.variant, vae_dtype=torch.float32,
            height=opts.height, width=opts.width, prompt_cache_dir=model.prompt_cache_dir,
            max_sequence_length=opts.max_sequence_length, decode_batch_size=model.decode_batch,
            **self._adapter_kwargs(opts),
        )
        return _bundle(self.name, adapter)

    def lora_target_modules(self, bundle: PolicyBundle) -> list[str]:
        from branchgrpo.models.flux2 import flux2_lora_target_modules

        return flux2_lora_target_modules(bundle.policy.transformer)

    def prompt_encoder(self, config, device: torch.device, dtype: torch.dtype):
        from branchgrpo.models.flux2 import load_flux2_adapter

        path = require_model_path(config, self.name, self.example)
        opts = self.options(config)
        return load_flux2_adapter(path, dtype=dtype, device=device, variant=self.variant, load_transformer=False,
                                  load_vae=False, text_encoders="load", max_sequence_length=opts.max_sequence_length,
                                  prompt_cache_dir=config.model.prompt_cache_dir, height=opts.height,
                                  width=opts.width, **self._adapter_kwargs(opts))

    def export(self, bundle: PolicyBundle, config, out: Path, link: str) -> str:
        from branchgrpo.models.export import export_full

        path = export_full(bundle.policy.transformer, config.model.path, out, link=link)
        return f"wrote pipeline folder {path}; load it with DiffusionPipeline.from_pretrained({str(path)!r})"


class Flux2Family(_Flux2Base):
    name = "flux2"
    variant = "dev"
    example = FLUX2_DEV_EXAMPLE
    path_example = hub_repo = FLUX2_DEV_EXAMPLE
    gated = True
    options_class = Flux2Options
    description = "FLUX.2 [dev] (Flux2Transformer2DModel + Mistral-Small-3.2), guidance embedding"

    def _adapter_kwargs(self, opts: Flux2Options) -> dict:
        return {"guidance_scale": opts.embedded_guidance}


class Flux2KleinFamily(_Flux2Base):
    name = "flux2-klein"
    variant = "klein"
    example = FLUX2_KLEIN_EXAMPLE
    path_example = hub_repo = FLUX2_KLEIN_EXAMPLE
    options_class = Flux2KleinOptions
    description = "FLUX.2 [klein] base (Flux2Transformer2DModel + Qwen3), classifier-free guidance"

    def _adapter_kwargs(self, opts: Flux2KleinOptions) -> dict:
        return {"guidance_scale": opts.guidance_scale, "negative_prompt": opts.negative_prompt}
