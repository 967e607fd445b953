""":class:`ShapesWorld`: the shipped shapes generator, its prompt encoder and the exact verifier.

Weights live in ``branchgrpo/assets/shapes`` as safetensors with JSON configs; loading reads local
files only (no hub, no pickle). Loading code is the digits world's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from branchgrpo.models.flux import FluxVelocity
from branchgrpo.worlds.digits import world as _digits
from branchgrpo.worlds.shapes.generator import LATENT_SHAPE, LATENT_SIZE, build_transformer, latents_to_images
from branchgrpo.worlds.shapes.prompts import split_prompts
from branchgrpo.worlds.shapes.scenes import IMAGE_SIZE
from branchgrpo.worlds.shapes.text import PromptEncoder
from branchgrpo.worlds.shapes.verifier import verify

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "shapes"


def load_transformer(asset_dir: Path = ASSET_DIR, weights: str | Path | None = None):
    """The generator transformer from its config, with shipped (or ``weights``) safetensors."""
    config = _digits._read_json(asset_dir / "transformer" / "config.json")
    transformer = build_transformer(config)
    path = Path(weights) if weights is not None else asset_dir / "transformer" / "model.safetensors"
    if path.is_dir():
        path = path / "model.safetensors"
    _digits._load_weights(transformer, path, strip_prefix="transformer.")
    return transformer


def load_prompt_encoder(asset_dir: Path = ASSET_DIR) -> PromptEncoder:
    """The frozen tokenizer + tiny CLIP text encoder."""
    return _digits.load_prompt_encoder(asset_dir)


class ShapesWorld:
    """Generator (policy), prompt encoder, decoder and verifier reward of the shapes world.

    Attributes:
        policy: :class:`~branchgrpo.models.flux.FluxVelocity` on packed latents ``[B, 64, 48]``.
        latent_shape: ``(64, 48)``.
        train_prompts / heldout_prompts: :func:`~branchgrpo.worlds.shapes.prompts.split_prompts`.
    """

    latent_shape: tuple[int, int] = LATENT_SHAPE
    image_size: int = IMAGE_SIZE

    def __init__(self, policy: FluxVelocity, prompt_encoder: PromptEncoder):
        self.policy = policy
        self.prompt_encoder = prompt_encoder
        self.train_prompts, self.heldout_prompts = split_prompts()

    @classmethod
    def load(cls, device: str | torch.device = "cpu", generator_weights: str | Path | None = None) -> "ShapesWorld":
        transformer = load_transformer(weights=generator_weights)
        policy = FluxVelocity(transformer, LATENT_SIZE, LATENT_SIZE, guidance_scale=None).to(device)
        prompt_encoder = load_prompt_encoder().requires_grad_(False).eval().to(device)
        return cls(policy, prompt_encoder)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [P, 12, 64], "pooled_prompt_embeds": [P, 64]}`` (no grad)."""
        return {k: v.detach().float() for k, v in self.prompt_encoder(prompts).items()}

    def decode(self, latents: Tensor) -> Tensor:
        """Packed ``[B, 64, 48]`` → images ``[B, 3, 32, 32]`` in [0, 1]."""
        return latents_to_images(latents)

    @torch.no_grad()
    def reward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """The verifier's reward ``[B]`` in [0, 1] for images ``[B, 3, 32, 32]`` in [0, 1]."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images must be [B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] in [0, 1], got {tuple(images.shape)}")
        return verify(images, prompts).to(images.device)
