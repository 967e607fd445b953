"""Procedural scenes of the shapes world: 32×32 RGB, one to four coloured shapes on black.

The image is a 4×4 grid of 8×8 cells; each object fills a 6×6 box in one cell (a 2-pixel gap to its
neighbours). Relations are drawn in cell coordinates (``left of``: every object of group 0 in a
column left of every object of group 1). :func:`render` is a pure function of ``(spec, seed)``.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from branchgrpo.worlds.shapes.prompts import SceneSpec

IMAGE_SIZE = 32
CELL = 8
GRID = IMAGE_SIZE // CELL  # 4×4 cells
BOX = 6  # side of an object's box (pixels)
BACKGROUND = (0.0, 0.0, 0.0)
PALETTE = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}


def shape_mask(shape: str) -> Tensor:
    """``[BOX, BOX]`` bool mask: a full square (36 pixels), a disc (24) or an upward triangle (18)."""
    y, x = torch.meshgrid(torch.arange(BOX) + 0.5, torch.arange(BOX) + 0.5, indexing="ij")
    if shape == "square":
        return torch.ones(BOX, BOX, dtype=torch.bool)
    if shape == "circle":  # radius² 8: 24 of 36 pixels
        return (x - BOX / 2) ** 2 + (y - BOX / 2) ** 2 <= 8.0
    if shape == "triangle":  # apex at the top centre, base on the bottom row
        return (x - BOX / 2).abs() <= y / 2
    raise ValueError(f"shape must be one of circle, square, triangle, got {shape!r}")


def _cells(spec: SceneSpec, rng: random.Random) -> list[list[tuple[int, int]]]:
    """Cells ``(row, col)`` per group, all distinct, satisfying the relation."""
    all_cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    if spec.relation is None:
        return [rng.sample(all_cells, spec.groups[0].count)]
    axis = 1 if spec.relation in ("left of", "right of") else 0
    first_low = spec.relation in ("left of", "above")
    split = rng.randint(1, GRID - 1)  # group "low" in lines < split, "high" in lines ≥ split
    low = [cell for cell in all_cells if cell[axis] < split]
    high = [cell for cell in all_cells if cell[axis] >= split]
    a, b = (low, high) if first_low else (high, low)
    return [rng.sample(a, spec.groups[0].count), rng.sample(b, spec.groups[1].count)]


def render(spec: SceneSpec, seed: int) -> Tensor:
    """The scene ``[3, 32, 32]`` in [0, 1] (float32) for ``spec`` with layout seed ``seed``."""
    rng = random.Random(seed)
    image = torch.tensor(BACKGROUND).view(3, 1, 1).repeat(1, IMAGE_SIZE, IMAGE_SIZE)
    for group, cells in zip(spec.groups, _cells(spec, rng)):
        mask = shape_mask(group.shape)
        colour = torch.tensor(PALETTE[group.colour]).view(3, 1, 1)
        for row, col in cells:
            y0, x0 = row * CELL + 1, col * CELL + 1
            region = image[:, y0 : y0 + BOX, x0 : x0 + BOX]
            image[:, y0 : y0 + BOX, x0 : x0 + BOX] = torch.where(mask, colour, region)
    return image


def render_batch(specs: list[SceneSpec], seeds: list[int]) -> Tensor:
    """``[N, 3, 32, 32]`` in [0, 1]."""
    return torch.stack([render(s, seed) for s, seed in zip(specs, seeds)])
