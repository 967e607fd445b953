"""The prompt encoder of the shapes world: the digits world's word-level tokenizer and tiny CLIP
(:mod:`branchgrpo.worlds.digits.text`) over the shapes grammar's words."""

from __future__ import annotations

from branchgrpo.worlds.digits.text import (
    BOS, EOS, MAX_TOKENS, PAD, UNK, PromptEncoder, build_tokenizer as _build_tokenizer, load_tokenizer,
    text_encoder_config,
)
from branchgrpo.worlds.shapes.prompts import vocabulary_words

__all__ = ["MAX_TOKENS", "PromptEncoder", "build_tokenizer", "load_tokenizer", "text_encoder_config", "vocabulary"]


def vocabulary() -> list[str]:
    """Special tokens (EOS not at id 2, as digits) then every word of the grammar."""
    return [PAD, BOS, UNK, EOS] + vocabulary_words()


def build_tokenizer():
    """WordLevel tokenizer ``[BOS] words [EOS] [PAD]…`` of length ``MAX_TOKENS`` (12 ≥ 10 words + 2)."""
    return _build_tokenizer(vocabulary())
