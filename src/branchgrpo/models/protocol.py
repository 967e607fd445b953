"""The minimal policy protocol the engine needs: a velocity for a batch of latents.

Conditioning is a mapping of tensors whose leading dimension indexes prompts; the engine selects
one row per latent with :func:`select_conditioning`, so a batch may mix prompts, trees and steps.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from torch import Tensor

Conditioning = Mapping[str, Tensor]


class VelocityModel(Protocol):
    """``vθ(x, σ, c)`` for a batch: ``latents [B, ...]``, ``sigmas [B]`` in [0, 1] → ``[B, ...]``."""

    def __call__(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning) -> Tensor: ...


def select_conditioning(conditioning: Conditioning, prompt_index: Tensor) -> dict[str, Tensor]:
    """Rows of every conditioning tensor for ``prompt_index [B]`` (per-row prompt conditioning)."""
    out = {}
    for key, value in conditioning.items():
        out[key] = value[prompt_index.to(value.device)]
    return out
