"""FLUX adapter core: latent packing, position ids and the velocity call of a diffusers
``FluxTransformer2DModel`` behind the :class:`~branchgrpo.models.protocol.VelocityModel` protocol.

Conventions match diffusers' ``FluxPipeline``: latents ``[B, C, H, W]`` are packed into 2×2
patches ``[B, (H/2)(W/2), 4C]``; the transformer takes ``timestep = σ`` (it multiplies by 1000
itself) and, for guidance-distilled models, ``guidance = guidance_scale`` per row.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from branchgrpo.models.protocol import Conditioning


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, H, W]`` → ``[B, (H/2)(W/2), 4C]`` (diffusers ``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """``[B, (H/2)(W/2), 4C]`` → ``[B, C, H, W]`` for latent height/width ``H, W``."""
    b, n, c4 = packed.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not match a {height}x{width} latent")
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Position ids ``[(H/2)(W/2), 3]`` of the packed tokens (diffusers' convention)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class FluxVelocity(torch.nn.Module):
    """``vθ(x, σ, c)`` of a ``FluxTransformer2DModel`` on packed latents ``[B, N, 4C]``.

    Conditioning keys: ``prompt_embeds [B, L, D]`` and ``pooled_prompt_embeds [B, D']``.
    ``compute_dtype`` (e.g. bfloat16 on GPU) runs the transformer under autocast; outputs are float32.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        latent_height: int,
        latent_width: int,
        guidance_scale: float | None = 3.5,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.transformer = transformer
        self.latent_height = latent_height
        self.latent_width = latent_width
        uses_guidance = bool(getattr(transformer.config, "guidance_embeds", False))
        self.guidance_scale = guidance_scale if uses_guidance else None
        self.compute_dtype = compute_dtype
        self.register_buffer("img_ids", latent_image_ids(latent_height, latent_width), persistent=False)

    def forward(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning) -> Tensor:
        prompt_embeds = conditioning["prompt_embeds"]
        pooled = conditioning["pooled_prompt_embeds"]
        batch = latents.shape[0]
        param = next(self.transformer.parameters())
        dtype = self.compute_dtype or param.dtype
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=dtype)
        guidance = (
            torch.full((batch,), float(self.guidance_scale), device=latents.device, dtype=dtype)
            if self.guidance_scale is not None
            else None
        )
        autocast = (
            torch.autocast(latents.device.type, dtype=dtype)
            if self.compute_dtype is not None and self.compute_dtype != torch.float32
            else nullcontext()
        )
        with autocast:
            out = self.transformer(
                hidden_states=latents.to(param.dtype),
                encoder_hidden_states=prompt_embeds.to(param.dtype),
                pooled_projections=pooled.to(param.dtype),
                timestep=sigmas.to(param.dtype),
                img_ids=self.img_ids.to(dtype),
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
        return out.float()
