"""The shapes world's reward behind the common interface: its exact programmatic verifier.

RGB images ``[B, 3, 32, 32]`` in ``[0, 1]``; each prompt is parsed to a scene spec
(``"two red circles left of a blue square"``) and checked for counts, colours, shapes and the
relation with partial credit (:mod:`branchgrpo.worlds.shapes.verifier`, docs/shapes-world.md).
No learned model and no checkpoint.
"""

from __future__ import annotations

from torch import Tensor

from branchgrpo.rewards.base import Reward


class ShapesReward(Reward):
    """Args:
        checkpoint: must be None (the verifier has no weights).
    """

    name = "shapes"
    input_channels = 3

    def __init__(self, checkpoint=None, *, device="cpu", dtype="float32"):
        super().__init__(device, dtype)
        if checkpoint is not None:
            raise ValueError(f"reward 'shapes' is a programmatic verifier and takes no checkpoint, got {checkpoint!r}")
        from branchgrpo.worlds.shapes.scenes import IMAGE_SIZE
        from branchgrpo.worlds.shapes.verifier import verify

        self.image_size = IMAGE_SIZE
        self._verify = verify

    def check_inputs(self, images: Tensor, prompts):
        prompts = super().check_inputs(images, prompts)
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"reward 'shapes' scores images [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}"
            )
        return prompts

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self._verify(images, prompts).to(images.device)
