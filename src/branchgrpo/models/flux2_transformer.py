"""FLUX.2's transformer side: latent (un)patchifying and packing, 4-axis position ids, the dynamic
shift, :class:`Flux2Velocity` (the velocity call) and the LoRA targets. Re-exported by
:mod:`branchgrpo.models.flux2`."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from branchgrpo.models.base import GuidedVelocity

# --------------------------------------------------------------------------------------------
# Latent layout and position ids (Flux2Pipeline's static helpers, as plain functions).
# --------------------------------------------------------------------------------------------

def patchify_latents(latents: Tensor) -> Tensor:
    """VAE latents ``[B, C, H, W]`` → ``[B, 4C, H/2, W/2]`` (``Flux2Pipeline._patchify_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX.2 latents need even height and width, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify_latents(latents: Tensor) -> Tensor:
    """``[B, 4C, h, w]`` → VAE latents ``[B, C, 2h, 2w]`` (``Flux2Pipeline._unpatchify_latents``)."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


def pack_latents(latents: Tensor) -> Tensor:
    """Patchified ``[B, C', h, w]`` → tokens ``[B, h·w, C']``, row-major (``Flux2Pipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """Tokens ``[B, h·w, C']`` → ``[B, C', h, w]`` for a patch grid of ``height × width``."""
    b, n, c = packed.shape
    if n != height * width:
        raise ValueError(f"{n} tokens do not match a {height}x{width} patch grid")
    return packed.permute(0, 2, 1).reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device=None) -> Tensor:
    """Position ids ``[h·w, 4]`` of the image tokens: ``(t, h, w, l) = (0, row, column, 0)``."""
    zero = torch.zeros(1, dtype=torch.long)
    ids = torch.cartesian_prod(zero, torch.arange(height), torch.arange(width), zero)
    return ids.to(device)


def text_ids(length: int, device=None) -> Tensor:
    """Position ids ``[L, 4]`` of the text tokens: ``(0, 0, 0, l)`` (``Flux2Pipeline._prepare_text_ids``)."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


def flux2_dynamic_shift(height: int, width: int, steps: int, vae_scale_factor: int = 8) -> float:
    """docs/method.md §2's ``shift`` that reproduces the FLUX.2 pipelines' default σ schedule.

    Both pipelines set ``μ = compute_empirical_mu(image tokens, steps)`` (BFL's fit, which depends
    on the step count too) and the scheduler (``time_shift_type="exponential"``) maps
    ``σ' = e^μ / (e^μ + 1/σ − 1)``: the method's shift formula with ``shift = e^μ``. At 1024²
    (4096 tokens): 9.01 for 20 steps, 7.56 for 50.
    """
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    tokens = (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))
    return math.exp(compute_empirical_mu(image_seq_len=tokens, num_steps=steps))


# --------------------------------------------------------------------------------------------
# The velocity model.
# --------------------------------------------------------------------------------------------

class Flux2Velocity(GuidedVelocity):
    """``vθ(x, σ, c)`` of a ``Flux2Transformer2DModel`` on packed latents ``[B, N, C']``.

    Conditioning keys: ``prompt_embeds [B, L, D]`` and, with true CFG, ``negative_prompt_embeds``.
    ``guidance_scale`` is fed as the guidance embedding when the transformer has one
    (``guidance_embeds``, [dev]); otherwise, when ``true_cfg`` ([klein] base) and
    ``guidance_scale > 1``, the transformer is called once on ``[x; x]`` with
    ``[negative; positive]`` embeddings and ``v_u + g·(v_c − v_u)`` is returned.
    """

    adapter_name = "Flux2Adapter"
    default_guidance_scale = 4.0  # both pipelines' default

    def __init__(
        self,
        transformer: torch.nn.Module,
        latent_height: int,
        latent_width: int,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | None = None,
        true_cfg: bool | None = None,
    ):
        super().__init__(transformer, guidance_scale=guidance_scale, compute_dtype=compute_dtype, timestep_scale=1.0)
        self.latent_height, self.latent_width = int(latent_height), int(latent_width)
        self.embedded_guidance = bool(getattr(transformer.config, "guidance_embeds", False))
        if true_cfg and self.embedded_guidance:
            raise ValueError("a guidance-distilled FLUX.2 transformer (guidance_embeds=True) takes no true CFG")
        self.true_cfg = (not self.embedded_guidance) if true_cfg is None else bool(true_cfg)
        self.register_buffer("img_ids", latent_image_ids(latent_height, latent_width), persistent=False)

    @property
    def uses_cfg(self) -> bool:
        return self.true_cfg and self.guidance_scale > 1.0  # Flux2KleinPipeline.do_classifier_free_guidance

    def _extra_inputs(self, x: Tensor, inputs: Mapping[str, Tensor]) -> dict[str, Any]:
        """The guidance embedding's input ([dev]) and the image and text position ids."""
        guidance = (torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
                    if self.embedded_guidance else None)
        return {"guidance": guidance, "img_ids": self.img_ids.to(x.device),
                "txt_ids": text_ids(inputs["encoder_hidden_states"].shape[1], x.device)}


def flux2_lora_target_modules(transformer: torch.nn.Module) -> list[str]:
    """LoRA targets of a ``Flux2Transformer2DModel``: every attention projection.

    Double-stream blocks: ``to_q/k/v``, ``to_out.0`` (image) and ``add_q/k/v_proj``, ``to_add_out``
    (text). Single-stream blocks fuse q, k, v and the MLP input into ``attn.to_qkv_mlp_proj`` and
    the attention and MLP outputs into ``attn.to_out`` (a Linear there, but a ModuleList in the
    double blocks, so those are named one by one).
    """
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
    single = ["attn.to_qkv_mlp_proj"] + [
        f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(transformer.single_transformer_blocks))
    ]
    return double + single
