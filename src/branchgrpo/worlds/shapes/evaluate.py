"""Sample the shapes generator with the engine's rollout and score it with the verifier."""

from __future__ import annotations

import torch
from torch import Tensor

from branchgrpo.tree.rollout import rollout
from branchgrpo.worlds.digits.evaluate import sample_spec


@torch.no_grad()
def sample_and_score(
    world, prompts: list[str], samples_per_prompt: int, *, eta: float = 0.3, seed: int = 0, micro_batch: int = 256
) -> tuple[Tensor, list[str], Tensor]:
    """``(images [N, 3, 32, 32] in [0, 1], their prompts, rewards [N])`` with the digits sampler
    (:func:`branchgrpo.worlds.digits.evaluate.sample_spec`: 20 steps, shift 3, ``eta``)."""
    conditioning = world.encode_prompts(prompts)
    tree = rollout(
        world.policy, conditioning, sample_spec(samples_per_prompt, eta), len(prompts), world.latent_shape,
        generator=torch.Generator().manual_seed(seed), micro_batch=micro_batch, device=world.device,
    )
    leaf_prompts = [prompts[int(g)] for g in tree.group[-1]]
    images = world.decode(tree.leaf_x0).cpu()
    return images, leaf_prompts, world.reward(images, leaf_prompts).cpu()


def image_grid(images: Tensor, columns: int) -> Tensor:
    """Tile ``[N, 3, H, W]`` images into one ``[3, rows·(H+1), columns·(W+1)]`` image (grey gaps)."""
    n, c, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.full((c, rows * (h + 1), columns * (w + 1)), 0.5)
    for index in range(n):
        r, col = divmod(index, columns)
        grid[:, r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = images[index]
    return grid
