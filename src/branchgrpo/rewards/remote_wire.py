"""The remote reward's wire format (version ``branchgrpo-reward/1``): request bodies (safetensors
images + prompts) and answer bodies (JSON scores). Described in :mod:`branchgrpo.rewards.remote`;
used by its client and by :mod:`branchgrpo.rewards.server`."""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Sequence

import torch
from torch import Tensor

FORMAT = "branchgrpo-reward/1"
WIRE_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # rewards are float32 [B]; larger scores are refused


class WireFormatError(ValueError):
    """A request or answer body that does not follow the wire format."""


def encode_images(images: Tensor, prompts: Sequence[str], wire_dtype: str = "uint8") -> bytes:
    """Request body: safetensors bytes of ``images`` (quantised to ``wire_dtype``) + prompts."""
    from safetensors.torch import save

    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    images = images.detach().float().cpu().clamp(0.0, 1.0)
    if wire_dtype == "uint8":
        payload = (images * 255.0).round().to(torch.uint8)
    else:
        payload = images.to(WIRE_DTYPES[wire_dtype])
    metadata = {"format": FORMAT, "prompts": json.dumps(list(prompts))}
    return save({"images": payload.contiguous()}, metadata=metadata)


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    if len(body) < 8:
        raise WireFormatError("body too short for safetensors")
    (header_len,) = struct.unpack("<Q", body[:8])
    if header_len > len(body) - 8 or header_len > 100 * 2**20:
        raise WireFormatError("safetensors header length is out of range")
    try:
        header = json.loads(body[8 : 8 + header_len])
    except ValueError as err:
        raise WireFormatError(f"safetensors header is not JSON: {err}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise WireFormatError("safetensors header has no __metadata__")
    return meta


def decode_images(body: bytes) -> tuple[Tensor, list[str]]:
    """Inverse of :func:`encode_images`: float32 images in [0, 1] and the prompts."""
    from safetensors.torch import load

    meta = _safetensors_metadata(body)
    if meta.get("format") != FORMAT:
        raise WireFormatError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        prompts = json.loads(meta["prompts"])
    except (KeyError, ValueError):
        raise WireFormatError("metadata 'prompts' is missing or not JSON") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise WireFormatError("metadata 'prompts' must be a JSON list of strings")
    try:
        tensors = load(body)
    except Exception as err:
        raise WireFormatError(f"body is not valid safetensors: {err}") from None
    if set(tensors) != {"images"}:
        raise WireFormatError(f"expected one tensor 'images', got {sorted(tensors)}")
    images = tensors["images"]
    if images.ndim != 4:
        raise WireFormatError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif images.dtype in (torch.float16, torch.float32):
        images = images.float()
    else:
        raise WireFormatError(f"images dtype {images.dtype} is not uint8, float16 or float32")
    if images.shape[0] != len(prompts):
        raise WireFormatError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return images, prompts


def decode_scores(body: bytes, expected: int) -> list[float]:
    """The ``scores`` of an answer body: exactly ``expected`` finite numbers within float32 range.

    Rewards are used as float32 (a :class:`~branchgrpo.rewards.base.Reward` returns ``[B]``
    float32), so a score whose float32 cast overflows (``|s| > 3.4e38``, e.g. ``1e300``) is refused
    here instead of turning into inf and then NaN downstream. :class:`WireFormatError` names the
    first bad score.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise WireFormatError(f"answer is not JSON: {_preview(body)}") from None
    if not isinstance(data, dict) or "scores" not in data:
        raise WireFormatError(f"answer has no 'scores': {_preview(data)}")
    scores = data["scores"]
    if not isinstance(scores, list) or len(scores) != expected:
        got = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise WireFormatError(f"answer has {got} scores for {expected} images")
    values = []
    for index, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise WireFormatError(f"score {index} is {_preview(score)}, not a finite number")
        try:
            value = float(score)
        except OverflowError:  # a JSON integer beyond float64
            value = math.inf
        if not math.isfinite(value):
            raise WireFormatError(f"score {index} is {_preview(score)}, not a finite number")
        if abs(value) > FLOAT32_MAX:
            raise WireFormatError(
                f"score {index} is {value:g}, outside the float32 range ±{FLOAT32_MAX:.4g} rewards are used in"
            )
        values.append(value)
    return values


def _preview(value: Any, limit: int = 120) -> str:
    """A one-line, bounded ``repr`` for error messages."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of {len(str(value))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
