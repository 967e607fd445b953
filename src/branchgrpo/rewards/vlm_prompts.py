"""What the VLM judge is asked: prompt templates, answer patterns, images as PNG data URLs, and
which images are compared (groups, pair schedules). Used by :mod:`branchgrpo.rewards.vlm`."""

from __future__ import annotations

import base64
import io
import itertools
import random
import re
from typing import Any, Sequence

import torch
from torch import Tensor

POINTWISE_TEMPLATE = (
    "You are judging an AI-generated image for the prompt: \"{prompt}\".\n"
    "Rate how well the image matches the prompt and its visual quality on a scale from 1 to 10, "
    "where 10 is best. Answer with only the number."
)
PAIRWISE_TEMPLATE = (
    "You are comparing two AI-generated images for the prompt: \"{prompt}\".\n"
    "The first image is Image 1, the second is Image 2. Which one matches the prompt better and has "
    "higher visual quality? Answer with only 1 or 2."
)
SCORE_PATTERN = r"(-?\d+(?:\.\d+)?)"  # the first number
CHOICE_PATTERN = r"(?<![\w.])([12AB])(?!\w|\.\d)"  # the first standalone 1, 2, A or B
_FIRST_WINS = {"1": True, "A": True, "2": False, "B": False}
_THINK = re.compile(r"^.*</think>", re.S)  # reasoning before the answer is not parsed


def png_data_url(image: Tensor) -> str:
    """``data:image/png;base64,...`` of one image ``[C, H, W]`` in [0, 1] (C = 1 or 3), 8-bit."""
    from PIL import Image

    pixels = (image.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pair_schedule(size: int, max_pairs_per_image: int | None, rng: random.Random) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of positions ``0..size-1`` to compare within one group.

    All ``size (size - 1) / 2`` pairs, or with ``k = max_pairs_per_image < size - 1`` a circulant
    design on a random permutation: each image meets ``k`` others (``k + 1`` if ``k`` and ``size``
    are both odd), ``size·k/2`` pairs.
    """
    if size < 2:
        return []
    k = size - 1 if max_pairs_per_image is None else min(max_pairs_per_image, size - 1)
    if k == size - 1:
        return list(itertools.combinations(range(size), 2))
    order = list(range(size))
    rng.shuffle(order)
    offsets = list(range(1, k // 2 + 1))
    if k % 2:
        offsets.append(size // 2 if size % 2 == 0 else k // 2 + 1)
    pairs = {tuple(sorted((order[p], order[(p + d) % size]))) for p in range(size) for d in offsets}
    return sorted(pairs)


def _clip(text: Any, limit: int = 80) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = str(text)
    return repr(text[:limit] + ("…" if len(text) > limit else ""))



def _groups(prompts: list[str], group_ids: Tensor | Sequence[int] | None) -> list[list[int]]:
    """Indices of each group, in order of first appearance: images with the same prompt and, when
    given, the same group id (a pair is always judged against one prompt)."""
    if group_ids is None:
        keys: list[Any] = list(prompts)
    else:
        ids = torch.as_tensor(group_ids).reshape(-1)
        if ids.numel() != len(prompts) or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"reward 'vlm': group_ids must be {len(prompts)} integers (one per image), "
                             f"got {tuple(ids.shape)} {ids.dtype}")
        keys = list(zip(ids.tolist(), prompts))
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _where(job: tuple[tuple[int, ...], str]) -> str:
    images, prompt = job
    which = f"image {images[0]}" if len(images) == 1 else f"images {images[0]} vs {images[1]}"
    return f"{which} (prompt {_clip(prompt, 60)})"
