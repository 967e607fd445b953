"""SD3 / SD3.5's MMDiT (diffusers ``SD3Transformer2DModel``): its parameters and forward FLOPs
from ``config.json``. Not yet wired into ``branchgrpo plan`` (no saved-activation walk yet).

Structure (``diffusers/models/transformers/transformer_sd3.py``, ``attention.JointTransformerBlock``):
a Conv2d patch embedding (its positional table is a buffer), timestep and pooled-text MLPs, the
caption projection, then joint blocks with image and text streams and one joint attention; blocks
in ``dual_attention_layers`` add a second image-only attention (``attn2``, AdaLN with 9 vectors);
the last block is ``context_pre_only`` (its text stream ends after attention's k, v and q:
``norm1_context`` gives 2 vectors, no ``to_add_out``, no ``ff_context``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from branchgrpo.resources.core import Linear

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json
SD35_MEDIUM: dict[str, Any] = {
    "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)), "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128,
}


@dataclass
class SD3Architecture:
    """``SD3Transformer2DModel`` from its ``config.json`` (missing keys: diffusers' defaults)."""

    config: dict[str, Any]

    def __post_init__(self) -> None:
        c = self.config
        self.heads = int(c.get("num_attention_heads", 18))
        self.head_dim = int(c.get("attention_head_dim", 64))
        self.dim = self.heads * self.head_dim
        self.layers = int(c.get("num_layers", 18))
        self.in_channels = int(c.get("in_channels", 16))
        self.out_channels = int(c.get("out_channels") or self.in_channels)
        self.patch = int(c.get("patch_size", 2))
        self.joint_dim = int(c.get("joint_attention_dim", 4096))
        self.pooled_dim = int(c.get("pooled_projection_dim", 2048))
        self.dual = {int(i) for i in c.get("dual_attention_layers", ())}
        self.qk_norm = c.get("qk_norm")
        if int(c.get("caption_projection_dim", self.dim)) != self.dim:
            raise ValueError("SD3Architecture: caption_projection_dim must equal num_attention_heads × attention_head_dim")
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3Architecture: qk_norm={self.qk_norm!r} is not covered (None or rms_norm)")

    def top_linears(self) -> list[Linear]:
        d = self.dim
        return [Linear("pos_embed.proj", self.in_channels * self.patch ** 2, d, True, "image"),  # Conv2d, stride = kernel
                Linear("time_text_embed.timestep_embedder.linear_1", 256, d, True, "sample"),
                Linear("time_text_embed.timestep_embedder.linear_2", d, d, True, "sample"),
                Linear("time_text_embed.text_embedder.linear_1", self.pooled_dim, d, True, "sample"),
                Linear("time_text_embed.text_embedder.linear_2", d, d, True, "sample"),
                Linear("context_embedder", self.joint_dim, d, True, "text")]

    def block_linears_of(self, i: int) -> list[Linear]:
        d, f, p = self.dim, 4 * self.dim, f"transformer_blocks.{i}."
        last, dual = i == self.layers - 1, i in self.dual
        rows = [("norm1.linear", d, (9 if dual else 6) * d, "sample"),
                ("norm1_context.linear", d, (2 if last else 6) * d, "sample")]
        rows += [(f"attn.{n}", d, d, "image") for n in ("to_q", "to_k", "to_v")]
        rows += [(f"attn.{n}", d, d, "text") for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
        rows += [("attn.to_out.0", d, d, "image")] + ([] if last else [("attn.to_add_out", d, d, "text")])
        if dual:
            rows += [(f"attn2.{n}", d, d, "image") for n in ("to_q", "to_k", "to_v", "to_out.0")]
        rows += [("ff.net.0.proj", d, f, "image"), ("ff.net.2", f, d, "image")]
        if not last:
            rows += [("ff_context.net.0.proj", d, f, "text"), ("ff_context.net.2", f, d, "text")]
        return [Linear(p + n, i_, o, True, s) for n, i_, o, s in rows]

    def end_linears(self) -> list[Linear]:
        return [Linear("norm_out.linear", self.dim, 2 * self.dim, True, "sample"),
                Linear("proj_out", self.dim, self.patch ** 2 * self.out_channels, True, "image")]

    def linears(self) -> list[Linear]:
        out = self.top_linears()
        for i in range(self.layers):
            out += self.block_linears_of(i)
        return out + self.end_linears()

    def block_linears(self) -> list[list[Linear]]:
        return [self.block_linears_of(i) for i in range(self.layers)]

    def other_parameters(self) -> int:
        """q/k RMSNorm weights: image and text in every block, and ``attn2``'s in dual blocks."""
        if self.qk_norm is None:
            return 0
        return self.head_dim * (4 * self.layers + 2 * len([i for i in self.dual if i < self.layers]))

    def image_tokens(self, height: int, width: int) -> int:
        """Latent patches: VAE factor 8, then ``patch_size`` × ``patch_size``."""
        return (height // 8 // self.patch) * (width // 8 // self.patch)

    def forward_flops(self, image: int, text: int) -> int:
        """One sample's forward: ``2·rows·in·out`` per linear, ``4·(L+T)²·D`` per joint attention
        and ``4·L²·D`` per ``attn2``."""
        rows = {"image": image, "text": text, "sample": 1}
        linear = sum(2 * rows[x.stream] * x.in_features * x.out_features for x in self.linears())
        dual = len([i for i in self.dual if i < self.layers])
        return linear + self.layers * 4 * (image + text) ** 2 * self.dim + dual * 4 * image ** 2 * self.dim
