"""Wan2.2 text-to-video: the A14B mixture of two experts and the dense TI2V-5B, on the Wan2.1 adapter.

Everything Wan2.1 and Wan2.2 share (UMT5 prompts through ``WanPipeline.encode_prompt`` with the
prompt cache, ``AutoencoderKLWan`` decoding with per-channel ``latents_mean`` / ``latents_std``,
video latents ``[B, C, F', H/s, W/s]``, ``timestep = 1000·σ``, classifier-free guidance in one
doubled call) comes from :mod:`branchgrpo.models.wan`. This module adds what diffusers 0.42's
``WanPipeline`` does differently for Wan2.2:

- **Two experts (A14B).** ``transformer`` is the high-noise expert and ``transformer_2`` the
  low-noise one. At a step with scheduler timestep ``t`` the pipeline calls ``transformer`` when
  ``t >= boundary_ratio · num_train_timesteps`` (0.875 · 1000 for T2V-A14B, from
  ``model_index.json``), else ``transformer_2``, with guidance ``guidance_scale`` resp.
  ``guidance_scale_2`` (``None`` = ``guidance_scale``). CFG runs only when ``guidance_scale > 1``
  (the pipeline's ``do_classifier_free_guidance``, for both experts). :class:`Wan22Velocity` makes
  this decision **per row**, from the row's own ``1000·σ`` in float32 (the scheduler's
  ``timesteps``): a rollout frontier sits at one step, but a training micro-batch mixes edges of
  different steps on both sides of the boundary, so the batch is split by mask, each expert is
  called once on its rows and the velocities are put back in row order.
- **Both experts are trained.** :class:`WanExperts` holds the two transformers as one module
  (``transformer.*`` / ``transformer_2.*`` keys in checkpoints); LoRA goes into both (one adapter
  per expert, the same ``LoraConfig``) and :func:`export_expert_loras` writes one diffusers LoRA
  file per expert. diffusers 0.42's ``WanLoraLoaderMixin.save_lora_weights`` writes only
  ``transformer`` layers and ``load_lora_weights`` loads a file into ``transformer``, or into
  ``transformer_2`` with ``load_into_transformer_2=True``; so the high-noise file loads with
  ``pipe.load_lora_weights(path)`` and the low-noise one with
  ``pipe.load_lora_weights(path_2, load_into_transformer_2=True)`` (tested against our velocity).
- **TI2V-5B** is one dense transformer with 48 latent channels on the Wan2.2 VAE
  (``AutoencoderKLWan`` with ``z_dim = 48``, ``patch_size = 2``, ``scale_factor_spatial = 16``:
  4×16×16 compression, so sizes are multiples of 32 pixels with the ``(1, 2, 2)`` patch), and its
  pipeline has ``expand_timesteps = True``: the transformer gets one timestep per latent token,
  ``[B, F'·(H/2)·(W/2)]`` (all equal for text-to-video), which :class:`Wan22Velocity` reproduces.

The sampler is the engine's (docs/method.md §2–3 on ``sigma_schedule(T, shift)``); the folder's
``scheduler/`` (UniPC) is not used.

The experts and the velocity call live in :mod:`~branchgrpo.models.wan22_experts`, loading in
:mod:`~branchgrpo.models.wan22_loading`; both are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from branchgrpo.models.lora import WAN_TARGET_MODULES
from branchgrpo.models.wan import WanAdapter
from branchgrpo.models.wan22_experts import EXPERT_NAMES, ExpertCall, TokenTimesteps, Wan22Velocity, WanExperts
from branchgrpo.models.wan22_loading import (  # noqa: F401  (re-exported)
    WAN22_FILES,
    WAN22_LAYOUT,
    WAN22_LAYOUT_TEXT,
    WAN22_T2V_A14B_HUB_ID,
    WAN22_TI2V_5B_HUB_ID,
    Wan22FilesNotFoundError,
    _is_component,
    load_wan22_adapter,
    read_model_index,
)


class Wan22Adapter(WanAdapter):
    """Wan2.2 T2V-A14B (two experts) or TI2V-5B (one transformer, 48-channel VAE) behind the engine.

    A :class:`~branchgrpo.models.wan.WanAdapter` (prompts, cache, decoding, sizes) plus
    ``transformer_2``, ``boundary_ratio``, ``guidance_scale_2`` and ``expand_timesteps`` (the
    ``WanPipeline`` arguments of the same names); :attr:`experts` is the trainable module and
    :meth:`velocity_model` a :class:`Wan22Velocity`. Sizes follow the VAE config
    (``scale_factor_spatial`` 8 for A14B's Wan2.1 VAE, 16 for the Wan2.2 VAE) times the patch.
    """

    # family stays "wan" (the prompt-cache identity): the prompts go through the same UMT5 and
    # WanPipeline.encode_prompt, so Wan2.1 and Wan2.2 folders with one text encoder share cached embeddings
    device_modules = ("transformer", "transformer_2", "text_encoder", "vae")

    def __init__(
        self,
        transformer: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        transformer_2: torch.nn.Module | None = None,
        *,
        boundary_ratio: float | None = None,
        guidance_scale: float = 4.0,
        guidance_scale_2: float | None = None,
        expand_timesteps: bool = False,
        **kwargs: Any,
    ):
        if transformer is None and transformer_2 is not None:
            raise ValueError("Wan22Adapter needs the high-noise transformer to use transformer_2")
        if transformer_2 is not None and boundary_ratio is None:
            raise ValueError("two Wan2.2 experts need a boundary_ratio (model_index.json's; 0.875 for T2V-A14B)")
        self.transformer_2 = transformer_2
        self.boundary_ratio = None if boundary_ratio is None else float(boundary_ratio)
        self.guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
        self.expand_timesteps = bool(expand_timesteps)
        self.experts = WanExperts(transformer, transformer_2) if transformer is not None else None
        super().__init__(transformer, vae, text_encoder, tokenizer, guidance_scale=guidance_scale, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str | None = None, **kwargs: Any) -> "Wan22Adapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_wan22_adapter`."""
        return load_wan22_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    @property
    def num_experts(self) -> int:
        return 0 if self.experts is None else len(list(self.experts.experts()))

    def velocity_model(
        self,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | str | None = None,
        num_frames: int | None = None,
        guidance_scale_2: float | None = None,
    ) -> Wan22Velocity:
        """Both experts as ``vθ(x, σ, c)``, routed per row by σ (docs/method.md §1–2); arguments
        default to the adapter's (``guidance_scale_2`` to ``guidance_scale``, as the pipeline)."""
        self._require_transformer()
        self.latent_size(height, width, num_frames)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        scale_2 = guidance_scale_2 if guidance_scale_2 is not None else self.guidance_scale_2
        return Wan22Velocity(
            self.experts, boundary_ratio=self.boundary_ratio, guidance_scale=scale,
            guidance_scale_2=scale if scale_2 is None else scale_2,
            compute_dtype=self._compute_dtype(compute_dtype), expand_timesteps=self.expand_timesteps,
        )


# --------------------------------------------------------------------------------------------
# LoRA export: one diffusers LoRA file per expert.
# --------------------------------------------------------------------------------------------


def export_expert_loras(experts: WanExperts, out: str | os.PathLike, *, dtype: torch.dtype | None = None
                        ) -> dict[str, Path]:
    """Write each expert's LoRA as ``<out>/lora_<component>.safetensors`` (diffusers' convention).

    Returns ``{component: path}``. Load into a ``WanPipeline`` with
    ``pipe.load_lora_weights(paths["transformer"])`` and
    ``pipe.load_lora_weights(paths["transformer_2"], load_into_transformer_2=True)`` (diffusers 0.42
    has no single-file format for both experts: ``save_lora_weights`` writes ``transformer`` layers only).
    """
    from diffusers import WanPipeline

    from branchgrpo.models.export import export_lora

    folder = Path(out)
    if folder.suffix == ".safetensors":
        raise ValueError(f"Wan2.2 LoRA export writes one file per expert into a folder, got the file name {folder}")
    return {name: export_lora(module, folder / f"lora_{name}.safetensors", pipeline_class=WanPipeline, dtype=dtype)
            for name, module in experts.experts()}


def load_expert_loras_into(pipeline: Any, paths: Mapping[str, str | os.PathLike]) -> None:
    """Load :func:`export_expert_loras`'s files into a ``WanPipeline`` (the two calls diffusers 0.42 needs)."""
    pipeline.load_lora_weights(str(paths["transformer"]))
    if "transformer_2" in paths:
        pipeline.load_lora_weights(str(paths["transformer_2"]), load_into_transformer_2=True)


def export_full_experts(experts: WanExperts, base: str | os.PathLike, out_dir: str | os.PathLike, *,
                        link: str = "symlink", dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """A ``WanPipeline.from_pretrained`` folder with both trained experts (LoRA merged) and every
    other part of the base folder linked or copied (written in a temporary sibling, then renamed)."""
    from branchgrpo.models.export import _atomic_target, _place, _replace, plain_transformer

    base_dir, out = Path(base).expanduser(), Path(out_dir)
    if not (base_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{base_dir} is not a diffusers pipeline folder (no model_index.json)")
    if base_dir.resolve() == out.expanduser().resolve():
        raise ValueError("out_dir must differ from the base folder")
    names = {name for name, _ in experts.experts()}
    tmp = _atomic_target(out, overwrite)
    try:
        for entry in sorted(base_dir.iterdir()):
            if entry.name in names or entry.name.startswith("."):
                continue
            _place(entry, tmp / entry.name, link if entry.is_dir() else "copy")
        for name, module in experts.experts():
            plain_transformer(module, dtype).save_pretrained(tmp / name, safe_serialization=True)
        _replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def wan22_lora_target_modules() -> list[str]:
    """LoRA targets of each expert: Wan's self-/cross-attention projections (``attn1``/``attn2``)."""
    return list(WAN_TARGET_MODULES)


__all__ = [
    "EXPERT_NAMES",
    "ExpertCall",
    "TokenTimesteps",
    "WAN22_FILES",
    "WAN22_LAYOUT",
    "WAN22_LAYOUT_TEXT",
    "WAN22_T2V_A14B_HUB_ID",
    "WAN22_TI2V_5B_HUB_ID",
    "Wan22Adapter",
    "Wan22FilesNotFoundError",
    "Wan22Velocity",
    "WanExperts",
    "export_expert_loras",
    "export_full_experts",
    "load_expert_loras_into",
    "load_wan22_adapter",
    "read_model_index",
    "wan22_lora_target_modules",
]
