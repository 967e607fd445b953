"""The generator of the shapes world: a small diffusers ``FluxTransformer2DModel`` in pixel space.

A 32×32×3 image in [-1, 1] is packed in 4×4 pixel patches — a 2×2 pixel-unshuffle to 12×16×16,
then FLUX's 2×2 packing (:func:`branchgrpo.models.flux.pack_latents`) — into 64 tokens × 48
channels, so one RL iteration costs what a digits iteration costs (also 64 tokens). The
transformer is the digits one with ``in_channels = out_channels = 48``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from branchgrpo.models.flux import pack_latents, unpack_latents
from branchgrpo.worlds.digits.generator import TRANSFORMER_CONFIG as DIGITS_TRANSFORMER_CONFIG
from branchgrpo.worlds.digits.generator import build_transformer
from branchgrpo.worlds.shapes.scenes import IMAGE_SIZE

LATENT_SIZE = IMAGE_SIZE // 2  # the "latent" the packing sees: 12 × 16 × 16
LATENT_SHAPE = ((LATENT_SIZE // 2) ** 2, 48)  # (64 tokens, 48 channels)

TRANSFORMER_CONFIG = {**DIGITS_TRANSFORMER_CONFIG, "in_channels": 48, "out_channels": 48}

__all__ = ["LATENT_SHAPE", "LATENT_SIZE", "TRANSFORMER_CONFIG", "build_transformer", "images_to_latents",
           "latents_to_images"]


def images_to_latents(images: Tensor) -> Tensor:
    """Images ``[B, 3, 32, 32]`` in [-1, 1] → packed latents ``[B, 64, 48]``."""
    return pack_latents(F.pixel_unshuffle(images, 2))


def latents_to_images(latents: Tensor) -> Tensor:
    """Packed latents ``[B, 64, 48]`` → images ``[B, 3, 32, 32]`` in [0, 1] (clamped)."""
    x = F.pixel_shuffle(unpack_latents(latents.float(), LATENT_SIZE, LATENT_SIZE), 2)
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
