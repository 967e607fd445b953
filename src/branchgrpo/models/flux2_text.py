"""FLUX.2's variants ([dev], [klein]) and its text encoder's identity for the prompt cache
(:func:`flux2_encoder_config`). Re-exported by :mod:`branchgrpo.models.flux2`."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Sequence

import torch

from branchgrpo.models.base import text_encoder_config as _encoder_fingerprint

Variant = Literal["dev", "klein"]
VARIANTS: tuple[str, ...] = ("dev", "klein")
PIPELINE_CLASSES = {"dev": "Flux2Pipeline", "klein": "Flux2KleinPipeline"}
TEXT_ENCODER_OUT_LAYERS = {"dev": (10, 20, 30), "klein": (9, 18, 27)}  # the pipelines' defaults


def _text_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer of a processor ([dev]'s ``PixtralProcessor``), or the tokenizer itself."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def _sha256(text: str | None) -> str:
    return hashlib.sha256((text or "").encode("utf-8")).hexdigest()


def flux2_encoder_config(
    variant: str,
    text_encoder_config: Any,
    tokenizer: Any,
    max_sequence_length: int,
    dtype: torch.dtype | str,
    out_layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Everything that changes FLUX.2 prompt embeddings, hashed into the cache's encoder identity:
    the encoder config, the tokenizer, its chat template, [dev]'s system message and the stacked layers."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    _check_variant(variant)
    config = _encoder_fingerprint(
        "flux2" if variant == "dev" else "flux2-klein", {"text_encoder": text_encoder_config},
        {"tokenizer": _text_tokenizer(tokenizer)}, max_sequence_length, dtype,
    )
    template = getattr(tokenizer, "chat_template", None) or getattr(_text_tokenizer(tokenizer), "chat_template", None)
    config["chat_template_sha256"] = _sha256(template if isinstance(template, str) else json.dumps(template))
    config["system_message_sha256"] = _sha256(SYSTEM_MESSAGE) if variant == "dev" else None
    config["text_encoder_out_layers"] = list(out_layers or TEXT_ENCODER_OUT_LAYERS[variant])
    return config


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"FLUX.2 variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
