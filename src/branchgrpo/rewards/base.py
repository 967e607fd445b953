"""The reward interface: :class:`Reward`, :class:`RewardOutput`, errors and checkpoint loading.

A reward scores a batch of images ``[B, C, H, W]`` in ``[0, 1]`` (already on some device) with one
prompt per image and returns one float per image, ``[B]`` float32 on the images' device. Each
reward owns its device and dtype; inputs are moved there, preprocessed on tensors (no PIL, no
disk), scored under ``torch.no_grad`` and the scores moved back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor


class RewardError(RuntimeError):
    """A reward could not produce scores (bad input, remote failure, ...); the message says why."""


class CheckpointError(FileNotFoundError):
    """A reward's checkpoint file is missing or is not the file the reward expects.

    ``str(err)`` names the file, the reward, and what was expected; ``err.path`` is the file.
    """

    def __init__(self, reward: str, path: str | Path | None, message: str):
        self.reward = reward
        self.path = None if path is None else str(path)
        where = f" {self.path}" if self.path is not None else ""
        super().__init__(f"reward {reward!r}: checkpoint{where}: {message} (see docs/rewards.md)")

    def __str__(self) -> str:  # FileNotFoundError's own __str__ would print errno fields
        return self.args[0]


@dataclass
class RewardOutput:
    """Scores of one call: ``total [B]`` and each component's raw scores (for logging).

    For a single reward ``components == {name: total}``. For a composite, ``total`` is the
    weighted sum (of group-normalised scores when normalisation is on) and ``components`` holds
    the raw, unweighted, unnormalised scores of every component; ``normalized`` the normalised ones.
    """

    total: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)
    normalized: dict[str, Tensor] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """``{"total": mean, name: mean, ...}`` of the raw scores, for a log line."""
        out = {"total": float(self.total.float().mean())}
        out.update({k: float(v.float().mean()) for k, v in self.components.items()})
        return out


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None → cuda if available else cpu; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RewardError(f"reward device {device} was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a name (``float32``, ``bf16``, ...); ``"auto"`` → bf16 on cuda, else fp32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise RewardError(f"reward dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise RewardError(f"unknown reward dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


class Reward:
    """Base class: validation, device/dtype moves and ``no_grad`` around :meth:`_score`.

    Subclasses set ``name``, ``input_channels`` and implement ``_score(images, prompts)`` where
    ``images`` are float32 ``[B, C, H, W]`` in ``[0, 1]`` on ``self.device`` and the result is
    ``[B]`` (any float dtype, on ``self.device``).

    Calling a reward returns ``[B]`` float32 on the device of the input images, so an instance is
    a drop-in ``RewardFn`` for the trainer. :meth:`score` returns a :class:`RewardOutput`.
    """

    name: str = "reward"
    modality: str = "image"  # "image": [B, C, H, W]; "video": [B, F, C, H, W]
    needs_checkpoint: bool | None = None  # None: as the factory's checkpoint parameter says (registry)
    needs_groups: bool = False  # True: scores depend on the whole prompt group (pairwise judges); scored unbatched
    input_channels: int | None = 3  # None: any channel count (e.g. the remote client)
    clamp_inputs: bool = True  # decoded images may overshoot [0, 1] slightly; upstream PIL paths clamp
    embeds: bool = False  # True: :meth:`embed` gives the reward model's image embedding (implements ``_embed``)

    def __init__(self, device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = "float32"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"

    def check_inputs(self, images: Tensor, prompts: Sequence[str]) -> list[str]:
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"reward {self.name!r}: images must be a tensor [B, C, H, W] in [0, 1], got {shape}")
        if self.input_channels is not None and images.shape[1] != self.input_channels:
            raise ValueError(
                f"reward {self.name!r} scores {self.input_channels}-channel images [B, {self.input_channels}, H, W], "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"reward {self.name!r}: images must be floating point in [0, 1], got {images.dtype}")
        if isinstance(prompts, str):
            raise ValueError(f"reward {self.name!r}: prompts must be a list of strings (one per image), got a string")
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"reward {self.name!r}: got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image"
            )
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"reward {self.name!r}: every prompt must be a string")
        return prompts

    def _prepare(self, images: Tensor) -> Tensor:
        images = images.detach().to(device=self.device, dtype=torch.float32)
        return images.clamp(0.0, 1.0) if self.clamp_inputs else images

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        prompts = self.check_inputs(images, prompts)
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        with torch.no_grad():
            scores = self._score(self._prepare(images), prompts)
        scores = scores.detach().reshape(-1).float()
        if scores.shape[0] != images.shape[0]:
            raise RewardError(f"reward {self.name!r} returned {scores.shape[0]} scores for {images.shape[0]} images")
        return scores.to(images.device)

    def embed(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``[B, D]`` float32 unit vectors on the images' device: the reward model's own embedding of
        each image, the space in which it tells images apart (for ``advantage.diversity_space=reward``).
        Only rewards with ``embeds = True`` have one."""
        if not self.embeds:
            raise RewardError(f"reward {self.name!r} has no image embedding (rewards with one declare embeds = True)")
        prompts = self.check_inputs(images, prompts)
        if images.shape[0] == 0:
            return torch.zeros(0, 0, dtype=torch.float32, device=images.device)
        with torch.no_grad():
            features = self._embed(self._prepare(images), prompts).detach().float()
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise RewardError(f"reward {self.name!r} embedded {images.shape[0]} images as {tuple(features.shape)}, "
                              f"expected [{images.shape[0]}, D]")
        return torch.nn.functional.normalize(features, dim=-1).to(images.device)

    def _embed(self, images: Tensor, prompts: list[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the one contract the trainer uses: components per batch, combined once per iteration --
    def components(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Raw scores ``{component: [B]}`` of a batch (a single reward has one component, itself)."""
        return {self.name: self(images, prompts)}

    def combine(self, components: Mapping[str, Tensor], group_ids: Tensor | None = None) -> RewardOutput:
        """The total from every batch's :meth:`components` (a weighted list normalises here, per group)."""
        return RewardOutput(total=components[self.name], components=dict(components))

    def raw_total(self, components: Mapping[str, Tensor]) -> Tensor:
        """The total without any normalisation (absolute scores, for held-out evaluation)."""
        return components[self.name]

    def score(self, images: Tensor, prompts: Sequence[str], group_ids: Tensor | None = None) -> RewardOutput:
        """:class:`RewardOutput` of one call: the total and every named component."""
        return self.combine(self.components(images, prompts), group_ids)


def check_video_inputs(reward: Reward, videos: Tensor, prompts: Sequence[str]) -> list[str]:
    """``reward``'s input check for videos ``[B, F, C, H, W]``: the shape here, then the image
    checks (channels, dtype, one prompt per video) on the first frames. Returns the prompts as a list."""
    if not isinstance(videos, Tensor) or videos.ndim != 5:
        shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise ValueError(
            f"reward {reward.name!r} scores videos [B, F, C, H, W] in [0, 1] (WanAdapter.decode), got {shape}; "
            "image rewards score images [B, C, H, W]"
        )
    return Reward.check_inputs(reward, videos[:, 0], prompts)



class FunctionReward(Reward):
    """A plain ``fn(images, prompts) -> [B]`` behind the :class:`Reward` contract (any input shape)."""

    input_channels = None
    clamp_inputs = False

    def __init__(self, fn, name: str = "custom", modality: str = "image"):
        super().__init__("cpu", "float32")
        self.fn = fn
        self.name = name
        self.modality = modality

    def check_inputs(self, images: Tensor, prompts: Sequence[str]) -> list[str]:
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: got {images.shape[0]} inputs but {len(prompts)} prompts")
        return prompts

    def _prepare(self, images: Tensor) -> Tensor:
        return images

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        prompts = self.check_inputs(images, prompts)
        with torch.no_grad():
            scores = torch.as_tensor(self.fn(images, prompts)).detach().reshape(-1).float()
        if scores.shape[0] != images.shape[0]:
            raise RewardError(f"reward {self.name!r} returned {scores.shape[0]} scores for {images.shape[0]} inputs")
        return scores.to(images.device)


def as_reward(reward, name: str | None = None, modality: str = "image") -> Reward:
    """``reward`` itself if it is a :class:`Reward`, else a plain callable wrapped in :class:`FunctionReward`."""
    if isinstance(reward, Reward):
        return reward
    if not callable(reward):
        raise TypeError(f"a reward is a Reward or a callable (images, prompts) -> [B], got {type(reward).__name__}")
    return FunctionReward(reward, name=name or getattr(reward, "__name__", "custom"), modality=modality)


# ---------------------------------------------------------------------------------------------
# checkpoint files


def require_file(reward: str, path: str | Path | None, what: str) -> Path:
    """``path`` as a Path if it is an existing file, else :class:`CheckpointError` naming it."""
    if path is None:
        raise CheckpointError(reward, None, f"no checkpoint given; {what}")
    file = Path(path).expanduser()
    if file.is_dir():
        raise CheckpointError(reward, file, f"is a folder, expected a file: {what}")
    if not file.is_file():
        raise CheckpointError(reward, file, f"does not exist; expected {what}")
    return file


def require_dir(reward: str, path: str | Path | None, what: str, needs: Sequence[str] = ()) -> Path:
    """``path`` as a Path if it is a folder holding every name in ``needs`` (alternatives: ``a|b``)."""
    if path is None:
        raise CheckpointError(reward, None, f"no checkpoint given; {what}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        missing = "does not exist" if not folder.exists() else "is not a folder"
        raise CheckpointError(reward, folder, f"{missing}; expected {what}")
    for need in needs:
        options = need.split("|")
        if not any((folder / o).is_file() for o in options):
            raise CheckpointError(reward, folder / options[0], f"is missing; expected {what}")
    return folder


def load_state_dict_file(
    reward: str, path: Path, *, unwrap: Sequence[str] = ("state_dict",), trust_pickle: bool = False
) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``weights_only=True``: no code runs;
    ``trust_pickle=True`` lifts that for a file you trust that holds other Python objects).

    A mapping whose only tensor-less entry is one of ``unwrap`` (e.g. ``{"state_dict": {...}}``)
    is unwrapped; a leading ``module.`` on every key (DDP) is removed. Errors name the file.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # corrupt file, wrong format, pickle with code in it, ...
        raise CheckpointError(
            reward, path, f"could not be read as a state dict ({type(err).__name__}: {str(err)[:200]})"
            + ("" if trust_pickle or path.suffix == ".safetensors" else
               "; if it is a torch pickle you trust that holds more than tensors, pass trust_pickle=True")
        ) from err
    if isinstance(state, Mapping):
        for key in unwrap:
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(reward, path, "holds no state dict of tensors")
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_strict(
    reward: str, module: torch.nn.Module, state: Mapping[str, Tensor], path: Path, ignore: Sequence[str] = ()
) -> None:
    """``module.load_state_dict(state)`` with one clear error (missing/unexpected keys, shapes).

    Keys starting with any prefix in ``ignore`` are dropped first (parts the reward does not use).
    """
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore)}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
        raise CheckpointError(
            reward, path, "does not match the reward's architecture: " + "; ".join(parts)
            + " — is it the right file for this reward, and do the architecture options match it?"
        )
    module.load_state_dict(state, strict=True)


def check_finite(reward: str, scores: Tensor) -> Tensor:
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise RewardError(f"reward {reward!r} produced {bad} NaN/Inf scores; refusing to return them")
    return scores


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
