"""The prompt encoder of the digits world: an offline word-level tokenizer and a tiny CLIP.

The tokenizer is a ``tokenizers`` WordLevel model whose ``tokenizer.json`` ships in the assets
(no hub, works with ``HF_HUB_OFFLINE=1``); the encoder is a 2-layer ``CLIPTextModel`` (~0.1M
parameters) trained jointly with the generator and frozen during RL. Like FLUX's encoders it
gives per-token embeddings (``prompt_embeds``) and a pooled vector (``pooled_prompt_embeds``,
the final hidden state at the end-of-text token).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from branchgrpo.worlds.digits.prompts import DIGIT_WORDS, PRETRAIN_TEMPLATES

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
MAX_TOKENS = 12  # padded prompt length L (BOS + up to 10 words + EOS)


def vocabulary() -> list[str]:
    """Special tokens, then every word of the prompt templates, numerals and number words."""
    words: list[str] = []
    for template in PRETRAIN_TEMPLATES:
        words += [w for w in template.lower().split() if not w.startswith("{")]
    words += [str(d) for d in range(10)] + list(DIGIT_WORDS)
    # EOS must not get id 2: CLIPTextModel then pools at argmax(input_ids) (legacy behaviour).
    return [PAD, BOS, UNK, EOS] + list(dict.fromkeys(words))


def build_tokenizer(vocab: list[str] | None = None):
    """A lower-casing, whitespace-split WordLevel tokenizer ``[BOS] words [EOS] [PAD]…`` of length L."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing

    vocab = vocab or vocabulary()
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(WordLevel(ids, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, ids[BOS]), (EOS, ids[EOS])]
    )
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding(length=MAX_TOKENS, pad_id=ids[PAD], pad_token=PAD)
    return tokenizer


def load_tokenizer(path: str | Path):
    """The shipped tokenizer from its ``tokenizer.json`` (local file only)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def text_encoder_config(vocab_size: int, eos_token_id: int, pad_token_id: int, bos_token_id: int, width: int = 64):
    """Config of the tiny ``CLIPTextModel``: 2 layers, width 64, 4 heads."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="gelu",
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        projection_dim=width,
    )


class PromptEncoder(nn.Module):
    """Prompts → ``{"prompt_embeds": [P, L, D], "pooled_prompt_embeds": [P, D]}`` (D = 64)."""

    def __init__(self, tokenizer, text_model: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_model = text_model

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``input_ids [P, L]`` and ``attention_mask [P, L]`` (long)."""
        if isinstance(prompts, str):
            raise TypeError("encode a list of prompts, e.g. ['a handwritten 7'], not a single string")
        encodings = self.tokenizer.encode_batch(list(prompts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def forward(self, prompts: list[str]) -> dict[str, Tensor]:
        device = next(self.text_model.parameters()).device
        ids, mask = self.tokenize(prompts)
        out = self.text_model(input_ids=ids.to(device), attention_mask=mask.to(device))
        return {"prompt_embeds": out.last_hidden_state, "pooled_prompt_embeds": out.pooler_output}
