"""HunyuanVideo 1.5's transformer (diffusers ``HunyuanVideo15Transformer3DModel``, the 480p/720p
text-to-video models): its parameters, FLOPs and the tensors its forward saves for backward.

Structure (``diffusers/models/transformers/transformer_hunyuan_video15.py``): a Conv3d patch
embedding (kernel = stride = ``(patch_size_t, patch_size, patch_size)``, ``(1, 1, 1)`` at 480p), a
timestep MLP (``time_embed``), three context streams — the Qwen2.5-VL states through the token
refiner (``context_embedder``: timestep + masked-mean-pooled text MLPs, ``proj_in`` and
``num_refiner_layers`` self-attention blocks on the Qwen tokens alone), the ByT5 states through a
three-layer MLP (``context_embedder_2``) and the image embeddings through ``image_embedder`` (all
zero in text-to-video, masked out) — then ``num_layers`` dual-stream blocks whose layout and module
names are FLUX.1's double-stream block (AdaLN-zero per stream, q/k RMSNorm, one joint masked
attention, GELU(tanh) MLPs), and ``norm_out`` + ``proj_out``. There are no single-stream blocks.

The dual-stream blocks reuse :class:`~branchgrpo.resources.flux.FluxArchitecture`'s walk (same ops,
same names). What runs before them (refiner, ByT5 and image projections) is walked here.
``tests/resources/test_hunyuanvideo15_resources.py`` checks parameters against the diffusers class and
FLOPs against torch's FLOP counter exactly; the saved tensors are an estimate, within 13 % of
``saved_tensors_hooks`` on tiny models (the context reordering's boolean indexing and the checkpoint's
own inputs are not followed op by op).

Not covered: image-to-video (non-zero ``image_embeds``; the count of its projection is the same, only
its gradient path differs), the MeanFlow ``timestep_r`` embedder (``use_meanflow``, the step-distilled
and super-resolution checkpoints), and the attention mask's own storage (a boolean ``[L, L]`` per
call, see :meth:`HunyuanVideo15Architecture.saved`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from branchgrpo.resources.core import Linear, LinearUse, Saved, Tokens, Training
from branchgrpo.resources.flux import FluxArchitecture

# hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v, transformer/config.json as diffusers'
# conversion writes it for the 480p T2V checkpoint: diffusers' HunyuanVideo15Transformer3DModel defaults
# with task_type "t2v" (not read from the hub here: no network; the class defaults give 8,326,608,160
# parameters, the "8.3B" the model card states)
HUNYUANVIDEO15_480P_T2V: dict[str, Any] = {
    "_class_name": "HunyuanVideo15Transformer3DModel", "in_channels": 65, "out_channels": 32,
    "num_attention_heads": 16, "attention_head_dim": 128, "num_layers": 54, "num_refiner_layers": 2,
    "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1, "qk_norm": "rms_norm", "text_embed_dim": 3584,
    "text_embed_2_dim": 1472, "image_embed_dim": 1152, "rope_theta": 256.0, "rope_axes_dim": [16, 56, 56],
    "target_size": 640, "task_type": "t2v", "use_meanflow": False,
}

REFINER = "context_embedder."
BYT5_HIDDEN = 2048  # HunyuanVideo15ByT5TextProjection's hidden width (fixed in the class)


@dataclass(frozen=True)
class HunyuanTokens(Tokens):
    """One row's tokens: ``image`` video patches and ``text`` = Qwen (``mllm``) + ByT5 (``glyph``) +
    image-embedding (``vision``) tokens, the joint attention's context."""

    glyph: int = 0
    vision: int = 0

    @property
    def mllm(self) -> int:
        return self.text - self.glyph - self.vision

    def rows(self, stream: str) -> int:
        extra = {"mllm": self.mllm, "glyph": self.glyph, "vision": self.vision}
        return extra[stream] if stream in extra else super().rows(stream)


@dataclass
class HunyuanVideo15Architecture:
    """``HunyuanVideo15Transformer3DModel`` from its ``config.json`` (missing keys: diffusers' defaults)."""

    config: dict[str, Any]

    def __post_init__(self) -> None:
        c = self.config
        if c.get("use_meanflow"):
            raise ValueError("HunyuanVideo15Architecture: use_meanflow=true is not covered")
        self.heads = int(c.get("num_attention_heads", 16))
        self.head_dim = int(c.get("attention_head_dim", 128))
        self.dim = self.heads * self.head_dim
        self.mlp = int(self.dim * float(c.get("mlp_ratio", 4.0)))
        self.layers = int(c.get("num_layers", 54))
        self.refiner_layers = int(c.get("num_refiner_layers", 2))
        self.in_channels = int(c.get("in_channels", 65))
        self.out_channels = int(c.get("out_channels") or self.in_channels)
        self.patch = (int(c.get("patch_size_t", 1)), int(c.get("patch_size", 1)), int(c.get("patch_size", 1)))
        self.text_dim = int(c.get("text_embed_dim", 3584))
        self.glyph_dim = int(c.get("text_embed_2_dim", 1472))
        self.image_dim = int(c.get("image_embed_dim", 1152))
        # the dual-stream blocks: FLUX.1's double-stream block, same module names
        self.blocks = FluxArchitecture({"num_attention_heads": self.heads, "attention_head_dim": self.head_dim,
                                        "num_layers": self.layers, "num_single_layers": 0})
        self.blocks.mlp = self.mlp  # FLUX.1's is always 4·D

    # -- structure ---------------------------------------------------------------------------
    def top_linears(self) -> list[Linear]:
        d, g, v = self.dim, self.glyph_dim, self.image_dim
        r = REFINER + "time_text_embed."
        return [Linear("x_embedder.proj", self.in_channels * math.prod(self.patch), d, True, "image"),
                Linear("time_embed.timestep_embedder.linear_1", 256, d, True, "sample"),
                Linear("time_embed.timestep_embedder.linear_2", d, d, True, "sample"),
                Linear(r + "timestep_embedder.linear_1", 256, d, True, "sample"),
                Linear(r + "timestep_embedder.linear_2", d, d, True, "sample"),
                Linear(r + "text_embedder.linear_1", self.text_dim, d, True, "sample"),
                Linear(r + "text_embedder.linear_2", d, d, True, "sample"),
                Linear(REFINER + "proj_in", self.text_dim, d, True, "mllm"),
                Linear("context_embedder_2.linear_1", g, BYT5_HIDDEN, True, "glyph"),
                Linear("context_embedder_2.linear_2", BYT5_HIDDEN, BYT5_HIDDEN, True, "glyph"),
                Linear("context_embedder_2.linear_3", BYT5_HIDDEN, d, True, "glyph"),
                Linear("image_embedder.linear_1", v, v, True, "vision"),
                Linear("image_embedder.linear_2", v, d, True, "vision")]

    def refiner_linears(self, i: int) -> list[Linear]:
        # the refiner's MLP is 4·D whatever mlp_ratio (the model builds it with its default)
        d, f, p = self.dim, 4 * self.dim, f"{REFINER}token_refiner.refiner_blocks.{i}."
        rows = [(f"attn.{n}", d, d, "mllm") for n in ("to_q", "to_k", "to_v", "to_out.0")]
        rows += [("ff.net.0.proj", d, f, "mllm"), ("ff.net.2", f, d, "mllm"), ("norm_out.linear", d, 2 * d, "sample")]
        return [Linear(p + n, i_, o, True, s) for n, i_, o, s in rows]

    def end_linears(self) -> list[Linear]:
        return [Linear("norm_out.linear", self.dim, 2 * self.dim, True, "sample"),
                Linear("proj_out", self.dim, math.prod(self.patch) * self.out_channels, True, "image")]

    def linears(self) -> list[Linear]:
        out = self.top_linears()
        for i in range(self.refiner_layers):
            out += self.refiner_linears(i)
        for i in range(self.layers):
            out += self.blocks.double_linears(i)
        return out + self.end_linears()

    def block_linears(self) -> list[list[Linear]]:
        """The FSDP units and checkpointed blocks: the dual-stream blocks."""
        return [self.blocks.double_linears(i) for i in range(self.layers)]

    def other_parameters(self) -> int:
        """q/k RMSNorm weights (4·head_dim per block), the refiner's two affine LayerNorms per block
        (4·D), the ByT5 input LayerNorm (2·1472), the image projection's LayerNorms (2·1152 + 2·D)
        and ``cond_type_embed`` (3·D)."""
        d = self.dim
        return (4 * self.head_dim * self.layers + 4 * d * self.refiner_layers + 2 * self.glyph_dim
                + 2 * self.image_dim + 2 * d + 3 * d)

    def video_tokens(self, frames: int, height: int, width: int) -> int:
        """Latent patches: VAE 4× in time (plus the first frame), 16× in space, then the patch."""
        pt, ph, pw = self.patch
        return ((frames - 1) // 4 + 1) // pt * (height // 16 // ph) * (width // 16 // pw)

    def inference_peak(self, tokens: Tokens) -> Saved:
        """A no-grad forward's peak inside a dual-stream block at its attention call (FLUX.1's double
        block: the same tensors), plus the boolean ``[L, L]`` attention mask (one byte an element,
        counted as a quarter float32 element)."""
        peak = self.blocks.inference_peak(tokens)
        peak.f32 += -(-tokens.all * tokens.all // 4)
        return peak

    def gradient_buffer(self, tokens: Tokens) -> int:
        """The widest activation gradient in backward: a dual-stream block's MLP ``[L_image, 4D]``."""
        return tokens.image * self.mlp

    # -- what autograd keeps for backward ----------------------------------------------------
    def saved(self, tokens: Tokens, train: Training, checkpointing: bool) -> Saved:
        """Tensors saved for backward by one forward of one sample (see :class:`Saved`).

        The walk of the dual-stream blocks is FLUX.1's (``FluxArchitecture._double_block``); the
        embedders before them are walked here. Under checkpointing each block keeps its inputs (the
        video and joint-context streams, ``temb``, the mask and the RoPE tables once)."""
        tokens = tokens if isinstance(tokens, HunyuanTokens) else HunyuanTokens(tokens.image, tokens.text)
        s = Saved()
        d, ti = self.dim, tokens.image
        lin = {x.name: x for x in self.top_linears()}
        # the patch embedding, a Conv3d: its backward keeps the input and (autocast's cast of) the weight
        patch = lin["x_embedder.proj"]
        if train.lora(patch.name):
            s.linear_input(patch, tokens, train, input_grad=False)
        else:
            s.uses.append(LinearUse(patch, ti, False, train.trains(patch.name), False))
            if train.trains(patch.name):
                s.act += ti * patch.in_features
                s.casts += patch.in_features * patch.out_features if train.low_precision else 0
        temb_grad = self._mlp2(s, lin, "time_embed.timestep_embedder", tokens, train, False)
        # the token refiner's conditioning: timestep MLP + pooled-text MLP (SiLU), summed
        r = REFINER + "time_text_embed."
        rtemb_grad = self._mlp2(s, lin, r + "timestep_embedder", tokens, train, False)
        rtemb_grad = self._mlp2(s, lin, r + "text_embedder", tokens, train, False) or rtemb_grad
        s.linear_input(lin[REFINER + "proj_in"], tokens, train, input_grad=False)
        grad = train.trains(REFINER + "proj_in")
        for i in range(self.refiner_layers):
            grad = self._refiner_block(s, i, tokens, train, grad, rtemb_grad)
        grad_txt = grad
        # ByT5: LayerNorm → linear_1 → GELU → linear_2 → GELU → linear_3
        one, two, three = (lin[f"context_embedder_2.linear_{k}"] for k in (1, 2, 3))
        rows = tokens.glyph
        if train.full:  # the affine LayerNorm's weight gradient keeps its input and statistics
            s.ln += rows * self.glyph_dim + 2 * rows
        s.linear_input(one, tokens, train, input_grad=train.full)  # after an affine LayerNorm
        g = train.full or train.trains(one.name)
        if g:
            s.act += rows * BYT5_HIDDEN
        s.linear_input(two, tokens, train, input_grad=g)
        g = g or train.trains(two.name)
        if g:
            s.act += rows * BYT5_HIDDEN
        s.linear_input(three, tokens, train, input_grad=g)
        grad_txt = grad_txt or g or train.trains(three.name)
        # image embeddings (text-to-video: zeros, then × 0): LayerNorm → linear_1 → GELU → linear_2 → LayerNorm
        one, two = lin["image_embedder.linear_1"], lin["image_embedder.linear_2"]
        rows = tokens.vision
        if train.full:
            s.ln += rows * self.image_dim + 2 * rows
        s.linear_input(one, tokens, train, input_grad=train.full)  # after an affine LayerNorm
        g = train.full or train.trains(one.name)
        if g:
            s.act += rows * self.image_dim
        s.linear_input(two, tokens, train, input_grad=g)
        g = g or train.trains(two.name)
        if g or train.full:
            s.ln += rows * d + 2 * rows
        grad_txt = grad_txt or g or train.full

        if train.full:  # cond_type_embed's weight gradient keeps the int64 indices of every context token
            s.f32 += 2 * tokens.text
        grad_img = train.trains(patch.name)
        blocks: list[Saved] = []
        for i in range(self.layers):
            block, grad_img, grad_txt = self.blocks._double_block(i, tokens, train, grad_img, grad_txt, temb_grad)
            if block.attention[-1][1]:  # the joint mask [L, L] (built in every block) as an additive bias
                block.act += tokens.all * tokens.all
            blocks.append(block)
        for block in blocks:
            s.add_flops(block)
            if not checkpointing:
                s.add(block)
        if checkpointing:
            s.act += self.layers * tokens.all * d
            s.recompute = max(blocks, key=lambda b: b.act + b.ln + b.f32, default=None)
        norm, proj = self.end_linears()
        s.linear_input(norm, tokens, train, input_grad=temb_grad)
        if grad_img:
            s.ln += ti * d + 2 * ti
            s.act += d
        mod_grad = temb_grad or train.trains(norm.name)
        if mod_grad:
            s.ln += ti * d
        s.linear_input(proj, tokens, train, input_grad=grad_img or mod_grad, normed=True)
        s.shared_f32 += 2 * ti * self.head_dim  # RoPE cos and sin [L_image, head_dim], one copy for the batch
        if temb_grad or checkpointing:
            s.act += d
        return s

    def _mlp2(self, s: Saved, lin: dict[str, Linear], prefix: str, tokens: Tokens, train: Training,
              input_grad: bool) -> bool:
        """``linear_1 → SiLU → linear_2`` on one row per sample; whether its output needs a gradient."""
        first, second = lin[f"{prefix}.linear_1"], lin[f"{prefix}.linear_2"]
        s.linear_input(first, tokens, train, input_grad=input_grad)
        if train.trains(first.name):
            s.act += self.dim
        s.linear_input(second, tokens, train, input_grad=train.trains(first.name))
        return train.trains(first.name) or train.trains(second.name)

    def _refiner_block(self, s: Saved, i: int, tokens: Tokens, train: Training, grad: bool,
                       temb_grad: bool) -> bool:
        """``HunyuanVideo15IndividualTokenRefinerBlock`` on the Qwen tokens: affine LayerNorm →
        masked self-attention (no q/k norm, no RoPE) → gated residual; affine LayerNorm → SiLU MLP →
        gated residual; the gates from ``SiLU(temb)``."""
        d, f, rows = self.dim, 4 * self.dim, tokens.mllm
        lin = {x.name.rsplit(f"refiner_blocks.{i}.", 1)[1]: x for x in self.refiner_linears(i)}
        gate = lin["norm_out.linear"]
        s.linear_input(gate, tokens, train, input_grad=temb_grad)
        gate_grad = temb_grad or train.trains(gate.name)
        if grad or train.full:  # norm1 keeps its input and statistics
            s.ln += rows * d + 2 * rows
        x_grad = grad or train.full
        qkv = [lin[f"attn.to_{n}"] for n in "qkv"]
        s.shared_input(qkv, tokens, train, input_grad=x_grad, normed=True)
        attn_grad = x_grad or any(train.trains(x.name) for x in qkv)
        s.attention.append((rows, attn_grad))
        if attn_grad:  # q, k, v, output, log-sum-exp, and the boolean mask as an additive bias per head
            s.act += 4 * rows * d + self.heads * rows * rows
            s.f32 += self.heads * rows
        s.linear_input(lin["attn.to_out.0"], tokens, train, input_grad=attn_grad)
        out_grad = attn_grad or train.trains(lin["attn.to_out.0"].name)
        if gate_grad:
            s.act += rows * d  # attention output, for the gate's gradient
        if out_grad:
            s.act += d  # gate_msa
        grad = grad or out_grad or gate_grad
        if grad or train.full:  # norm2
            s.ln += rows * d + 2 * rows
        x_grad = grad or train.full
        up, down = lin["ff.net.0.proj"], lin["ff.net.2"]
        s.linear_input(up, tokens, train, input_grad=x_grad, normed=True)
        silu_grad = x_grad or train.trains(up.name)
        if silu_grad:
            s.act += rows * f
        s.linear_input(down, tokens, train, input_grad=silu_grad)
        ff_grad = silu_grad or train.trains(down.name)
        if gate_grad:
            s.act += rows * d
        if ff_grad:
            s.act += d  # gate_mlp
        return grad or ff_grad or gate_grad
