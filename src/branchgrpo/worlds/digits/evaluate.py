"""Sample the digits generator with the engine's rollout and score it (base-model checks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.spec import TreeSpec
from branchgrpo.worlds.digits.prompts import parse_digit


@dataclass
class SampleScores:
    """Images ``[N, 1, 16, 16]`` in [0, 1], their prompts, rewards ``[N]`` and classifier hits ``[N]``."""

    images: Tensor
    prompts: list[str]
    rewards: Tensor
    correct: Tensor

    @property
    def mean_reward(self) -> float:
        return float(self.rewards.mean())

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())


def sample_spec(samples_per_prompt: int, eta: float = 0.3, steps: int = 20, shift: float = 3.0) -> TreeSpec:
    """Flat sampling (no splits): ``eta > 0`` is the SDE sampler, ``eta = 0`` the Euler ODE."""
    return TreeSpec(steps=steps, shift=shift, eta=eta, split_plan={}, roots_per_prompt=samples_per_prompt)


@torch.no_grad()
def sample_and_score(
    world, prompts: list[str], samples_per_prompt: int, *, eta: float = 0.3, seed: int = 0, micro_batch: int = 256
) -> SampleScores:
    """Sample ``samples_per_prompt`` images per prompt (rollout's ``leaf_x0``), decode and score them."""
    conditioning = world.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(seed)
    tree = rollout(
        world.policy, conditioning, sample_spec(samples_per_prompt, eta), len(prompts), world.latent_shape,
        generator=generator, micro_batch=micro_batch, device=world.device,
    )
    leaf_prompts = [prompts[int(g)] for g in tree.group[-1]]
    images = world.decode(tree.leaf_x0)
    rewards = world.reward(images, leaf_prompts)
    digits = torch.tensor([parse_digit(p) for p in leaf_prompts])
    predicted = world.classifier(images.to(world.device) * 2 - 1).argmax(-1).cpu()
    return SampleScores(images.cpu(), leaf_prompts, rewards.cpu(), predicted == digits)


def image_grid(images: Tensor, columns: int) -> Tensor:
    """Tile ``[N, 1, H, W]`` images into one ``[rows·(H+1), columns·(W+1)]`` grey image."""
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.ones(rows * (h + 1), columns * (w + 1))
    for index in range(n):
        r, c = divmod(index, columns)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = images[index, 0]
    return grid
