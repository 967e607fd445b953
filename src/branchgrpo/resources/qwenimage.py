"""Qwen-Image's MMDiT (diffusers ``QwenImageTransformer2DModel``, also Qwen-Image-Edit's): its
parameters and forward FLOPs from ``config.json``. Not yet wired into ``branchgrpo plan``.

Structure (``diffusers/models/transformers/transformer_qwenimage.py``): ``img_in`` on the packed
2×2 latent patches, ``txt_norm`` (RMSNorm) and ``txt_in`` on the Qwen2.5-VL states, a timestep
MLP, then dual-stream blocks (``img_mod``/``txt_mod`` 6 vectors each, one joint attention with
q/k RMSNorm on both streams, GELU MLPs), ``norm_out`` and ``proj_out``. For Qwen-Image-Edit the
source image's patches join the image stream: pass them in ``image`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from branchgrpo.resources.core import Linear

# Qwen/Qwen-Image (and Qwen/Qwen-Image-Edit), transformer/config.json
QWEN_IMAGE: dict[str, Any] = {
    "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
    "num_layers": 60, "out_channels": 16, "patch_size": 2,
}


@dataclass
class QwenImageArchitecture:
    """``QwenImageTransformer2DModel`` from its ``config.json`` (missing keys: diffusers' defaults)."""

    config: dict[str, Any]

    def __post_init__(self) -> None:
        c = self.config
        for key in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if c.get(key):
                raise ValueError(f"QwenImageArchitecture: {key}=true is not covered")
        self.heads = int(c.get("num_attention_heads", 24))
        self.head_dim = int(c.get("attention_head_dim", 128))
        self.dim = self.heads * self.head_dim
        self.layers = int(c.get("num_layers", 60))
        self.in_channels = int(c.get("in_channels", 64))
        self.out_channels = int(c.get("out_channels") or 16)
        self.patch = int(c.get("patch_size", 2))
        self.joint_dim = int(c.get("joint_attention_dim", 3584))

    def top_linears(self) -> list[Linear]:
        d = self.dim
        return [Linear("time_text_embed.timestep_embedder.linear_1", 256, d, True, "sample"),
                Linear("time_text_embed.timestep_embedder.linear_2", d, d, True, "sample"),
                Linear("img_in", self.in_channels, d, True, "image"),
                Linear("txt_in", self.joint_dim, d, True, "text")]

    def block_linears_of(self, i: int) -> list[Linear]:
        d, f, p = self.dim, 4 * self.dim, f"transformer_blocks.{i}."
        rows = [("img_mod.1", d, 6 * d, "sample"), ("txt_mod.1", d, 6 * d, "sample")]
        rows += [(f"attn.{n}", d, d, "image") for n in ("to_q", "to_k", "to_v", "to_out.0")]
        rows += [(f"attn.{n}", d, d, "text") for n in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
        rows += [("img_mlp.net.0.proj", d, f, "image"), ("img_mlp.net.2", f, d, "image"),
                 ("txt_mlp.net.0.proj", d, f, "text"), ("txt_mlp.net.2", f, d, "text")]
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
        """``txt_norm``'s weight and the four q/k RMSNorm weights per block."""
        return self.joint_dim + 4 * self.head_dim * self.layers

    def image_tokens(self, height: int, width: int) -> int:
        """Packed latent tokens: VAE factor 8, then 2×2 patches."""
        return (height // 16) * (width // 16)

    def forward_flops(self, image: int, text: int) -> int:
        """One sample's forward: ``2·rows·in·out`` per linear and ``4·(L+T)²·D`` per joint attention."""
        rows = {"image": image, "text": text, "sample": 1}
        linear = sum(2 * rows[x.stream] * x.in_features * x.out_features for x in self.linears())
        return linear + self.layers * 4 * (image + text) ** 2 * self.dim
