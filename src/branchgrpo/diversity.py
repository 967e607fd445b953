"""Sample diversity: how different the samples of one prompt are from each other.

A policy can buy reward with diversity (every prompt's samples collapse onto one good image), and
the mean reward does not show it. Per prompt, diversity is the **mean over the unordered pairs of
its samples of a distance** between them; a run's number is the mean over prompts (a prompt with a
single sample has no pair and is left out). Two distances:

- **pixel** (:func:`pixel_diversity`): the RMS pixel difference ``sqrt(mean((a − b)²))`` of the
  decoded samples in [0, 1], over every element (channels, and frames for videos). 0 = identical;
  two independent uniform-noise images are ≈ 0.41 apart. Sensitive to any change, including shifts
  of the same content, so it is an upper-bound-like view.
- **feature** (:func:`feature_diversity`): the Euclidean distance between unit-normalised
  embeddings (range [0, 2]). The default embedding, :class:`RandomConvFeatures`, is a small
  convolutional network with **fixed, seeded random weights** (three 3×3 conv + ReLU + 2×2
  average-pool stages on the sample resized to 64×64, then a 4×4 grid of 128 channels).

Why random features and not a learned embedding: this number must exist for every model family,
offline, on every machine, with no checkpoint to download, and it must not be coupled to the reward
(the reward model's own features are what the policy is optimised against, so their spread moves
with the reward itself). Untrained CNNs with random filters are known to give useful image
representations — local edges, blobs and their layout (Jarrett et al., 2009, "What is the best
multi-stage architecture for object recognition?"; Saxe et al., 2011, "On random weights and
unsupervised feature learning") — and randomly initialised CNN embeddings have been proposed for
evaluating generative models where ImageNet-trained features do not fit the domain (Naeem et al.,
2020, "Reliable Fidelity and Diversity Metrics for Generative Models"). The limits are honest:
these features are not semantic (two different objects drawn with similar strokes in the same place
can be close), and the 4×4 grid keeps coarse layout only. For semantic diversity pass any other
embedding (e.g. DINO or CLIP image features) as ``features=`` to :func:`sample_diversity`.

Everything here is a pure function of tensors; distances are computed in float64 from
differences (no Gram-matrix cancellation), in chunks, so large images and videos need no float64
copy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

FEATURE_SIZE = 64  # samples are resized to FEATURE_SIZE × FEATURE_SIZE before the random network
FEATURE_SEED = 0
_CHUNK_ELEMENTS = 1 << 24  # float64 elements per chunk of pairwise work (128 MB)


def pairwise_distances(x: Tensor, rms: bool = False) -> Tensor:
    """Euclidean distances between the rows of ``x [N, ...]`` (flattened) as ``[N, N]`` float64.

    With ``rms`` the squared distance is divided by the row size first: ``sqrt(mean((a − b)²))``.
    """
    flat = x.reshape(x.shape[0], -1)
    n, size = flat.shape
    squared = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, size, step):
        block = flat[:, start : start + step].double()
        squared += torch.cdist(block, block, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    if rms:
        squared /= max(size, 1)
    return squared.sqrt()


def mean_pairwise_distance(x: Tensor, rms: bool = False) -> float:
    """Mean of :func:`pairwise_distances` over the unordered pairs ``i < j`` (NaN for fewer than 2 rows)."""
    n = x.shape[0]
    if n < 2:
        return float("nan")
    distances = pairwise_distances(x, rms)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=distances.device), diagonal=1)
    return float(distances[upper].mean())


def per_prompt_diversity(x: Tensor, prompts: Sequence[Hashable], rms: bool = False) -> dict[Hashable, float]:
    """``{prompt: mean pairwise distance among its rows of x [N, ...]}`` for prompts with ≥ 2 rows."""
    if len(prompts) != x.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {x.shape[0]} samples; pass one prompt per sample")
    rows: dict[Hashable, list[int]] = {}
    for index, prompt in enumerate(prompts):
        rows.setdefault(prompt, []).append(index)
    return {
        prompt: mean_pairwise_distance(x[torch.tensor(index, device=x.device)], rms)
        for prompt, index in rows.items()
        if len(index) >= 2
    }


def _mean(values: dict) -> float:
    return sum(values.values()) / len(values) if values else float("nan")


class RandomConvFeatures(torch.nn.Module):
    """A fixed, seeded, randomly initialised conv net: images ``[N, C, H, W]`` in [0, 1] → ``[N, 2048]``.

    Grey images (C = 1) are repeated to RGB, so a grey image and its RGB copy embed alike; every
    image is resized (bilinear, antialiased) to 64×64 and mapped to [−1, 1]. Weights are Kaiming-
    normal draws from ``torch.Generator().manual_seed(seed)`` (the same on every machine; the global
    RNG is never touched), no biases.
    """

    widths = (32, 64, 128)

    def __init__(self, seed: int = FEATURE_SEED):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        channels = 3
        for index, width in enumerate(self.widths):
            fan_in = channels * 9
            weight = torch.randn((width, channels, 3, 3), generator=generator) * (2.0 / fan_in) ** 0.5
            self.register_buffer(f"weight{index}", weight)
            channels = width

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"RandomConvFeatures needs images [N, 1 or 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = x * 2.0 - 1.0
        for index in range(len(self.widths)):
            x = F.avg_pool2d(F.relu(F.conv2d(x, getattr(self, f"weight{index}"), padding=1)), 2)
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


@functools.lru_cache(maxsize=4)
def _feature_network(seed: int) -> RandomConvFeatures:
    return RandomConvFeatures(seed)


def random_conv_features(images: Tensor, seed: int = FEATURE_SEED, batch: int = 64) -> Tensor:
    """Unit-norm :class:`RandomConvFeatures` of samples (computed on the CPU in float32), ``[N, 2048]``.

    ``images [N, C, H, W]``; videos ``[N, F, C, H, W]`` embed frame by frame, and a video's vector
    is its unit frame vectors concatenated and divided by ``sqrt(F)`` (unit norm again), so the
    distance of two videos is the RMS over frames of their per-frame distances.
    """
    net = _feature_network(seed)
    video = images.ndim == 5
    frames = images.shape[1] if video else 1
    flat = images.flatten(0, 1) if video else images
    parts = [net(flat[start : start + batch].detach().cpu()) for start in range(0, flat.shape[0], batch)]
    features = F.normalize(torch.cat(parts), dim=1)
    if video:
        features = features.reshape(images.shape[0], frames * features.shape[1]) / frames**0.5
    return features


FeatureFn = Callable[[Tensor], Tensor]


@dataclass
class Diversity:
    """Per-prompt mean pairwise distances and their means over prompts (NaN when no prompt has 2 samples)."""

    pixel: float
    feature: float
    per_prompt: dict[Hashable, dict[str, float]] = field(default_factory=dict)  # {prompt: {"pixel", "feature"}}


def pixel_diversity(images: Tensor, prompts: Sequence[Hashable]) -> dict[Hashable, float]:
    """Per prompt: mean over pairs of the RMS pixel difference of samples ``[N, ...]`` in [0, 1]."""
    return per_prompt_diversity(images, prompts, rms=True)


def feature_diversity(images: Tensor, prompts: Sequence[Hashable], features: FeatureFn = random_conv_features
                      ) -> dict[Hashable, float]:
    """Per prompt: mean over pairs of the Euclidean distance of the samples' ``features`` vectors."""
    return per_prompt_diversity(features(images), prompts)


def sample_diversity(images: Tensor, prompts: Sequence[Hashable], features: FeatureFn = random_conv_features
                     ) -> Diversity:
    """Pixel and feature diversity of samples grouped by prompt (see the module docstring)."""
    pixel = pixel_diversity(images, prompts)
    feature = feature_diversity(images, prompts, features)
    per_prompt = {p: {"pixel": pixel[p], "feature": feature[p]} for p in pixel}
    return Diversity(pixel=_mean(pixel), feature=_mean(feature), per_prompt=per_prompt)


__all__ = [
    "Diversity",
    "RandomConvFeatures",
    "feature_diversity",
    "mean_pairwise_distance",
    "pairwise_distances",
    "per_prompt_diversity",
    "pixel_diversity",
    "random_conv_features",
    "sample_diversity",
]
