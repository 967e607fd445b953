"""The reward of the digits world: a small CNN classifier ``p(digit | image)``.

The reward of an image for a prompt is the classifier's probability of the prompted digit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DigitClassifier(nn.Module):
    """CNN on ``[B, 1, 16, 16]`` images in [-1, 1] → logits ``[B, 10]`` (~40k parameters)."""

    def __init__(self, width: int = 16, hidden: int = 64, dropout: float = 0.25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        self.config = {"width": width, "hidden": hidden, "dropout": dropout}

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def digit_probability(classifier: nn.Module, images: Tensor, digits: Tensor) -> Tensor:
    """``p(digits | images)`` ``[B]`` for images ``[B, 1, 16, 16]`` in [-1, 1] and digits ``[B]``."""
    probs = classifier(images).float().softmax(dim=-1)
    return probs.gather(1, digits.reshape(-1, 1).to(probs.device)).squeeze(1)
