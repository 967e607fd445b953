"""FLUX.1 (dev) as a model family: guidance-distilled, one transformer call per step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily, PolicyBundle, require_model_path


@dataclass
class FluxOptions:
    """FLUX.1-dev settings (the paper's: 720², guidance 3.5)."""

    height: int = 720  # image size in pixels, a multiple of 16
    width: int = 720  # image width in pixels, a multiple of 16
    embedded_guidance: float = 3.5  # FLUX.1-dev's distilled guidance, fed as an embedding (no CFG, one call)
    max_sequence_length: int = 512  # T5 tokens

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ConfigError(f"model.options.{name}", f"FLUX images are a multiple of 16 pixels, got {value}")
        if self.max_sequence_length < 1:
            raise ConfigError("model.options.max_sequence_length", f"must be >= 1, got {self.max_sequence_length}")


class FluxFamily(ModelFamily):
    name = "flux"
    modality = "image"
    options_class = FluxOptions
    prompt_cache = True
    path_example = "black-forest-labs/FLUX.1-dev"
    # load_flux_adapter: tokenizers and text-encoder configs always (the prompt-cache identity), weights
    # checked even with text_encoders="lazy", so a filled cache does not make them optional
    hub_repo, gated = "black-forest-labs/FLUX.1-dev", True
    text_parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    model_parts = ("transformer", "vae")
    download = ("model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    description = "FLUX.1-dev (FluxTransformer2DModel + CLIP-L/T5-XXL), guidance embedding"

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.models.flux import FluxAdapter

        path = require_model_path(config, self.name, "black-forest-labs/FLUX.1-dev")
        opts = self.options(config)
        model = config.model
        adapter = FluxAdapter.from_pretrained(
            path, dtype=dtype, device=device, height=opts.height, width=opts.width,
            guidance_scale=opts.embedded_guidance, prompt_cache_dir=model.prompt_cache_dir,
            max_sequence_length=opts.max_sequence_length, decode_batch_size=model.decode_batch,
        )
        return PolicyBundle(
            family=self.name, policy=adapter.velocity_model(), trainable=adapter.transformer,
            latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
            decode=adapter.decode, modality="image", adapter=adapter,
        )

    def prompt_encoder(self, config, device: torch.device, dtype: torch.dtype):
        from branchgrpo.models.flux import load_flux_adapter

        path = require_model_path(config, self.name, "black-forest-labs/FLUX.1-dev")
        return load_flux_adapter(path, dtype=dtype, device=device, load_transformer=False, load_vae=False,
                                 text_encoders="load", max_sequence_length=self.options(config).max_sequence_length,
                                 prompt_cache_dir=config.model.prompt_cache_dir)

    def export(self, bundle: PolicyBundle, config, out: Path, link: str) -> str:
        from branchgrpo.models.export import export_full

        path = export_full(bundle.policy.transformer, config.model.path, out, link=link)
        return f"wrote pipeline folder {path}; load it with DiffusionPipeline.from_pretrained({str(path)!r})"
