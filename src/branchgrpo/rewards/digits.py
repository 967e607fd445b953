"""The digits world's reward behind the common interface: ``p(prompted digit | image)``.

Grey images ``[B, 1, 16, 16]`` in ``[0, 1]``; the digit is parsed from each prompt
(``"a handwritten 7"``). Same computation as :meth:`branchgrpo.worlds.digits.DigitsWorld.reward`
(which the tests compare against), with only the classifier loaded. The digits world is imported
lazily, when the reward is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from branchgrpo.rewards.base import CheckpointError, Reward, load_state_dict_file, load_strict


class DigitsReward(Reward):
    """Args:
        checkpoint: None for the shipped classifier, or a folder with ``config.json`` +
            ``model.safetensors`` (the layout of ``assets/digits/reward``), or such a
            ``model.safetensors`` with its ``config.json`` beside it.
    """

    name = "digits"
    input_channels = 1
    embeds = True  # the classifier's last hidden layer

    def __init__(self, checkpoint: str | Path | None = None, *, device="cpu", dtype="float32"):
        super().__init__(device, dtype)
        from branchgrpo.worlds.digits.data import IMAGE_SIZE
        from branchgrpo.worlds.digits.prompts import parse_digit
        from branchgrpo.worlds.digits.reward import DigitClassifier, digit_probability

        self.image_size = IMAGE_SIZE
        self._parse_digit = parse_digit
        self._digit_probability = digit_probability
        if checkpoint is None:
            from branchgrpo.worlds.digits.world import load_classifier

            classifier = load_classifier()
        else:
            path = Path(checkpoint).expanduser()
            folder, weights = (path, path / "model.safetensors") if path.is_dir() else (path.parent, path)
            if not weights.is_file():
                raise CheckpointError(self.name, weights, "does not exist; expected the digits classifier model.safetensors")
            config = folder / "config.json"
            if not config.is_file():
                raise CheckpointError(self.name, config, "does not exist; expected the classifier's config.json beside its weights")
            try:
                meta = json.loads(config.read_text())
                classifier = DigitClassifier(**meta["config"])
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(self.name, config, f"is not a digits classifier config ({err})") from err
            load_strict(self.name, classifier, load_state_dict_file(self.name, weights), weights)
        self.classifier = classifier.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)

    def check_inputs(self, images: Tensor, prompts):
        prompts = super().check_inputs(images, prompts)
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"reward 'digits' scores images [B, 1, {self.image_size}, {self.image_size}], got {tuple(images.shape)}"
            )
        return prompts

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        digits = torch.tensor([self._parse_digit(p) for p in prompts], dtype=torch.long)
        pixels = (images * 2.0 - 1.0).to(self.dtype)
        return self._digit_probability(self.classifier, pixels, digits).float()

    def _embed(self, images: Tensor, prompts: list[str]) -> Tensor:
        """The classifier's last hidden layer (after its ReLU), the features its logits are read from."""
        pixels = (images * 2.0 - 1.0).to(self.dtype)
        return self.classifier.head[:-1](self.classifier.features(pixels))
