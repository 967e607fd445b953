"""Reward models that score decoded images against their prompts (see docs/rewards.md).

    from branchgrpo.rewards import build_reward
    reward = build_reward("pickscore", "/models/PickScore_v1", device="cuda", dtype="bfloat16",
                          processor="/models/CLIP-ViT-H-14-laion2B-s32B-b79K")
    scores = reward(images, prompts)          # images [B, 3, H, W] in [0, 1] -> [B] float32

    mixed = build_reward("hps:1.0,clip:0.5", {"hps": ".../HPS_v2.1_compressed.pt", "clip": ".../clip-vit-large-patch14"},
                         device="cuda", normalize="group")
    out = mixed.score(images, prompts, group_ids)   # out.total [B], out.components {"hps": [B], "clip": [B]}

Every reward is a callable ``(images, prompts) -> [B]``, so it is a drop-in ``RewardFn``.
"""

from branchgrpo.rewards.base import CheckpointError, Reward, RewardError, RewardOutput
from branchgrpo.rewards.composite import CompositeReward, RewardSpecError, group_normalize, parse_reward_weights
from branchgrpo.rewards.preprocess import ImagePreprocess
from branchgrpo.rewards.registry import (
    RewardSpec,
    available_rewards,
    build_composite,
    build_reward,
    register_reward,
)

__all__ = [
    "CheckpointError",
    "CompositeReward",
    "ImagePreprocess",
    "Reward",
    "RewardError",
    "RewardOutput",
    "RewardSpec",
    "RewardSpecError",
    "available_rewards",
    "build_composite",
    "build_reward",
    "group_normalize",
    "parse_reward_weights",
    "register_reward",
]
