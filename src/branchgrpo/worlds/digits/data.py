"""The scikit-learn handwritten digits as 16×16 grey images in [-1, 1], with a fixed split.

``sklearn.datasets.load_digits`` ships 1797 8×8 images (values 0–16) inside scikit-learn, so the
world needs no download. They are upsampled bilinearly to 16×16 and scaled to [-1, 1].
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 16
SPLIT_SEED = 0  # permutation seed of the train/held-out split
HELDOUT_SIZE = 297  # 1797 = 1500 train + 297 held-out

Split = Literal["train", "heldout", "all"]


def _load_sklearn_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # scikit-learn is only needed for data, not for the shipped weights
        raise ImportError(
            "the digits data come from scikit-learn; install it with `pip install scikit-learn`"
        ) from err
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)  # [1797, 8, 8], 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    return images, labels


def upsample(images_8x8: Tensor) -> Tensor:
    """``[N, 8, 8]`` values 0–16 → ``[N, 1, 16, 16]`` in [-1, 1] (bilinear)."""
    x = (images_8x8.float() / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0) * 2.0 - 1.0


def split_indices(num_images: int) -> tuple[Tensor, Tensor]:
    """``(train, heldout)`` indices of the fixed seeded split."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return order[HELDOUT_SIZE:].sort().values, order[:HELDOUT_SIZE].sort().values


def load_digit_images(split: Split = "train") -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, 16, 16]`` in [-1, 1] and labels ``[N]`` of one split."""
    images, labels = _load_sklearn_digits()
    images = upsample(images)
    if split == "all":
        return images, labels
    train, heldout = split_indices(images.shape[0])
    if split == "train":
        return images[train], labels[train]
    if split == "heldout":
        return images[heldout], labels[heldout]
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
