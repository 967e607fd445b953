"""The reward registry: :func:`build_reward`, :class:`RewardSpec`, :func:`build_composite`.

Reward modules are imported when a reward is built, so ``import branchgrpo.rewards`` pulls in
neither transformers nor open_clip.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

from branchgrpo.rewards.base import Reward, RewardError
from branchgrpo.rewards.composite import CompositeReward, Normalize, RewardSpecError, parse_reward_weights

# name -> ("module:Class" or a callable, one-line description)
_REGISTRY: dict[str, tuple[str | Callable[..., Reward], str]] = {
    "hps": ("branchgrpo.rewards.hps:HPSReward", "HPS v2.1: open_clip ViT-H-14 cosine (needs open_clip_torch)"),
    "pickscore": ("branchgrpo.rewards.clip_rewards:PickScoreReward", "PickScore v1: logit_scale * cosine, CLIP ViT-H/14"),
    "imagereward": ("branchgrpo.rewards.imagereward:ImageReward", "ImageReward v1.0 (BLIP), standardised score"),
    "clip": ("branchgrpo.rewards.clip_rewards:ClipScoreReward", "CLIP score: 100 * cosine (transformers CLIPModel)"),
    "aesthetic": ("branchgrpo.rewards.clip_rewards:AestheticReward", "LAION aesthetic predictor v2 on CLIP ViT-L/14"),
    "edit": ("branchgrpo.rewards.edit:EditReward",
             "editing rows: CLIP instruction following + CLIP consistency with the row's source image"),
    "ocr": ("branchgrpo.rewards.ocr:OCRReward", "Flow-GRPO text rendering: 1 - edit distance/len of the quoted text"),
    "geneval": ("branchgrpo.rewards.geneval:GenEvalReward", "GenEval composition (objects, counts, colours, positions): OWLv2 + CLIP"),
    "digits": ("branchgrpo.rewards.digits:DigitsReward", "digits world: p(prompted digit | 16x16 grey image)"),
    "shapes": ("branchgrpo.rewards.shapes:ShapesReward", "shapes world: exact verifier of counts, colours, shapes, relations"),
    "remote": ("branchgrpo.rewards.remote:RemoteReward", "a reward served over HTTP by python -m branchgrpo.rewards.server"),
    "vlm": ("branchgrpo.rewards.vlm:VLMJudgeReward", "a VLM judge on an OpenAI-compatible server (vLLM, SGLang): pointwise or pairwise"),
    "frames": ("branchgrpo.rewards.video:FrameAveragedReward",
               "videos: an image reward (option image_reward) averaged over num_frames evenly spaced frames"),
    "videoalign": ("branchgrpo.rewards.video:videoalign_reward",
                   "videos: VideoAlign's VideoReward (Qwen2-VL-2B; VQ/MQ/TA), or your server (url) or entry_point"),
    "hpsv3": ("branchgrpo.rewards.hpsv3:HPSv3Reward", "HPSv3: Qwen2-VL-7B with a reward head; the score is mu"),
}


# What a reward declares beyond its factory: the modality it scores, whether it needs a checkpoint,
# the model families it is limited to, and how to fetch its checkpoint (``fetch``: one command, with
# ``{path}`` the configured checkpoint, ``{folder}`` that path if it names a folder, else its folder,
# and ``{parent}`` the folder above ``{folder}``). Rewards registered later may declare them as class
# attributes (``modality``, ``needs_checkpoint``) or as arguments of :func:`register_reward`.
# Sources: docs/rewards.md, "Files, licences, where to get them".
_META: dict[str, dict[str, Any]] = {
    "hps": {"modality": "image", "needs_checkpoint": True,
            "fetch": "hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir {folder}"},
    "pickscore": {"modality": "image", "needs_checkpoint": True,
                  "fetch": "hf download yuvalkirstain/PickScore_v1 --local-dir {folder}; its processor files: hf "
                           "download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --local-dir "
                           "{parent}/CLIP-ViT-H-14-laion2B-s32B-b79K --include '*.json' --include '*.txt' (set "
                           "reward.options.processor to that folder)"},
    "imagereward": {"modality": "image", "needs_checkpoint": True,
                    "fetch": "hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir {folder}; "
                             "its tokenizer: hf download google-bert/bert-base-uncased --local-dir "
                             "{parent}/bert-base-uncased --include 'vocab.txt' --include 'tokenizer_config.json' "
                             "(reward.options.tokenizer)"},
    "clip": {"modality": "image", "needs_checkpoint": True,
             "fetch": "hf download openai/clip-vit-large-patch14 --local-dir {folder}"},
    "aesthetic": {"modality": "image", "needs_checkpoint": True,
                  "fetch": "curl -L --create-dirs -o {path} https://github.com/christophschuhmann/"
                           "improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth; its CLIP: "
                           "hf download openai/clip-vit-large-patch14 --local-dir {parent}/clip-vit-large-patch14 "
                           "(reward.options.clip_model)"},
    "edit": {"modality": "image", "needs_checkpoint": True,
             "fetch": "hf download openai/clip-vit-large-patch14 --local-dir {folder}"},
    "geneval": {"fetch": "hf download google/owlv2-base-patch16-ensemble --local-dir {folder}"},
    "digits": {"modality": "image", "needs_checkpoint": False, "families": ("digits",)},
    "shapes": {"modality": "image", "needs_checkpoint": False, "families": ("shapes",)},
    "remote": {"modality": "image", "needs_checkpoint": False},
    "frames": {"modality": "video", "needs_checkpoint": None},  # None: as its image_reward option's reward
    "videoalign": {"modality": "video", "needs_checkpoint": False,  # True without url/entry_point: checked in train
                   "fetch": "hf download KwaiVGI/VideoReward --local-dir {parent}; its base model's config and "
                            "tokenizer: hf download Qwen/Qwen2-VL-2B-Instruct --local-dir {parent} --include "
                            "'*.json' --include 'merges.txt' (or reward.options.base_model)"},
    "hpsv3": {"modality": "image", "needs_checkpoint": True,
              "fetch": "hf download MizzenAI/HPSv3 HPSv3.safetensors --local-dir {folder}; its base model's config "
                       "and tokenizer: hf download Qwen/Qwen2-VL-7B-Instruct --local-dir {folder} --include '*.json' "
                       "--include 'merges.txt' (or reward.options.base_model)"},
}


@dataclass(frozen=True)
class RewardInfo:
    """What a registered reward declares: checked against a job's config before anything loads."""

    name: str
    description: str
    modality: str  # "image" ([B, C, H, W]) or "video" ([B, F, C, H, W])
    needs_checkpoint: bool | None  # None: decided by its options (the frames reward)
    families: tuple[str, ...] | None  # model families it scores (None: any)
    options: tuple[str, ...] | None  # keyword options its factory takes (None: any)
    fetch: str | None = None  # the command that fetches its checkpoint ({path}/{folder}/{parent}: see fetch_hint)
    embeds: bool = False  # it has an image embedding (Reward.embed; advantage.diversity_space=reward)

    def fetch_hint(self, checkpoint: str) -> str | None:
        """:attr:`fetch` for the configured ``checkpoint``: ``{path}`` is it, ``{folder}`` it when it names a
        folder (no suffix), else the folder holding it, ``{parent}`` the folder above ``{folder}``."""
        if self.fetch is None:
            return None
        from pathlib import PurePath

        path = PurePath(str(checkpoint))
        folder = path.parent if path.suffix else path
        return self.fetch.format(path=str(path), folder=str(folder), parent=str(folder.parent))


def available_rewards() -> dict[str, str]:
    """``{name: description}`` of every registered reward."""
    return {name: desc for name, (_, desc) in _REGISTRY.items()}


def register_reward(
    name: str,
    factory: str | Callable[..., Reward],
    description: str = "",
    *,
    modality: str | None = None,
    needs_checkpoint: bool | None = None,
    families: Sequence[str] | None = None,
    fetch: str | None = None,
    embeds: bool | None = None,
) -> None:
    """Register ``factory(checkpoint=..., device=..., dtype=..., **options) -> Reward`` under ``name``
    (or ``"module:Class"``, imported on first use). ``modality`` (``"image"``/``"video"``) and
    ``needs_checkpoint`` default to the factory's class attributes, else to ``"image"`` and to whether
    its ``checkpoint`` parameter lacks a default. ``fetch``: the command that fetches the checkpoint,
    printed when it is missing (``{path}``, ``{folder}``, ``{parent}``: see :meth:`RewardInfo.fetch_hint`).
    ``embeds``: the reward has an image embedding (:meth:`Reward.embed`; default: the factory's class attribute).
    Then ``reward.name=<name>`` works in configs."""
    if not name or "," in name or ":" in name:
        raise ValueError(f"reward name {name!r} must be non-empty without ',' or ':'")
    if modality not in (None, "image", "video"):
        raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
    _REGISTRY[name] = (factory, description)
    meta = {"modality": modality, "needs_checkpoint": needs_checkpoint,
            "families": tuple(families) if families is not None else None, "fetch": fetch, "embeds": embeds}
    _META[name] = {k: v for k, v in meta.items() if v is not None}


def factory_module(name: str) -> str | None:
    """The module that provides the registered reward ``name`` (None when not registered)."""
    if name not in _REGISTRY:
        return None
    target = _REGISTRY[name][0]
    return target.partition(":")[0] if isinstance(target, str) else getattr(target, "__module__", None)


def reward_info(name: str) -> RewardInfo:
    """The declarations of the registered reward ``name`` (imports its module, loads nothing)."""
    factory = _factory(name)
    meta = dict(_META.get(name, {}))
    modality = meta.get("modality") or getattr(factory, "modality", None) or "image"
    if "needs_checkpoint" in meta:
        needs = meta["needs_checkpoint"]
    elif isinstance(getattr(factory, "needs_checkpoint", None), bool):
        needs = factory.needs_checkpoint
    else:
        needs = _checkpoint_required(factory)
    return RewardInfo(name=name, description=_REGISTRY[name][1], modality=modality, needs_checkpoint=needs,
                      families=meta.get("families"), options=_option_names(factory), fetch=meta.get("fetch"),
                      embeds=bool(meta.get("embeds", getattr(factory, "embeds", False))))


def _checkpoint_required(factory: Callable[..., Any]) -> bool:
    """True when the factory's ``checkpoint`` parameter has no default (or it takes none at all: False)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    param = params.get("checkpoint")
    return param is not None and param.default is inspect.Parameter.empty


def _option_names(factory: Callable[..., Any]) -> tuple[str, ...] | None:
    """The keyword options a factory accepts (None: it takes ``**options`` and names none)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed: set[str] = set()
        for klass in getattr(factory, "__mro__", ()):
            init = klass.__dict__.get("__init__")
            if init is not None:
                allowed |= {k for k, p in inspect.signature(init).parameters.items()
                            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not allowed:
            return None
    else:
        allowed = {k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return tuple(sorted(allowed - {"self", "checkpoint", "device", "dtype"}))


def _factory(name: str) -> Callable[..., Reward]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RewardError(f"unknown reward {name!r}{hint}; known rewards: {', '.join(_REGISTRY)}")
    target, _ = _REGISTRY[name]
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _check_options(name: str, factory: Callable[..., Reward], options: Mapping[str, Any]) -> None:
    allowed = _option_names(factory)
    if allowed is None:
        return
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise RewardError(
            f"reward {name!r} has no option {unknown[0]!r}; its options: {', '.join(allowed) or '(none)'}"
        )


def build_reward(
    name: str,
    checkpoint: Any = None,
    device: Any = "cpu",
    dtype: Any = "float32",
    **options: Any,
) -> Reward:
    """The reward ``name`` loaded from ``checkpoint`` on ``device`` in ``dtype``.

    ``name`` may also be a weighted list such as ``"hps:1.0,clip:0.5"``: then ``checkpoint`` is a
    mapping ``{component: checkpoint}``, ``options`` may hold ``normalize`` and
    ``components={component: {option: value}}``, and a :class:`CompositeReward` is returned.
    """
    if "," in name or ":" in name:
        checkpoints = checkpoint or {}
        if not isinstance(checkpoints, Mapping):
            raise RewardSpecError(f"reward list {name!r}: checkpoint must be a mapping {{component: file}}")
        normalize = options.pop("normalize", "none")
        per_component = options.pop("components", {}) or {}
        if options:
            raise RewardSpecError(
                f"reward list {name!r}: options {sorted(options)} must go per component (components={{name: {{...}}}})"
            )
        specs = [
            RewardSpec(name=n, weight=w, checkpoint=checkpoints.get(n), device=device, dtype=dtype,
                       options=dict(per_component.get(n, {})))
            for n, w in parse_reward_weights(name, known=list(_REGISTRY))
        ]
        unknown = set(checkpoints) - {s.name for s in specs} | set(per_component) - {s.name for s in specs}
        if unknown:
            raise RewardSpecError(f"reward list {name!r}: settings for {sorted(unknown)} which the list does not name")
        return build_composite(specs, normalize=normalize)
    factory = _factory(name)
    _check_options(name, factory, options)
    accepted = _accepted_arguments(factory)
    common = {"checkpoint": checkpoint, "device": device, "dtype": dtype}
    if accepted is not None:  # a factory without a checkpoint (or device) parameter is not given one
        if checkpoint is not None and "checkpoint" not in accepted:
            raise RewardError(f"reward {name!r} takes no checkpoint, got {checkpoint!r}")
        common = {k: v for k, v in common.items() if k in accepted}
    return factory(**common, **options)


def _accepted_arguments(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword arguments the factory (its ``__init__`` chain for a class) accepts; None: anything."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    if not isinstance(factory, type):
        return None
    accepted: set[str] = set()
    for klass in factory.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        init_params = inspect.signature(init).parameters
        accepted |= {k for k, p in init_params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in init_params.values()):
            return accepted
    return None


@dataclass
class RewardSpec:
    """One reward as configured: what to build and, inside a composite, its weight."""

    name: str
    checkpoint: Any = None
    weight: float = 1.0
    device: Any = "cpu"
    dtype: Any = "float32"
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Reward:
        return build_reward(self.name, self.checkpoint, device=self.device, dtype=self.dtype, **self.options)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RewardSpec":
        """From a mapping with the field names; unknown keys are an error naming them."""
        names = {f.name for f in fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:
            raise RewardSpecError(f"reward spec has unknown keys {unknown}; allowed: {sorted(names)}")
        if "name" not in data:
            raise RewardSpecError("reward spec needs a 'name'")
        return cls(**dict(data))

    @classmethod
    def parse(cls, text: str, **common: Any) -> list["RewardSpec"]:
        """``"hps:1.0,clip:0.5"`` → one spec per component (``common`` fields applied to each)."""
        return [cls(name=n, weight=w, **common) for n, w in parse_reward_weights(text)]


def build_composite(
    specs: Sequence[RewardSpec] | str,
    normalize: Normalize = "none",
    **common: Any,
) -> CompositeReward:
    """A :class:`CompositeReward` from specs (or a ``"hps:1.0,clip:0.5"`` string + ``common``
    spec fields such as ``device``)."""
    if isinstance(specs, str):
        specs = RewardSpec.parse(specs, **common)
    elif common:
        raise RewardSpecError(f"build_composite: {sorted(common)} only apply with a string reward list")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RewardSpecError(f"composite reward names repeat: {names}")
    rewards = {s.name: s.build() for s in specs}
    return CompositeReward(rewards, {s.name: s.weight for s in specs}, normalize=normalize)
