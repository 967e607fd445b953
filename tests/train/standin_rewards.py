"""Checkpoint-free rewards for launching the shipped configs on stand-in models.

The configs name rewards whose checkpoints (HPS, PickScore, the edit reward's CLIP) or servers (remote, VideoAlign) are not
available to the tests; ``imports: [standin_rewards]`` plus ``reward.name=standin_brightness``
(``standin_video_brightness`` for video families) replaces them by the mean brightness of the decoded
output. The factories take and ignore the config's ``reward.checkpoint`` and ``reward.options``, so
the rest of the reward section stays as the config wrote it.
"""

from __future__ import annotations

from branchgrpo import register_reward
from branchgrpo.rewards.base import Reward, check_video_inputs


class Brightness(Reward):
    """Mean pixel value of each image ``[B, C, H, W]`` (or video ``[B, F, C, H, W]``)."""

    name = "standin_brightness"

    def _score(self, images, prompts):
        return images.flatten(1).mean(dim=1)


class VideoBrightness(Brightness):
    name = "standin_video_brightness"
    modality = "video"

    def check_inputs(self, images, prompts):
        return check_video_inputs(self, images, prompts)


def image_brightness(checkpoint=None, device="cpu", dtype="float32", **options) -> Reward:  # noqa: ARG001
    return Brightness(device, dtype)


def video_brightness(checkpoint=None, device="cpu", dtype="float32", **options) -> Reward:  # noqa: ARG001
    return VideoBrightness(device, dtype)


def register() -> None:
    """Make ``standin_brightness`` and ``standin_video_brightness`` reward names (done on import)."""
    register_reward("standin_brightness", image_brightness, "test stand-in: mean brightness of each image",
                    modality="image", needs_checkpoint=False)
    register_reward("standin_video_brightness", video_brightness, "test stand-in: mean brightness of each video",
                    modality="video", needs_checkpoint=False)


def unregister() -> None:
    """Take the two names out of the registry again (a test process's other tests list the rewards)."""
    from branchgrpo.rewards.registry import _META, _REGISTRY

    for name in ("standin_brightness", "standin_video_brightness"):
        _REGISTRY.pop(name, None), _META.pop(name, None)


register()
