"""The built-in shapes world as a model family: compositional 32×32 RGB scenes, exact verifier.

Ships inside the package (no download) with its prompts and its reward (``shapes``, a programmatic
verifier), so ``branchgrpo train --config configs/shapes-branchgrpo.yaml`` runs on a CPU. See
docs/shapes-world.md.
"""

from __future__ import annotations

import torch

from branchgrpo.families.digits import DigitsFamily
from branchgrpo.families.base import PolicyBundle


class ShapesFamily(DigitsFamily):
    """As the digits family (options, ``model.path`` check, method defaults), on the shapes world."""

    name = "shapes"
    description = "built-in 32x32 RGB shapes world (FLUX transformer, 1.3 M parameters, exact verifier), CPU, no download"

    def build(self, config, device: torch.device, dtype: torch.dtype) -> PolicyBundle:
        from branchgrpo.worlds.shapes import ShapesWorld

        world = ShapesWorld.load(device=device, generator_weights=config.model.path)
        return PolicyBundle(
            family=self.name,
            policy=world.policy,
            trainable=world.policy.transformer,
            latent_shape=tuple(world.latent_shape),
            encode_prompts=world.encode_prompts,
            decode=world.decode,
            train_prompts=list(world.train_prompts),
            heldout_prompts=list(world.heldout_prompts),
            builtin_reward=world.reward,
            modality="image",
        )
