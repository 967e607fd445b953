"""Rewards for videos ``[B, F, C, H, W]`` in ``[0, 1]`` (what ``WanAdapter.decode`` returns).

- ``frames`` (:class:`FrameAveragedReward`): any image reward on ``num_frames`` evenly spaced
  frames of every video, averaged per video. All ``B·K`` frames go to the image reward in **one**
  call (the trainer's ``reward.batch_size`` counts videos).
- ``videoalign`` (:func:`videoalign_reward`): with a checkpoint and neither option below,
  VideoAlign's VideoReward itself (VQ / MQ / TA heads on Qwen2-VL-2B,
  :mod:`branchgrpo.rewards.videoalign`). Otherwise the hook for any learned video reward, either

  * ``url``: a reward server you run, spoken to with the remote client
    (:mod:`branchgrpo.rewards.remote`, retries and all); the request's ``images`` tensor is the
    videos ``[B, F, C, H, W]`` (uint8 by default) — read it with :func:`decode_videos`; or
  * ``entry_point="package.module:function"``: a factory in an installed module you name, called
    once as ``function(checkpoint=..., device=..., dtype=..., **entry_options)``; it returns the
    scorer ``scorer(videos [B, F, C, H, W] float32 in [0, 1] on device, prompts) -> [B]``.

  Nothing is downloaded and no remote code is trusted: only the module you name is imported.

    reward = build_reward("frames", "hps.pt", image_reward="hps", num_frames=4)
    reward = build_reward("videoalign", "/ckpt/VideoReward/checkpoint-1/model.pth", dimension="MQ")
    reward = build_reward("videoalign", "/ckpt/VideoAlign", entry_point="my_rewards.videoalign:load_mq")
    scores = reward(videos, prompts)        # videos [B, F, 3, H, W] -> [B]
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.rewards.base import Reward, RewardError, check_finite, check_video_inputs
from branchgrpo.rewards.remote import FORMAT, WIRE_DTYPES, RemoteReward, WireFormatError

VIDEO_REWARDS = ("frames", "videoalign")  # registry names that score videos, not images


def frame_indices(num_frames: int, count: int) -> Tensor:
    """``count`` evenly spaced frames of ``num_frames``: the centres of ``count`` equal segments.

    Distinct for ``count <= num_frames`` (all frames otherwise); symmetric, so neither end of the
    clip is favoured; ``count = 1`` is the middle frame.
    """
    if count >= num_frames:
        return torch.arange(num_frames)
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_frames / count).floor().long()


class VideoReward(Reward):
    """Base class of video rewards: inputs are ``[B, F, C, H, W]`` in ``[0, 1]``, one prompt per video.

    ``modality = "video"`` is how a weighted list (:class:`~branchgrpo.rewards.CompositeReward`)
    tells video rewards from image rewards; a video reward not derived from this class sets it too.
    """

    input_channels: int | None = 3
    modality = "video"

    def check_inputs(self, videos: Tensor, prompts: Sequence[str]) -> list[str]:
        return check_video_inputs(self, videos, prompts)


class FrameAveragedReward(VideoReward):
    """An image reward averaged over ``num_frames`` evenly spaced frames of each video.

    Args:
        checkpoint: the image reward's checkpoint.
        image_reward: a registered image reward name (``hps``, ``pickscore``, ``clip``, …) or any
            callable ``(images [N, C, H, W], prompts) -> [N]``.
        num_frames: frames scored per video (:func:`frame_indices`); all videos' frames are scored
            in one image-reward call.
        image_options: options of the image reward (e.g. ``processor`` for PickScore).
    """

    name = "frames"
    clamp_inputs = False  # the image reward clamps (and moves) what it scores

    def __init__(
        self,
        checkpoint: Any = None,
        *,
        image_reward: str | Callable[[Tensor, list[str]], Tensor] | None = None,
        num_frames: int = 4,
        image_options: Mapping[str, Any] | None = None,
        device: Any = "cpu",
        dtype: Any = "float32",
        name: str = "frames",
    ):
        super().__init__(device, dtype)
        if image_reward is None:
            raise RewardError(
                "reward 'frames' needs image_reward: the image reward to average over frames "
                "(e.g. reward.options.image_reward=hps, with reward.checkpoint its checkpoint)"
            )
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise RewardError(f"reward 'frames': num_frames must be an integer >= 1, got {num_frames!r}")
        if isinstance(image_reward, str):
            if image_reward in VIDEO_REWARDS:
                raise RewardError(f"reward 'frames': image_reward must score images, not {image_reward!r}")
            from branchgrpo.rewards.registry import build_reward

            image_reward = build_reward(image_reward, checkpoint, device=device, dtype=dtype,
                                        **dict(image_options or {}))
        elif image_options:
            raise RewardError("reward 'frames': image_options only apply to an image reward given by name")
        self.image_reward = image_reward
        self.num_frames = num_frames
        self.name = name
        self.input_channels = getattr(image_reward, "input_channels", None)

    def _prepare(self, videos: Tensor) -> Tensor:
        return videos.detach()  # frames are selected first; the image reward moves only those

    def _score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        batch, frames = videos.shape[:2]
        index = frame_indices(frames, self.num_frames).to(videos.device)
        picked = videos.index_select(1, index)  # [B, K, C, H, W]
        count = picked.shape[1]
        scores = self.image_reward(picked.flatten(0, 1), [p for p in prompts for _ in range(count)])
        return check_finite(self.name, scores.float().reshape(batch, count).mean(dim=1))


class RemoteVideoReward(VideoReward, RemoteReward):
    """:class:`~branchgrpo.rewards.remote.RemoteReward` for videos: the request's ``images`` is ``[B, F, C, H, W]``."""

    name = "videoalign"
    input_channels = None


class EntryPointVideoReward(VideoReward):
    """Scores from a scorer built by a factory you name (``"package.module:function"``).

    The factory is called once: ``function(checkpoint=..., device=torch.device, dtype=torch.dtype,
    **entry_options)`` and returns ``scorer(videos, prompts) -> [B]`` (any sequence of numbers or
    tensor), with ``videos`` float32 ``[B, F, C, H, W]`` in ``[0, 1]`` on ``device``.
    """

    def __init__(self, entry_point: str, checkpoint: Any = None, *, entry_options: Mapping[str, Any] | None = None,
                 device: Any = "cpu", dtype: Any = "float32", name: str = "videoalign"):
        super().__init__(device, dtype)
        self.name = name
        self.entry_point = entry_point
        factory = load_entry_point(entry_point, name)
        try:
            self.scorer = factory(checkpoint=checkpoint, device=self.device, dtype=self.dtype,
                                  **dict(entry_options or {}))
        except TypeError as err:
            raise RewardError(
                f"reward {name!r}: entry point {entry_point} must accept (checkpoint=, device=, dtype=, "
                f"**entry_options): {err}"
            ) from None
        if not callable(self.scorer):
            raise RewardError(
                f"reward {name!r}: entry point {entry_point} returned {type(self.scorer).__name__}, expected a "
                "scorer callable (videos [B, F, C, H, W], prompts) -> [B]"
            )

    def _score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        scores = torch.as_tensor(self.scorer(videos, prompts), dtype=torch.float32, device=videos.device)
        return check_finite(self.name, scores.reshape(-1))


def load_entry_point(entry_point: str, reward: str = "videoalign") -> Callable[..., Any]:
    """The object named by ``"package.module:attribute"`` (attribute may be dotted); clear errors."""
    module_name, sep, attribute = str(entry_point).partition(":")
    if not sep or not module_name or not attribute:
        raise RewardError(f"reward {reward!r}: entry_point must be 'package.module:function', got {entry_point!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(
            f"reward {reward!r}: cannot import {module_name!r} for entry_point {entry_point!r}: {err}"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RewardError(f"reward {reward!r}: {module_name!r} has no {attribute!r} (entry_point {entry_point!r})")
        target = getattr(target, part)
    if not callable(target):
        raise RewardError(f"reward {reward!r}: entry_point {entry_point!r} is not callable")
    return target


def videoalign_reward(
    checkpoint: Any = None,
    *,
    url: str | None = None,
    entry_point: str | None = None,
    entry_options: Mapping[str, Any] | None = None,
    device: Any = "cpu",
    dtype: Any = "float32",
    timeout: float = 600.0,
    retries: int = 3,
    wire_dtype: str = "uint8",
    name: str = "videoalign",
    base_model: Any = None,
    dimension: str = "MQ",
    use_norm: bool = True,
    normalization: Mapping[str, float] | None = None,
    num_frames: int | None = None,
    min_pixels: int = 128 * 28 * 28,
    max_pixels: int = 448 * 448,
    trust_pickle: bool = False,
) -> VideoReward:
    """VideoAlign's VideoReward (:class:`~branchgrpo.rewards.videoalign.VideoAlignReward`, loaded from
    ``checkpoint`` with ``base_model``, ``dimension``, ... as its options), or a learned video reward
    from a server or an entry point.

    At most one of ``url`` (a reward server; ``timeout``/``retries``/``wire_dtype`` as
    :class:`~branchgrpo.rewards.remote.RemoteReward`) and ``entry_point`` (``"module:function"``,
    see :class:`EntryPointVideoReward`; ``checkpoint`` and ``entry_options`` go to it) may be set;
    with neither, ``checkpoint`` is the VideoReward ``model.pth``.
    """
    if url is None and entry_point is None and checkpoint is not None:
        from branchgrpo.rewards.videoalign import VideoAlignReward

        return VideoAlignReward(checkpoint, base_model=base_model, dimension=dimension, use_norm=use_norm,
                                normalization=normalization, num_frames=num_frames, min_pixels=min_pixels,
                                max_pixels=max_pixels, device=device, dtype=dtype, trust_pickle=trust_pickle,
                                name=name)
    if (url is None) == (entry_point is None):
        given = "both url and entry_point" if url is not None else "neither url nor entry_point nor a checkpoint"
        raise RewardError(
            f"reward {name!r}: {given} given. Set reward.checkpoint to VideoAlign's checkpoint-*/model.pth (the "
            "VideoReward model, see docs/rewards.md), or "
            "reward.options.url='http://HOST:PORT' (a server you run; requests carry videos [B, F, C, H, W], see "
            "branchgrpo.rewards.video.decode_videos) or reward.options.entry_point='package.module:function' (a "
            "factory returning scorer(videos, prompts) -> [B]); see docs/adapters.md, 'Wan2.1 video'"
        )
    if url is not None:
        if entry_options:
            raise RewardError(f"reward {name!r}: entry_options only apply with entry_point")
        return RemoteVideoReward(url=url, device=device, dtype=dtype, timeout=timeout, retries=retries,
                                 wire_dtype=wire_dtype, name=name)
    return EntryPointVideoReward(entry_point, checkpoint, entry_options=entry_options, device=device, dtype=dtype,
                                 name=name)


def decode_videos(body: bytes) -> tuple[Tensor, list[str]]:
    """A video request body (what ``url=`` servers receive) → videos ``[B, F, C, H, W]`` float32 in [0, 1], prompts.

    The remote wire format (:mod:`branchgrpo.rewards.remote`) with a 5-D ``images`` tensor.
    """
    from safetensors.torch import load

    from branchgrpo.rewards.remote import _safetensors_metadata

    meta = _safetensors_metadata(body)
    try:
        prompts = json.loads(meta["prompts"]) if meta.get("format") == FORMAT else None
        videos = load(body)["images"]
    except Exception as err:  # missing keys, bad JSON, bad safetensors: all "not this format"
        raise WireFormatError(f"not a {FORMAT} video request: {type(err).__name__}: {err}") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise WireFormatError(f"metadata must hold format {FORMAT!r} and 'prompts', a JSON list of strings")
    if videos.ndim != 5 or videos.shape[0] != len(prompts) or videos.dtype not in WIRE_DTYPES.values():
        raise WireFormatError(f"expected 'images' [B={len(prompts)}, F, C, H, W] in uint8/float16/float32, "
                              f"got {tuple(videos.shape)} {videos.dtype}")
    return (videos.float() / 255.0 if videos.dtype == torch.uint8 else videos.float()), prompts


__all__ = [
    "EntryPointVideoReward",
    "FrameAveragedReward",
    "RemoteVideoReward",
    "VIDEO_REWARDS",
    "VideoReward",
    "check_video_inputs",
    "decode_videos",
    "frame_indices",
    "load_entry_point",
    "videoalign_reward",
]
