"""Wan 2.1's transformer (diffusers ``WanTransformer3DModel``): its parameters and forward FLOPs
from ``config.json``. Not yet wired into ``branchgrpo plan`` (no saved-activation walk yet).

Structure (``diffusers/models/transformers/transformer_wan.py``): a Conv3d patch embedding
(kernel = stride = ``patch_size``), timestep MLP + ``time_proj`` to 6 modulation vectors, a
two-layer text projection, then per block self-attention (q/k RMSNorm across heads), cross-attention
on the text tokens (same), an affine LayerNorm before it (``cross_attn_norm``) and a GELU MLP;
``scale_shift_table`` per block (6·D) and at the end (2·D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from branchgrpo.resources.core import Linear

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json
WAN21_T2V_1_3B: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
    "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}


@dataclass
class WanArchitecture:
    """``WanTransformer3DModel`` (text-to-video: no image embedder, no added k/v projections)."""

    config: dict[str, Any]

    def __post_init__(self) -> None:
        c = self.config
        if c.get("image_dim") or c.get("added_kv_proj_dim"):
            raise ValueError("WanArchitecture covers text-to-video configs (image_dim and added_kv_proj_dim unset)")
        self.heads = int(c.get("num_attention_heads", 40))
        self.head_dim = int(c.get("attention_head_dim", 128))
        self.dim = self.heads * self.head_dim
        self.ffn = int(c.get("ffn_dim", 13824))
        self.layers = int(c.get("num_layers", 40))
        self.in_channels = int(c.get("in_channels", 16))
        self.out_channels = int(c.get("out_channels", 16))
        self.text_dim = int(c.get("text_dim", 4096))
        self.freq_dim = int(c.get("freq_dim", 256))
        self.patch = tuple(int(p) for p in c.get("patch_size", (1, 2, 2)))
        self.cross_norm = bool(c.get("cross_attn_norm", True))

    def top_linears(self) -> list[Linear]:
        d, p = self.dim, math.prod(self.patch)
        return [Linear("patch_embedding", self.in_channels * p, d, True, "image"),  # Conv3d, stride = kernel
                Linear("condition_embedder.time_embedder.linear_1", self.freq_dim, d, True, "sample"),
                Linear("condition_embedder.time_embedder.linear_2", d, d, True, "sample"),
                Linear("condition_embedder.time_proj", d, 6 * d, True, "sample"),
                Linear("condition_embedder.text_embedder.linear_1", self.text_dim, d, True, "text"),
                Linear("condition_embedder.text_embedder.linear_2", d, d, True, "text")]

    def block_linears_of(self, i: int) -> list[Linear]:
        d, p = self.dim, f"blocks.{i}."
        rows = [(f"attn1.{n}", d, d, "image") for n in ("to_q", "to_k", "to_v", "to_out.0")]
        rows += [("attn2.to_q", d, d, "image"), ("attn2.to_k", d, d, "text"), ("attn2.to_v", d, d, "text"),
                 ("attn2.to_out.0", d, d, "image"),
                 ("ffn.net.0.proj", d, self.ffn, "image"), ("ffn.net.2", self.ffn, d, "image")]
        return [Linear(p + n, i_, o, True, s) for n, i_, o, s in rows]

    def end_linears(self) -> list[Linear]:
        return [Linear("proj_out", self.dim, self.out_channels * math.prod(self.patch), True, "image")]

    def linears(self) -> list[Linear]:
        out = self.top_linears()
        for i in range(self.layers):
            out += self.block_linears_of(i)
        return out + self.end_linears()

    def block_linears(self) -> list[list[Linear]]:
        return [self.block_linears_of(i) for i in range(self.layers)]

    def other_parameters(self) -> int:
        """Per block: q/k RMSNorm weights of both attentions (4·D), ``scale_shift_table`` (6·D) and
        the cross-attention LayerNorm's weight and bias (2·D); the output ``scale_shift_table`` (2·D)."""
        per_block = 4 * self.dim + 6 * self.dim + (2 * self.dim if self.cross_norm else 0)
        return self.layers * per_block + 2 * self.dim

    def image_tokens(self, frames: int, height: int, width: int) -> int:
        """Latent patches: VAE 4× in time (plus the first frame), 8× in space, then ``patch_size``."""
        pt, ph, pw = self.patch
        return ((frames - 1) // 4 + 1) // pt * (height // 8 // ph) * (width // 8 // pw)

    def forward_flops(self, image: int, text: int) -> int:
        """One sample's forward: ``2·rows·in·out`` per linear (the patch embedding included),
        ``4·L²·D`` for self-attention and ``4·L·T·D`` for cross-attention per block."""
        rows = {"image": image, "text": text, "sample": 1}
        linear = sum(2 * rows[x.stream] * x.in_features * x.out_features for x in self.linears())
        return linear + self.layers * (4 * image * image * self.dim + 4 * image * text * self.dim)
