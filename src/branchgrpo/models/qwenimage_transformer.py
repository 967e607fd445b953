"""Qwen-Image's transformer side: its scheduler's resolution-dependent shift and σ grid, true CFG
with the norm rescale, text padding/trimming and :class:`QwenImageVelocity` (the velocity call).
Re-exported by :mod:`branchgrpo.models.qwenimage`."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from branchgrpo.models.base import GuidedVelocity, autocast_context
from branchgrpo.models.protocol import Conditioning

# Qwen/Qwen-Image scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
QWEN_IMAGE_SCHEDULER_CONFIG: Mapping[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}


def image_tokens(height: int, width: int, vae_scale_factor: int = 8) -> int:
    """Packed latent tokens of a ``height × width`` image (``QwenImagePipeline``'s ``image_seq_len``)."""
    return (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))


def qwenimage_dynamic_shift(height: int, width: int, vae_scale_factor: int = 8,
                            scheduler_config: Mapping[str, Any] = QWEN_IMAGE_SCHEDULER_CONFIG) -> float:
    """The ``shift`` of Qwen-Image's resolution-dependent schedule at ``height × width``: ``e^μ``.

    ``μ`` is the pipeline's ``calculate_shift`` of the packed token count with the scheduler's
    anchors (``base_shift``/``max_shift`` at ``base_image_seq_len``/``max_image_seq_len``, not
    clamped); the exponential time shift ``e^μ / (e^μ + 1/σ − 1)`` is docs/method.md §2's with
    ``shift = e^μ``: 2.00 at 1024², 2.30 at 1328² (the model card's 1:1 size).
    """
    return math.exp(_mu(height, width, vae_scale_factor, scheduler_config))


def _mu(height: int, width: int, vae_scale_factor: int, scheduler_config: Mapping[str, Any]) -> float:
    """``QwenImagePipeline``'s ``μ = calculate_shift(image_seq_len, ...)`` with the scheduler's anchors."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    return calculate_shift(
        image_tokens(height, width, vae_scale_factor),
        scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15),
    )


def diffusers_qwenimage_sigmas(steps: int, height: int, width: int, vae_scale_factor: int = 8,
                               scheduler_config: Mapping[str, Any] = QWEN_IMAGE_SCHEDULER_CONFIG) -> Tensor:
    """The σ grid ``QwenImagePipeline`` samples on by default (``[T + 1]``, float64), for comparison.

    It is ``sigma_schedule(T, qwenimage_dynamic_shift(h, w))`` stretched so that the last σ before 0
    is ``shift_terminal`` (0.02): ``σ' = 1 − (1 − σ)·(1 − 0.02)/(1 − σ_{T−1})``. Our trees keep
    ``sigma_schedule`` (the stretch would move every σ but the first).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**dict(scheduler_config))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps),
                            mu=_mu(height, width, vae_scale_factor, scheduler_config))
    return scheduler.sigmas.double()


def true_cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Qwen-Image's guided prediction: ``c = u + g·(v − u)`` rescaled to ``‖v‖`` over the last axis.

    ``QwenImagePipeline``'s ``comb_pred * (‖noise_pred‖ / ‖comb_pred‖)`` with norms over the
    packed channels of each token (``dim=-1``), so every token keeps the conditional magnitude.
    """
    combined = uncond + scale * (cond - uncond)
    return combined * (torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
                       / torch.linalg.vector_norm(combined, dim=-1, keepdim=True))


def pad_text(embeds: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Zero-pad ``[B, L, D]`` embeddings and their ``[B, L]`` mask to ``length`` tokens."""
    extra = length - embeds.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {embeds.shape[1]} tokens to {length}")
    if extra == 0:
        return embeds, mask
    return (torch.cat([embeds, embeds.new_zeros(embeds.shape[0], extra, embeds.shape[2])], dim=1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1))


def trim_text(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the trailing tokens that no row attends to (they change nothing: the transformer masks
    them out of every attention and the text RoPE positions of the others do not move)."""
    used = mask.bool().any(dim=0)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return embeds[:, :length], mask[:, :length]


class QwenImageVelocity(GuidedVelocity):
    """``vθ(x, σ, c)`` of a ``QwenImageTransformer2DModel`` on packed latents ``[B, N, 64]``, with true CFG.

    Conditioning keys: ``prompt_embeds [B, L, D]``, ``prompt_embeds_mask [B, L]`` (1 = token,
    0 = padding) and, when ``guidance_scale > 1``, ``negative_prompt_embeds`` /
    ``negative_prompt_embeds_mask``. With guidance the transformer is called **once** on ``[x; x]``
    with ``[negative; positive]`` texts padded to one length, and the result is :func:`true_cfg`
    (the pipeline's norm-preserving mix); ``guidance_scale <= 1`` is one plain call. Trailing
    padding that no row uses is dropped first, and an all-ones mask is passed as ``None`` (as the
    pipeline does). Timestep ``σ`` (float32); outputs float32.
    """

    transformer_inputs = {"prompt_embeds": "encoder_hidden_states", "prompt_embeds_mask": "encoder_hidden_states_mask"}
    default_guidance_scale = 4.0  # the model card's true_cfg_scale
    adapter_name = "QwenImageAdapter"

    def __init__(self, transformer: torch.nn.Module, latent_height: int, latent_width: int,
                 guidance_scale: float | None = None, compute_dtype: torch.dtype | None = None):
        if getattr(transformer.config, "guidance_embeds", False):
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported; "
                             "Qwen-Image uses true classifier-free guidance")
        super().__init__(transformer, guidance_scale, compute_dtype, timestep_scale=1.0)
        self.latent_height, self.latent_width = int(latent_height), int(latent_width)

    def _image_tokens(self, x: Tensor, conditioning: Conditioning, doubled: bool) -> tuple[Tensor, list]:
        """The transformer's image-stream input for latents ``x`` (``[x; x]`` when ``doubled``) and its
        ``img_shapes`` (the packed grid per row, for RoPE)."""
        return x, [[(1, self.latent_height // 2, self.latent_width // 2)]] * x.shape[0]

    def forward(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning) -> Tensor:
        param = self._base_param()
        device = latents.device
        embeds = conditioning["prompt_embeds"].to(device)
        mask = conditioning["prompt_embeds_mask"].to(device)
        x = latents
        timestep = sigmas.to(device=device, dtype=torch.float32) * self.timestep_scale
        if self.uses_cfg:
            self._require_negatives(conditioning)
            negative = conditioning["negative_prompt_embeds"].to(device)
            negative_mask = conditioning["negative_prompt_embeds_mask"].to(device)
            length = max(embeds.shape[1], negative.shape[1])
            negative, negative_mask = pad_text(negative, negative_mask, length)
            embeds, mask = pad_text(embeds, mask, length)
            embeds, mask = torch.cat([negative, embeds], dim=0), torch.cat([negative_mask, mask], dim=0)
            x = torch.cat([latents, latents], dim=0)
            timestep = torch.cat([timestep, timestep], dim=0)
        embeds, mask = trim_text(embeds, mask)
        attention_mask = None if bool(mask.bool().all()) else mask.bool()
        hidden, img_shapes = self._image_tokens(x, conditioning, doubled=self.uses_cfg)
        with autocast_context(device, self.compute_dtype):
            out = self.transformer(
                hidden_states=hidden.to(param.dtype), timestep=timestep, encoder_hidden_states=embeds.to(param.dtype),
                encoder_hidden_states_mask=attention_mask, img_shapes=img_shapes, return_dict=False,
            )[0]
        out = out[:, : latents.shape[1]].float()  # the generated image's tokens (an edit model appends others)
        return self._guide(*out.chunk(2)) if self.uses_cfg else out

    def _guide(self, uncond: Tensor, cond: Tensor) -> Tensor:
        return true_cfg(cond, uncond, self.guidance_scale)
