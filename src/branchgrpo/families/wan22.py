"""Wan2.2 text-to-video as a model family: T2V-A14B (two experts switched at a noise boundary) or
TI2V-5B (one transformer, the 48-channel Wan2.2 VAE); videos ``[B, F, C, H, W]``, classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily, PolicyBundle, require_model_path

VARIANTS = ("t2v-a14b", "ti2v-5b")
_HUB_EXAMPLE = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
# Wan-Video/Wan2.2 wan/configs: t2v_A14B.sample_guide_scale = (3.0, 4.0) (low, high noise); ti2v_5B 5.0
_HUB_REPOS = {"t2v-a14b": _HUB_EXAMPLE, "ti2v-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}  # the fetch command's repository
_DEFAULT_GUIDANCE = {"t2v-a14b": (4.0, 3.0), "ti2v-5b": (5.0, None)}


@dataclass
class Wan22Options:
    """Wan2.2 settings: the variant, video size, and guidance per expert (the authors' values by default)."""

    # t2v-a14b: two 14B experts (high/low noise); ti2v-5b: one 5B transformer, 48-channel VAE
    variant: Literal["t2v-a14b", "ti2v-5b"] = "t2v-a14b"
    height: int = 480  # pixels: a multiple of 16 (t2v-a14b: VAE 8 × patch 2) or 32 (ti2v-5b: VAE 16 × patch 2)
    width: int = 832  # pixels, the same multiple as height
    # 4k + 1: the VAE codes frame 0 alone, then 4 frames per latent frame (the authors sample 81 / 121)
    num_frames: int = 33
    # CFG of the high-noise expert (ti2v-5b: of its one transformer); None: 4.0 (t2v-a14b) / 5.0 (ti2v-5b);
    # <= 1 turns CFG off for both experts
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None  # CFG of the low-noise expert (t2v-a14b only); None: 3.0, the authors'
    # expert switch: the high-noise expert serves 1000·σ >= boundary_ratio·1000; None: model_index.json's (0.875)
    boundary_ratio: float | None = None
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance
    max_sequence_length: int = 512  # UMT5 tokens

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError("model.options.variant",
                              f"got {self.variant!r}; allowed values: {', '.join(VARIANTS)}")
        high, low = _DEFAULT_GUIDANCE[self.variant]
        if self.guidance_scale is None:
            self.guidance_scale = high
        two_experts = self.variant == "t2v-a14b"
        if not two_experts:
            for name in ("guidance_scale_2", "boundary_ratio"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"model.options.{name}", "ti2v-5b has one transformer: no second expert, "
                                      "no boundary; leave it unset")
        elif self.guidance_scale_2 is None:
            self.guidance_scale_2 = low
        if self.guidance_scale_2 is not None and self.guidance_scale <= 1.0 < self.guidance_scale_2:
            raise ConfigError("model.options.guidance_scale_2",
                              f"{self.guidance_scale_2} > 1 needs guidance_scale > 1: WanPipeline runs classifier-free "
                              f"guidance only when guidance_scale > 1 (got {self.guidance_scale})")
        if self.boundary_ratio is not None and not 0.0 < self.boundary_ratio < 1.0:
            raise ConfigError("model.options.boundary_ratio", f"must be in (0, 1), got {self.boundary_ratio}")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ConfigError("model.options.num_frames", "Wan videos have 4k + 1 frames (1, 5, ..., 33, ..., 81, "
                              f"..., 121), got {self.num_frames}")
        multiple = 16 if two_experts else 32
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < multiple or value % multiple:
                raise ConfigError(f"model.options.{name}",
                                  f"{self.variant} frames are a multiple of {multiple} pixels, got {value}")
        if self.max_sequence_length < 1:
            raise ConfigError("model.options.max_sequence_length", f"must be >= 1, got {self.max_sequence_length}")


def _variant_of(index: dict) -> str:
    from branchgrpo.models.wan22 import _is_component

    return "t2v-a14b" if _is_component(index.get("transformer_2")) else "ti2v-5b"


class Wan22Family(ModelFamily):
    name = "wan22"
    modality = "video"
    options_class = Wan22Options
    prompt_cache = True
    description = ("Wan2.2 text-to-video: T2V-A14B (high/low-noise WanTransformer3DModel experts, both trained) "
                   "or TI2V-5B; UMT5, classifier-free guidance per expert")

    path_example = hub_repo = _HUB_EXAMPLE
    # load_wan22_adapter: model_index.json decides the experts (read_model_index), then these subfolders
    required_files = ("model_index.json",)
    text_parts = ("tokenizer", "text_encoder")
    model_parts = ("transformer", "transformer_2", "vae")  # ti2v-5b: no transformer_2 (folder_parts)
    download = ("model_index.json", "scheduler", "transformer", "transformer_2", "vae", "text_encoder", "tokenizer")

    def _variant(self, config) -> str:
        try:
            return self.options(config).variant
        except ConfigError:
            return "t2v-a14b"  # check() reports the options

    def repo_for(self, config) -> str:
        return _HUB_REPOS[self._variant(config)]

    def folder_parts(self, config, job: str = "train") -> tuple[str, ...]:
        parts = super().folder_parts(config, job)
        return parts if self._variant(config) == "t2v-a14b" else tuple(p for p in parts if p != "transformer_2")

    def check(self, config) -> list[ConfigError]:
        """The base checks, and a local folder whose ``model_index.json`` says another variant than
        ``model.options.variant``."""
        problems = list(super().check(config))
        path = config.model.path
        if problems or path is None or not (Path(path).expanduser() / "model_index.json").is_file():
            return problems
        from branchgrpo.models.wan22 import read_model_index

        try:
            found = _variant_of(read_model_index(path))
        except FileNotFoundError:
            return problems
        wanted = self.options(config).variant
        if found != wanted:
            problems.append(ConfigError(
                "model.options.variant", f"{path} holds a {found} model (model_index.json "
                f"{'lists' if found == 't2v-a14b' else 'has no'} transformer_2); set variant: {found}"))
        return problems

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.models.wan22 import Wan22Adapter

        path = require_model_path(config, self.name, _HUB_EXAMPLE)
        opts, model = self.options(config), config.model
        adapter = Wan22Adapter.from_pretrained(
            path, dtype=dtype, device=device, vae_dtype=torch.float32, boundary_ratio=opts.boundary_ratio,
            height=opts.height, width=opts.width, num_frames=opts.num_frames,
            guidance_scale=opts.guidance_scale, guidance_scale_2=opts.guidance_scale_2,
            negative_prompt=opts.negative_prompt, prompt_cache_dir=model.prompt_cache_dir,
            max_sequence_length=opts.max_sequence_length, decode_batch_size=model.decode_batch,
        )
        found = "t2v-a14b" if adapter.num_experts == 2 else "ti2v-5b"
        if found != opts.variant:
            raise ConfigError("model.options.variant", f"{path} holds a {found} model ({adapter.num_experts} "
                              f"transformer(s)); set variant: {found}")
        if model.lora is None:  # full fine-tuning of both experts (loading froze them; add_lora freezes the base)
            adapter.experts.requires_grad_(True)
        return PolicyBundle(
            family=self.name, policy=adapter.velocity_model(), trainable=adapter.experts,
            latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts,
            decode=adapter.decode, modality="video", adapter=adapter,
        )

    def lora_target_modules(self, bundle: PolicyBundle) -> list[str]:
        """Wan's attention projections, in every expert (the trainable module holds both)."""
        from branchgrpo.models.wan22 import wan22_lora_target_modules

        return wan22_lora_target_modules()

    def prompt_encoder(self, config, device: torch.device, dtype: torch.dtype):
        from branchgrpo.models.wan22 import load_wan22_adapter

        path = require_model_path(config, self.name, _HUB_EXAMPLE)
        opts = self.options(config)
        return load_wan22_adapter(path, dtype=dtype, device=device, load_transformer=False, load_vae=False,
                                  text_encoders="load", max_sequence_length=opts.max_sequence_length,
                                  prompt_cache_dir=config.model.prompt_cache_dir, negative_prompt=opts.negative_prompt)

    def export(self, bundle: PolicyBundle, config, out: Path, link: str) -> str:
        from branchgrpo.models.wan22 import export_full_experts

        path = export_full_experts(bundle.policy.transformer, config.model.path, out, link=link)
        return f"wrote pipeline folder {path} (every expert); load it with WanPipeline.from_pretrained({str(path)!r})"

    def export_lora(self, bundle: PolicyBundle, config, out: Path) -> str:
        from branchgrpo.models.wan22 import export_expert_loras

        folder = out.with_suffix("") if out.suffix == ".safetensors" else out  # one file per expert: a folder
        paths = export_expert_loras(bundle.policy.transformer, folder)
        calls = [f"pipe.load_lora_weights({str(paths['transformer'])!r})"]
        if "transformer_2" in paths:
            calls.append(f"pipe.load_lora_weights({str(paths['transformer_2'])!r}, load_into_transformer_2=True)")
        return f"wrote one LoRA per expert in {folder}; load them with " + "; ".join(calls)
