""":class:`DigitsWorld`: the shipped digits generator, its prompt encoder and its reward.

All weights live in ``branchgrpo/assets/digits`` as safetensors with JSON configs; loading reads
local files only (no hub, no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from branchgrpo.models.flux import FluxVelocity
from branchgrpo.worlds.digits.data import IMAGE_SIZE
from branchgrpo.worlds.digits.generator import LATENT_SHAPE, build_transformer, latents_to_images
from branchgrpo.worlds.digits.prompts import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, parse_digit, prompts_for
from branchgrpo.worlds.digits.reward import DigitClassifier, digit_probability
from branchgrpo.worlds.digits.text import PromptEncoder, load_tokenizer

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "digits"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"digits world asset {path} is missing; reinstall branchgrpo or rebuild the assets with "
            "scripts/train_digits_reward.py and scripts/train_digits_generator.py"
        )
    return json.loads(path.read_text())


def _load_weights(module: torch.nn.Module, path: Path, strip_prefix: str = "") -> None:
    """Load a safetensors state dict (strict); a leading ``strip_prefix`` on keys is removed."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found (expected a .safetensors file)")
    state = load_file(str(path))
    if strip_prefix and all(k.startswith(strip_prefix) for k in state):
        state = {k[len(strip_prefix) :]: v for k, v in state.items()}
    module.load_state_dict(state, strict=True)


def load_transformer(asset_dir: Path = ASSET_DIR, weights: str | Path | None = None):
    """The generator transformer from its config, with shipped (or ``weights``) safetensors."""
    config = _read_json(asset_dir / "transformer" / "config.json")
    transformer = build_transformer(config)
    path = Path(weights) if weights is not None else asset_dir / "transformer" / "model.safetensors"
    if path.is_dir():
        path = path / "model.safetensors"
    # Also accept a FluxVelocity state dict (keys "transformer.…").
    _load_weights(transformer, path, strip_prefix="transformer.")
    return transformer


def load_prompt_encoder(asset_dir: Path = ASSET_DIR) -> PromptEncoder:
    """The frozen tokenizer + tiny CLIP text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**_read_json(asset_dir / "text_encoder" / "config.json"))
    text_model = CLIPTextModel(config)
    _load_weights(text_model, asset_dir / "text_encoder" / "model.safetensors")
    tokenizer_path = asset_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"digits world tokenizer {tokenizer_path} is missing")
    return PromptEncoder(load_tokenizer(tokenizer_path), text_model)


def load_classifier(asset_dir: Path = ASSET_DIR) -> DigitClassifier:
    """The reward CNN (eval mode)."""
    meta = _read_json(asset_dir / "reward" / "config.json")
    classifier = DigitClassifier(**meta["config"])
    _load_weights(classifier, asset_dir / "reward" / "model.safetensors")
    return classifier.eval()


class DigitsWorld:
    """Generator (policy), prompt encoder, decoder and reward of the digits world.

    Attributes:
        policy: :class:`~branchgrpo.models.flux.FluxVelocity` on packed latents ``[B, 64, 4]``;
            its trainable parameters are the transformer's.
        latent_shape: ``(64, 4)``, one packed latent without the batch dim.
        train_prompts / heldout_prompts: RL prompts (4 / 2 phrasings × digits 0–9).
    """

    latent_shape: tuple[int, int] = LATENT_SHAPE
    image_size: int = IMAGE_SIZE

    def __init__(self, policy: FluxVelocity, prompt_encoder: PromptEncoder, classifier: DigitClassifier):
        self.policy = policy
        self.prompt_encoder = prompt_encoder
        self.classifier = classifier
        self.train_prompts = prompts_for(TRAIN_TEMPLATES)
        self.heldout_prompts = prompts_for(HELDOUT_TEMPLATES)

    @classmethod
    def load(
        cls, device: str | torch.device = "cpu", generator_weights: str | Path | None = None
    ) -> "DigitsWorld":
        """The shipped world on ``device``; ``generator_weights`` (a safetensors file of the
        transformer or of the FluxVelocity policy) replaces the shipped generator."""
        transformer = load_transformer(weights=generator_weights)
        policy = FluxVelocity(transformer, IMAGE_SIZE, IMAGE_SIZE, guidance_scale=None).to(device)
        prompt_encoder = load_prompt_encoder().requires_grad_(False).eval().to(device)
        classifier = load_classifier().requires_grad_(False).to(device)
        return cls(policy, prompt_encoder, classifier)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [P, 12, 64], "pooled_prompt_embeds": [P, 64]}`` (no grad)."""
        return {k: v.detach().float() for k, v in self.prompt_encoder(prompts).items()}

    def decode(self, latents: Tensor) -> Tensor:
        """Packed ``[B, 64, 4]`` → images ``[B, 1, 16, 16]`` in [0, 1]."""
        return latents_to_images(latents)

    @torch.no_grad()
    def reward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``p(prompted digit | image)`` ``[B]`` in [0, 1] for images ``[B, 1, 16, 16]`` in [0, 1]."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images must be [B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] in [0, 1], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
        digits = torch.tensor([parse_digit(p) for p in prompts], dtype=torch.long)
        device = next(self.classifier.parameters()).device
        pixels = images.to(device=device, dtype=torch.float32).clamp(0.0, 1.0) * 2.0 - 1.0
        return digit_probability(self.classifier, pixels, digits).float()
