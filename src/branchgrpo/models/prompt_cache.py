"""On-disk cache of prompt embeddings, filled ahead of training (the anchors' preprocessing step).

Text encoders are large (FLUX's T5-XXL is ~9.5 GB in bf16) and their output for a prompt never
changes, so embeddings are computed once and read back during training. The cache is keyed by

- the **encoder identity**: where the encoders came from (path or hub id) plus a hash of
  everything that changes their output (configs, tokenizers, ``max_sequence_length``, dtype), and
- the **prompt text** (SHA-256).

Layout: ``<cache_dir>/<identity>/<sha[:2]>/<sha>.safetensors``, one file per prompt holding one
row of every tensor the encoder returns (e.g. ``prompt_embeds [L, D]``,
``pooled_prompt_embeds [D']``); the prompt text is kept in the file's metadata and checked on read.
``<cache_dir>/<identity>/identity.json`` records what the identity stands for. Every write goes to
a temporary file in the same folder and is renamed into place, so a crash or a concurrent writer
never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"  # bump when the file layout or contents change
_PROMPT_KEY = "prompt"
_IDENTITY_KEY = "encoder_identity"


class PromptEncoder(Protocol):
    """Anything that can encode prompts and say which encoder it is (e.g. :class:`FluxAdapter`)."""

    encoder_identity: str

    def encode_prompts_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``P`` prompts → tensors whose leading dimension is ``P``."""
        ...


class PromptNotCachedError(LookupError):
    """A prompt has no cached embedding and no text encoder is available to compute it."""


def encoder_identity(source: str, config: Mapping[str, Any]) -> str:
    """A folder-safe identity ``<source slug>--<hash of config>`` for a text-encoder setup.

    Args:
        source: model path or hub id the encoders came from.
        config: everything that changes the embeddings (JSON-serialisable; keys are sorted).
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(source)).strip("_.")[-60:] or "encoder"
    payload = json.dumps({"format": FORMAT_VERSION, "source": str(source), "config": config},
                         sort_keys=True, default=str)
    return f"{slug}--{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "dtype", "torch_dtype", "name_or_path"}


def config_fingerprint(config: Any) -> dict[str, Any]:
    """The parts of a transformers config that change a model's output (no paths, versions, dtype)."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in items.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any] | None:
    """Class, max length and a hash of the vocabulary of a transformers tokenizer (None → None)."""
    if tokenizer is None:
        return None
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {
        "class": type(tokenizer).__name__,
        "model_max_length": int(tokenizer.model_max_length),
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
    }


def prompt_hash(prompt: str) -> str:
    """SHA-256 of the UTF-8 prompt text (the per-prompt cache key)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` to a temporary sibling, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PromptEmbeddingCache:
    """Per-prompt safetensors files for one encoder identity under ``cache_dir``."""

    def __init__(self, cache_dir: str | os.PathLike, identity: str, description: Mapping[str, Any] | None = None):
        self.root = Path(cache_dir).expanduser()
        self.identity = identity
        self.directory = self.root / identity
        self.description = dict(description or {})

    def path(self, prompt: str) -> Path:
        """File that holds (or will hold) the embeddings of ``prompt``."""
        digest = prompt_hash(prompt)
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def __contains__(self, prompt: str) -> bool:
        return self.path(prompt).is_file()

    def load(self, prompt: str) -> dict[str, Tensor] | None:
        """The cached tensors of one prompt (CPU), or ``None`` on a miss or an unreadable file."""
        path = self.path(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            logger.warning("ignoring unreadable prompt-cache entry %s (%s); it will be recomputed", path, err)
            return None
        if metadata.get(_PROMPT_KEY) != prompt or metadata.get(_IDENTITY_KEY) != self.identity:
            logger.warning("prompt-cache entry %s belongs to another prompt or encoder; recomputing", path)
            return None
        return tensors

    def save(self, prompt: str, tensors: Mapping[str, Tensor]) -> Path:
        """Store one prompt's tensors (one row each, e.g. ``[L, D]``) atomically."""
        self._write_description()
        path = self.path(prompt)
        data = {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
        metadata = {_PROMPT_KEY: prompt, _IDENTITY_KEY: self.identity, "format": FORMAT_VERSION}
        _atomic_write(path, lambda tmp: save_file(data, tmp, metadata=metadata))
        return path

    def _write_description(self) -> None:
        target = self.directory / "identity.json"
        if target.is_file():
            return
        text = json.dumps({"identity": self.identity, **self.description}, indent=2, sort_keys=True, default=str)
        _atomic_write(target, lambda tmp: Path(tmp).write_text(text + "\n"))


def _unique(prompts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def _batches(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _split_rows(tensors: Mapping[str, Tensor], count: int) -> list[dict[str, Tensor]]:
    for name, value in tensors.items():
        if value.shape[0] != count:
            raise ValueError(f"encoder returned {name} with {value.shape[0]} rows for {count} prompts")
    return [{name: value[row] for name, value in tensors.items()} for row in range(count)]


def cached_encode(
    encoder: PromptEncoder,
    prompts: Sequence[str],
    cache: PromptEmbeddingCache | None,
    batch_size: int = 8,
) -> dict[str, Tensor]:
    """Encode ``prompts`` through ``cache``: hits are read back, misses encoded in batches and stored.

    Returns tensors ``[P, ...]`` (CPU for cached rows; the caller moves them), in prompt order.
    Every row — hit or miss — is the tensor as stored, so a later hit returns identical values.
    """
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    if cache is None:
        return encoder.encode_prompts_uncached(prompts)
    rows: dict[str, dict[str, Tensor]] = {}
    missing = []
    for prompt in _unique(prompts):
        hit = cache.load(prompt)
        if hit is None:
            missing.append(prompt)
        else:
            rows[prompt] = hit
    for batch in _batches(missing, batch_size):
        encoded = encoder.encode_prompts_uncached(list(batch))
        for prompt, row in zip(batch, _split_rows(encoded, len(batch))):
            cache.save(prompt, row)
            rows[prompt] = {name: value.detach().to("cpu").contiguous() for name, value in row.items()}
    names = rows[prompts[0]].keys()
    return {name: torch.stack([rows[p][name] for p in prompts]) for name in names}


@dataclass
class PreprocessReport:
    """What :func:`preprocess_prompts` did."""

    prompts: int  # prompts given (with repeats)
    unique_prompts: int
    encoded: int  # newly encoded and written
    already_cached: int
    cache_directory: Path


def preprocess_prompts(
    adapter_or_encoder: PromptEncoder,
    prompts: Iterable[str],
    cache_dir: str | os.PathLike,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> PreprocessReport:
    """Fill the prompt-embedding cache ahead of training (what ``branchgrpo preprocess`` runs).

    Args:
        adapter_or_encoder: a model adapter (e.g. ``FluxAdapter``) or any :class:`PromptEncoder`;
            its ``encoder_identity`` picks the cache folder.
        prompts: training prompts; repeats are encoded once.
        cache_dir: cache root (the same folder the trainer is given).
        batch_size: prompts per text-encoder call.
        progress: called as ``progress(done, total)`` after every batch of unique prompts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [str(p) for p in prompts]
    unique = _unique(prompts)
    description = getattr(adapter_or_encoder, "encoder_description", None)
    cache = PromptEmbeddingCache(cache_dir, adapter_or_encoder.encoder_identity, description)
    missing = [p for p in unique if cache.load(p) is None]
    done = len(unique) - len(missing)
    if progress is not None:
        progress(done, len(unique))
    for batch in _batches(missing, batch_size):
        encoded = adapter_or_encoder.encode_prompts_uncached(list(batch))
        for prompt, row in zip(batch, _split_rows(encoded, len(batch))):
            cache.save(prompt, row)
        done += len(batch)
        if progress is not None:
            progress(done, len(unique))
    return PreprocessReport(
        prompts=len(prompts),
        unique_prompts=len(unique),
        encoded=len(missing),
        already_cached=len(unique) - len(missing),
        cache_directory=cache.directory,
    )


__all__ = [
    "PromptEncoder",
    "PromptEmbeddingCache",
    "PromptNotCachedError",
    "PreprocessReport",
    "cached_encode",
    "config_fingerprint",
    "encoder_identity",
    "preprocess_prompts",
    "prompt_hash",
    "tokenizer_fingerprint",
]
