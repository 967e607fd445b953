"""What every family's loader shares on top of :class:`~branchgrpo.models.loading.PretrainedFolder`.

- :func:`diffusers_layout` / :func:`download_patterns` — a family's :class:`~branchgrpo.models.loading.ModelFiles`
  layout (model subfolders hold a ``config.json`` and safetensors, tokenizer subfolders one of
  their files) and the ``hf download --include`` patterns that fetch it;
- :func:`build_adapter` — load the transformer(s), the VAE and the text encoders (now, on the
  first prompt-cache miss, or never) and construct the adapter with the loader's common arguments.

A family's ``load_<family>_adapter`` reads its tokenizers and encoder configs (the prompt-cache
identity) and hands the rest to :func:`build_adapter`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from branchgrpo.models.loading import PretrainedFolder

Layout = dict[str, tuple[tuple[str, ...], ...]]  # subfolder -> groups of glob patterns; each group needs a match

WEIGHTS: tuple[tuple[str, ...], ...] = (("config.json",), ("*.safetensors",))  # a model subfolder's files


def diffusers_layout(models: Sequence[str], tokenizers: Mapping[str, tuple[str, ...]]) -> Layout:
    """The layout of a diffusers folder: each subfolder of ``models`` needs ``config.json`` and
    ``*.safetensors``; each tokenizer subfolder (``{subfolder: file alternatives}``) one of its files."""
    return {**{name: WEIGHTS for name in models}, **{name: (files,) for name, files in tokenizers.items()}}


def download_patterns(layout: Mapping[str, Any], extra: Sequence[str] = ("scheduler",)) -> tuple[str, ...]:
    """``hf download --include`` patterns: ``model_index.json``, the ``extra`` subfolders (part of the
    pipeline folder, not loaded here) and every subfolder of ``layout``."""
    return ("model_index.json", *(f"{name}/*" for name in (*extra, *layout)))


def build_adapter(
    folder: PretrainedFolder,
    adapter_cls: type,
    *,
    dtype: torch.dtype,
    text_encoders: Mapping[str, Any],
    models: Mapping[str, tuple[Any, torch.dtype] | None],
    encoder_config: Mapping[str, Any],
    max_sequence_length: int,
    **kwargs: Any,
) -> Any:
    """Load the parts through ``folder`` and construct ``adapter_cls`` with them.

    Args:
        text_encoders: ``{subfolder: class or None}`` in the adapter's ``text_encoder_names`` order
            (None: absent, e.g. SD3 without T5), in ``dtype``; loaded now, on the first prompt not in
            the cache, or never, as ``folder.text_encoders`` says (``"load"``, ``"lazy"``, ``"none"``).
        models: ``{subfolder: (class, dtype) or None}`` (None: not loaded, the argument is None), loaded now.
        encoder_config, max_sequence_length: the prompt-cache identity (read from the configs).
        kwargs: the rest of the constructor's arguments (tokenizers, family options).
    """
    def load_text_encoders() -> tuple:
        with folder.errors():
            return tuple(None if cls is None else folder.model(cls, name, dtype) for name, cls in text_encoders.items())

    with folder.errors():
        initial = folder.initial_text_encoders(load_text_encoders, len(text_encoders))
        loaded = {name: None if spec is None else folder.model(spec[0], name, spec[1]) for name, spec in models.items()}
    return adapter_cls(**loaded, **dict(zip(text_encoders, initial)),
                       **folder.adapter_kwargs(load_text_encoders, encoder_config, max_sequence_length), **kwargs)


__all__ = ["WEIGHTS", "build_adapter", "diffusers_layout", "download_patterns"]
