"""The exact programmatic verifier of the shapes world (no learned model): see docs/shapes-world.md.

1. Quantise every pixel to the nearest colour of the palette ∪ {background} (Euclidean RGB).
2. Objects: 8-connected components of one palette colour with at least :data:`MIN_PIXELS` pixels.
3. Shape of a component from its bounding box: fill = pixels / box area ≥ :data:`SQUARE_FILL` →
   square; else bottom-half share of its pixels ≥ :data:`TRIANGLE_BOTTOM` → triangle; else circle.
4. Score against the parsed prompt (:func:`score_objects`), in [0, 1].

Partial credit. ``ratio(k, n) = min(k, n) / max(k, n)`` (0 when one is 0). Per prompt group ``g``
(``n_g`` objects of colour ``c_g`` and shape ``s_g``): ``m_g`` = detected objects of colour and
shape, ``k_g`` = of colour, ``h_g`` = of shape, where objects of the other group's exact kind are
not counted for ``g``; ``obj = mean_g(0.6·ratio(m_g, n_g) +
0.2·ratio(k_g, n_g) + 0.2·ratio(h_g, n_g))``; ``total = ratio(N, Σ n_g)`` with ``N`` all detected
objects. Without a relation: ``reward = 0.8·obj + 0.2·total``. With one: ``pos`` = 1 when the mean
centre of group 0's matching objects lies strictly on the named side of group 1's (x for left/right,
y for above/below), else 0 (also when a group has none); ``reward = 0.6·obj + 0.15·total + 0.25·pos``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from branchgrpo.worlds.shapes.prompts import SceneSpec, parse_prompt
from branchgrpo.worlds.shapes.scenes import BACKGROUND, PALETTE

MIN_PIXELS = 8
SQUARE_FILL = 0.83
TRIANGLE_BOTTOM = 0.65
COLOUR_NAMES = tuple(PALETTE)
_COLOURS = torch.tensor([BACKGROUND] + [PALETTE[c] for c in COLOUR_NAMES])  # index 0 = background


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    x: float  # centre, pixels
    y: float
    pixels: int


def quantise(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] → ``[H, W]`` int: 0 background, 1.. the palette colours in order."""
    pixels = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0)  # [H, W, 3]
    distances = ((pixels[:, :, None, :] - _COLOURS) ** 2).sum(-1)
    return distances.argmin(-1).numpy()


def classify_shape(mask: np.ndarray) -> str:
    """Shape of one component's bool mask (cropped or not) by fill ratio and bottom-half share."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    area = (y1 - y0 + 1) * (x1 - x0 + 1)
    if len(ys) / area >= SQUARE_FILL:
        return "square"
    middle = (y0 + y1) / 2.0
    bottom = (ys > middle).sum() + 0.5 * (ys == middle).sum()
    return "triangle" if bottom / len(ys) >= TRIANGLE_BOTTOM else "circle"


def detect_objects(image: Tensor) -> list[DetectedObject]:
    """The objects of one image ``[3, H, W]`` in [0, 1]."""
    from scipy import ndimage

    labels = quantise(image)
    objects = []
    for index, colour in enumerate(COLOUR_NAMES, start=1):
        components, count = ndimage.label(labels == index, structure=np.ones((3, 3), dtype=int))
        for component in range(1, count + 1):
            mask = components == component
            size = int(mask.sum())
            if size < MIN_PIXELS:
                continue
            ys, xs = np.nonzero(mask)
            objects.append(DetectedObject(colour, classify_shape(mask), float(xs.mean()), float(ys.mean()), size))
    return objects


def ratio(k: int, n: int) -> float:
    return 0.0 if k == 0 or n == 0 else min(k, n) / max(k, n)


def score_objects(spec: SceneSpec, objects: list[DetectedObject]) -> float:
    """The partial-credit reward (module docstring) of detected ``objects`` for ``spec``."""
    obj = 0.0
    kinds = {(g.colour, g.shape) for g in spec.groups}
    for group in spec.groups:
        # objects of another group's exact kind count for that group only
        own = [o for o in objects if (o.colour, o.shape) == (group.colour, group.shape) or (o.colour, o.shape) not in kinds]
        m = sum(o.colour == group.colour and o.shape == group.shape for o in own)
        k = sum(o.colour == group.colour for o in own)
        h = sum(o.shape == group.shape for o in own)
        obj += 0.6 * ratio(m, group.count) + 0.2 * ratio(k, group.count) + 0.2 * ratio(h, group.count)
    obj /= len(spec.groups)
    total = ratio(len(objects), spec.num_objects)
    if spec.relation is None:
        return 0.8 * obj + 0.2 * total
    centres = []
    for group in spec.groups:
        matching = [(o.x, o.y) for o in objects if o.colour == group.colour and o.shape == group.shape]
        centres.append(np.mean(matching, axis=0) if matching else None)
    pos = 0.0
    if centres[0] is not None and centres[1] is not None:
        (ax, ay), (bx, by) = centres
        pos = float({"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[spec.relation])
    return 0.6 * obj + 0.15 * total + 0.25 * pos


def verify(images: Tensor, prompts: list[str]) -> Tensor:
    """Rewards ``[B]`` in [0, 1] for images ``[B, 3, H, W]`` in [0, 1], one prompt each."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] RGB in [0, 1], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    specs = [parse_prompt(p) for p in prompts]
    return torch.tensor([score_objects(s, detect_objects(img)) for s, img in zip(specs, images)], dtype=torch.float32)
