"""Tiny policies for engine tests: deterministic, prompt-conditioned, cheap on CPU."""

from __future__ import annotations

import torch
from torch import Tensor

from branchgrpo.models.flux import FluxVelocity


class TinyMLPPolicy(torch.nn.Module):
    """``v = MLP([x, σ, c])`` on latents ``[B, D]``; conditioning key ``prompt [P, C]``.

    Row-wise only (no cross-row ops), so its output does not depend on the batch composition.
    """

    def __init__(self, dim: int = 8, cond_dim: int = 4, hidden: int = 32, seed: int = 0, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(dim + 1 + cond_dim, hidden, generator=gen, dtype=dtype) * 0.3)
        self.b1 = torch.nn.Parameter(torch.zeros(hidden, dtype=dtype))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, dim, generator=gen, dtype=dtype) * 0.3)
        self.dim = dim

    def forward(self, latents: Tensor, sigmas: Tensor, conditioning) -> Tensor:
        x = latents.reshape(latents.shape[0], -1).to(self.w1.dtype)
        h = torch.cat([x, sigmas.reshape(-1, 1).to(x.dtype), conditioning["prompt"].to(x.dtype)], dim=1)
        out = torch.tanh(h @ self.w1 + self.b1) @ self.w2
        return out.reshape(latents.shape).float()


class RowCounter(torch.nn.Module):
    """Wraps a velocity model and records how many rows each call evaluates."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, []

    def forward(self, latents, sigmas, conditioning):
        self.rows.append(int(latents.shape[0]))
        return self.inner(latents, sigmas, conditioning)


def tiny_conditioning(num_prompts: int, cond_dim: int = 4, seed: int = 1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"prompt": torch.randn(num_prompts, cond_dim, generator=gen)}


def tiny_flux(seed: int = 0, latent_hw: int = 8, guidance: bool = False) -> tuple[FluxVelocity, dict]:
    """A ~0.1M-parameter random ``FluxTransformer2DModel`` wrapped as a velocity model."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=guidance, axes_dims_rope=[4, 6, 6],
    )
    return FluxVelocity(transformer, latent_hw, latent_hw, guidance_scale=3.5 if guidance else None), {
        "tokens": (latent_hw // 2) ** 2, "channels": 16,
    }


def tiny_flux_conditioning(num_prompts: int, seq: int = 6, seed: int = 1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(num_prompts, seq, 32, generator=gen),
        "pooled_prompt_embeds": torch.randn(num_prompts, 16, generator=gen),
    }
