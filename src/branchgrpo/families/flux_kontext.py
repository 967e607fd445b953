"""FLUX.1 Kontext [dev] as a model family: instruction editing, one source image per training row.

Rows are JSONL lines ``{"prompt": "<instruction>", "image": "<path>"}`` in ``data.train_prompts`` /
``data.heldout_prompts``, the format of the qwenimage-edit family (relative image paths are read
from the file's folder). The trainer treats each line as the row's prompt; this family reads the
same files in ``build`` and ``check`` to know every row's source image, and rewards are given the
line, so a reward can see the instruction and the source (``branchgrpo.models.qwenimage_edit.parse_edit_row``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily, PolicyBundle, require_model_path
from branchgrpo.families.qwenimage_edit import data_rows, edit_row_problems

FLUX_KONTEXT_EXAMPLE = "black-forest-labs/FLUX.1-Kontext-dev"


@dataclass
class FluxKontextOptions:
    """FLUX.1 Kontext [dev] settings (FluxKontextPipeline's: 1024² output, sources at the preferred
    Kontext resolution nearest their aspect ratio; guidance 2.5 as in its example and BFL's hosted default)."""

    height: int = 1024  # edited image height in pixels, a multiple of 16 (the pipeline renders 1024² by default)
    width: int = 1024  # edited image width in pixels, a multiple of 16
    embedded_guidance: float = 2.5  # distilled guidance, fed as an embedding (no CFG, one call per step)
    max_sequence_length: int = 512  # T5 tokens of the instruction
    auto_resize: bool = True  # sources to the nearest preferred Kontext resolution (the pipeline's); false: own size
    true_cfg_scale: float = 1.0  # the pipeline's true CFG, on when > 1 with a negative_prompt (two passes per step)
    negative_prompt: str | None = None  # the unconditional prompt of true CFG (null: none, true CFG off)

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ConfigError(f"model.options.{name}", f"FLUX.1 Kontext images are a multiple of 16 pixels, "
                                  f"got {value}")
        if not math.isfinite(self.embedded_guidance) or self.embedded_guidance < 0:
            raise ConfigError("model.options.embedded_guidance",
                              f"must be a finite number >= 0, got {self.embedded_guidance}")
        if not math.isfinite(self.true_cfg_scale) or self.true_cfg_scale < 1:
            raise ConfigError("model.options.true_cfg_scale",
                              f"must be a finite number >= 1 (1: no true CFG), got {self.true_cfg_scale}")
        if self.true_cfg_scale > 1 and self.negative_prompt is None:
            raise ConfigError("model.options.negative_prompt", f"true_cfg_scale {self.true_cfg_scale} > 1 needs a "
                              "negative prompt (e.g. \" \"), as FluxKontextPipeline's true CFG does")
        if self.max_sequence_length < 1:
            raise ConfigError("model.options.max_sequence_length", f"must be >= 1, got {self.max_sequence_length}")


class FluxKontextFamily(ModelFamily):
    name = "flux-kontext"
    modality = "image"
    options_class = FluxKontextOptions
    prompt_cache = True
    editing = True  # prompts are edit rows (instruction + source image): `branchgrpo sample --image`
    path_example = FLUX_KONTEXT_EXAMPLE
    # load_flux_kontext_adapter, as the flux family: tokenizers and text-encoder configs always (the
    # prompt-cache identity); the VAE encodes the sources and decodes the edits
    hub_repo, gated = FLUX_KONTEXT_EXAMPLE, True
    text_parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    model_parts = ("transformer", "vae")
    download = ("model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    description = ("FLUX.1 Kontext [dev] (instruction + source image per JSONL row; FluxTransformer2DModel + "
                   "CLIP-L/T5-XXL), guidance embedding")

    def check(self, config) -> list[ConfigError]:
        """The base checks and every row of both data files (a missing file is reported by the job's checks)."""
        return super().check(config) + edit_row_problems(config)

    def _adapter_kwargs(self, config) -> dict:
        opts = self.options(config)
        return dict(height=opts.height, width=opts.width, guidance_scale=opts.embedded_guidance,
                    max_sequence_length=opts.max_sequence_length, auto_resize=opts.auto_resize,
                    true_cfg_scale=opts.true_cfg_scale, negative_prompt=opts.negative_prompt,
                    prompt_cache_dir=config.model.prompt_cache_dir, rows=data_rows(config))

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.models.flux_kontext import FluxKontextAdapter

        path = require_model_path(config, self.name, FLUX_KONTEXT_EXAMPLE)
        adapter = FluxKontextAdapter.from_pretrained(path, dtype=dtype, device=device, vae_dtype=torch.float32,
                                                     decode_batch_size=config.model.decode_batch,
                                                     **self._adapter_kwargs(config))
        return PolicyBundle(
            family=self.name, policy=adapter.velocity_model(), trainable=adapter.transformer,
            latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
            decode=adapter.decode, modality="image", adapter=adapter,
        )

    def lora_target_modules(self, bundle: PolicyBundle) -> list[str]:
        """FLUX's attention projections (double-stream: image and text; single-stream: q/k/v), as the flux family."""
        from branchgrpo.models.lora import DEFAULT_TARGET_MODULES

        return list(DEFAULT_TARGET_MODULES)

    def prompt_encoder(self, config, device: torch.device, dtype: torch.dtype):
        """The text encoders only, for ``branchgrpo preprocess`` (the instruction is all FLUX encodes)."""
        from branchgrpo.models.flux_kontext import load_flux_kontext_adapter

        path = require_model_path(config, self.name, FLUX_KONTEXT_EXAMPLE)
        return load_flux_kontext_adapter(path, dtype=dtype, device=device, load_transformer=False, load_vae=False,
                                         text_encoders="load", **self._adapter_kwargs(config))

    def export(self, bundle: PolicyBundle, config, out: Path, link: str) -> str:
        """The base folder with the trained transformer (its model_index.json keeps FluxKontextPipeline;
        the transformer class alone would name FluxPipeline)."""
        from diffusers import FluxKontextPipeline

        from branchgrpo.models.export import export_full

        path = export_full(bundle.policy.transformer, config.model.path, out, link=link,
                           pipeline_class=FluxKontextPipeline)
        return f"wrote pipeline folder {path}; load it with FluxKontextPipeline.from_pretrained({str(path)!r})"
