"""Qwen-Image's MMDiT (diffusers ``QwenImageTransformer2DModel``, also Qwen-Image-Edit's): its
parameters, FLOPs and the tensors its forward saves for backward, block by block, from
``config.json`` (``branchgrpo plan`` families ``qwenimage`` and ``qwenimage-edit``).

Structure (``diffusers/models/transformers/transformer_qwenimage.py``): ``img_in`` on the packed
2×2 latent patches, ``txt_norm`` (RMSNorm) and ``txt_in`` on the Qwen2.5-VL states, a timestep
MLP, then dual-stream blocks (``img_mod``/``txt_mod`` 6 vectors each, one joint attention with
q/k RMSNorm on both streams, GELU MLPs), ``norm_out`` and ``proj_out``. For Qwen-Image-Edit the
source image's patches join the image stream: pass them in ``image`` tokens.

The saved-tensor walk mirrors the diffusers forward op by op, as ``flux.py`` does for FLUX's
double blocks (the block here is the same dual-stream block with its own module names; RoPE is a
complex product per stream, which keeps only the frequency tables). True CFG runs the transformer
on ``[x; x]``: ``plan`` counts two rows per sample (``families.py``'s ``rows_per_sample``).
``tests/resources/test_qwenimage_resources.py`` checks it byte for byte against
``torch.autograd.graph.saved_tensors_hooks`` on real tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from branchgrpo.resources.core import Linear, Saved, Tokens, Training
from branchgrpo.resources.flux import StreamNames, dual_stream_block

# Qwen/Qwen-Image (and Qwen/Qwen-Image-Edit), transformer/config.json
QWEN_IMAGE: dict[str, Any] = {
    "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
    "num_layers": 60, "out_channels": 16, "patch_size": 2,
}

ROPE_POSITIONS = 4096  # QwenEmbedRope's table: 4096 positions × head_dim/2 complex64; text RoPE is a view of it


# the two streams of a QwenImageTransformerBlock, as FLUX.1's dual-stream walk reads them
QWEN_STREAMS = (StreamNames("img_mod.1", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0", "img_mlp"),
                StreamNames("txt_mod.1", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.to_add_out",
                            "txt_mlp"))


@dataclass(frozen=True)
class QwenTokens(Tokens):
    """One row's tokens and whether the call passes a text mask (``masked``: some row's text is
    padded, e.g. true CFG's short negative prompt beside the prompt; an all-ones mask is passed as None)."""

    masked: bool = False


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

    # -- what autograd keeps for backward ----------------------------------------------------
    def saved(self, tokens: Tokens, train: Training, checkpointing: bool) -> Saved:
        """Tensors saved for backward by one forward of one transformer row (see :class:`Saved`)."""
        s = Saved()
        d, ti, ta = self.dim, tokens.image, tokens.all
        first, second, img_in, txt_in = self.top_linears()
        # timestep MLP: linear_1 → SiLU → linear_2 (its input, the sinusoidal projection, needs no gradient)
        s.linear_input(first, tokens, train, input_grad=False)
        if train.trains(first.name):
            s.act += d  # the SiLU keeps its input
        s.linear_input(second, tokens, train, input_grad=train.trains(first.name))
        temb_grad = train.trains(first.name) or train.trains(second.name)
        # txt_norm (RMSNorm, float32 statistics) → txt_in; its weight is trained only in a full fine-tune
        if train.full:
            s.f32 += tokens.text * self.joint_dim  # x·rstd (float32), for the norm weight's gradient
        s.linear_input(txt_in, tokens, train, input_grad=train.full)
        s.linear_input(img_in, tokens, train, input_grad=False)
        grad_img, grad_txt = train.trains(img_in.name), train.trains(txt_in.name) or train.full
        blocks: list[Saved] = []
        for i in range(self.layers):
            block, grad_img, grad_txt = self._block(i, tokens, train, grad_img, grad_txt, temb_grad)
            blocks.append(block)
        for block in blocks:
            s.add_flops(block)
            if not checkpointing:
                s.add(block)
        if checkpointing:  # each block keeps only its inputs: image + text streams
            s.act += self.layers * ta * d
            s.recompute = max(blocks, key=lambda b: b.act + b.ln + b.f32, default=None)
        # norm_out (AdaLayerNormContinuous) and proj_out on the image tokens
        norm, proj = self.end_linears()
        grad = grad_img
        s.linear_input(norm, tokens, train, input_grad=temb_grad)
        if grad:  # the LayerNorm keeps the last block's image output and its statistics; (1 + scale)
            s.ln += ti * d + 2 * ti
            s.act += d
        mod_grad = temb_grad or train.trains(norm.name)
        if mod_grad:
            s.ln += ti * d
        s.linear_input(proj, tokens, train, input_grad=grad or mod_grad, normed=True)
        # RoPE: the image frequencies [L_image, head_dim/2] complex64, made per forward, and the text ones,
        # a view of the 4096-position table; one copy for the batch
        s.shared_f32 += (ti + ROPE_POSITIONS) * self.head_dim
        if temb_grad or checkpointing:  # temb: kept by every modulation SiLU, or as a checkpointed block input
            s.act += d
        return s

    def _qk(self, s: Saved, rows: int, grad: bool, train: Training) -> None:
        """A q or k projection's output through its RMSNorm (weight: trained in a full fine-tune)."""
        if grad:  # RMSNorm computes in float32 (its input copy and 1/rms) ...
            s.f32 += rows * self.dim + rows * self.heads
            if train.low_precision:  # ... and ``x · rstd`` keeps x itself too, when that is not the float32 copy
                s.act += rows * self.dim
        if train.full:
            s.f32 += rows * self.dim  # x·rstd, for the norm weight's gradient

    def _block(self, i: int, tokens: Tokens, train: Training, grad_img: bool, grad_txt: bool,
               temb_grad: bool) -> tuple[Saved, bool, bool]:
        """``QwenImageTransformerBlock``: image and text streams, one joint attention (the
        dual-stream walk of FLUX.1 under Qwen-Image's module names, MLP width 4·D)."""
        lin = {x.name.split(".", 2)[2]: x for x in self.block_linears_of(i)}
        text_live = i < self.layers - 1  # the last block's text output is discarded: no gradient reaches it
        return dual_stream_block(self, lin, QWEN_STREAMS, tokens, train, (grad_img, grad_txt), temb_grad,
                                 text_live, 4 * self.dim)

    def inference_peak(self, tokens: Tokens) -> Saved:
        """What a no-grad forward of one sample holds at its peak inside a block, the larger of two
        moments of the forward code (derived, not measured). At the joint attention: the block's
        inputs, each stream's q, k, v and the joint q, k, v and output (``8·L·D``), the normalised and
        modulated inputs (LayerNorm class, ``2·L·D``). At the image MLP's GELU: the block's inputs,
        the attention outputs, the updated streams (``3·L·D``), the MLP's ``[L_image, 4D]`` input and
        output, and both streams' first and the image's second normalised/modulated tensors."""
        ta, ti, d = tokens.all, tokens.image, self.dim
        attention = Saved(act=8 * ta * d, ln=2 * ta * d)
        mlp = Saved(act=3 * ta * d + 8 * ti * d, ln=2 * ta * d + 2 * ti * d)
        return max(attention, mlp, key=lambda x: x.act + 2 * x.ln)  # LayerNorm class: float32 under CUDA autocast

    def gradient_buffer(self, tokens: Tokens) -> int:
        """Elements of the widest activation gradient in backward: the image MLP's ``[L_image, 4D]``."""
        return tokens.image * 4 * self.dim
