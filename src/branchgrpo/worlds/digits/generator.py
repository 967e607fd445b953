"""The generator of the digits world: a small diffusers ``FluxTransformer2DModel`` in pixel space.

A 16×16×1 image is packed 2×2 (:func:`branchgrpo.models.flux.pack_latents`) into 64 tokens × 4
channels, so the transformer runs with ``in_channels=4, patch_size=1`` and no guidance embedding,
exactly as FLUX.1 runs on its VAE latents. Rectified flow as FLUX: ``x_σ = (1 − σ)·x0 + σ·ε``,
``v = ε − x0``, ``timestep = σ``.
"""

from __future__ import annotations

from torch import Tensor

from branchgrpo.models.flux import pack_latents, unpack_latents
from branchgrpo.worlds.digits.data import IMAGE_SIZE

LATENT_SHAPE = ((IMAGE_SIZE // 2) ** 2, 4)  # (64 tokens, 4 channels)

TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,  # double-stream (MM-DiT) blocks
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 3,  # inner width 96
    "joint_attention_dim": 64,  # = text encoder width (prompt_embeds D)
    "pooled_projection_dim": 64,  # = pooled text width (D')
    "guidance_embeds": False,
    "axes_dims_rope": [8, 12, 12],  # sums to attention_head_dim
}


def build_transformer(config: dict | None = None):
    """A freshly initialised ``FluxTransformer2DModel`` (~1.3M parameters with the default config)."""
    from diffusers import FluxTransformer2DModel

    config = dict(config or TRANSFORMER_CONFIG)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return FluxTransformer2DModel.from_config(config)


def images_to_latents(images: Tensor) -> Tensor:
    """Images ``[B, 1, 16, 16]`` in [-1, 1] → packed latents ``[B, 64, 4]``."""
    return pack_latents(images)


def latents_to_images(latents: Tensor) -> Tensor:
    """Packed latents ``[B, 64, 4]`` → images ``[B, 1, 16, 16]`` in [0, 1] (clamped)."""
    return ((unpack_latents(latents.float(), IMAGE_SIZE, IMAGE_SIZE) + 1.0) / 2.0).clamp(0.0, 1.0)
