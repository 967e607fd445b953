"""SD3 / SD3.5's MMDiT (diffusers ``SD3Transformer2DModel``): its parameters, FLOPs and the tensors
its forward saves for backward, block by block, from ``config.json``.

Structure (``diffusers/models/transformers/transformer_sd3.py``, ``attention.JointTransformerBlock``):
a Conv2d patch embedding (its positional table is a buffer), timestep and pooled-text MLPs, the
caption projection, then joint blocks with image and text streams and one joint attention; blocks
in ``dual_attention_layers`` add a second image-only attention (``attn2``, AdaLN with 9 vectors);
the last block is ``context_pre_only`` (its text stream ends after attention's k, v and q:
``norm1_context`` gives 2 vectors, no ``to_add_out``, no ``ff_context``).

The saved-tensor walk follows those files op by op (no RoPE; q/k RMSNorm when ``qk_norm`` is
``rms_norm``; ``SD35AdaLayerNormZeroX`` normalises once and modulates twice; ``attn2`` is a
self-attention of the image tokens). A tensor is counted when the op that keeps it needs it for a
gradient that is computed. ``tests/resources/test_sd3_resources.py`` checks it byte for byte
against ``torch.autograd.graph.saved_tensors_hooks`` on real tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from branchgrpo.resources.core import Linear, Saved, Tokens, Training

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (its keys as the model card's
# MMDiT-X describes them: 24 blocks of 24×64, attn2 in blocks 0–12, q/k RMSNorm; not compared with the
# gated hub file here); diffusers builds it with 2,243,171,520 parameters
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

    # -- what plan needs beyond the counts ----------------------------------------------------
    def inference_peak(self, tokens: Tokens) -> Saved:
        """What a no-grad forward of one sample holds at its peak, inside a joint block at its
        attention call: both streams' block inputs and modulated inputs (LayerNorm class; a dual
        block's second modulated image input too), q, k, v of the projections, their RMSNorm outputs
        (float32) and concatenations, and the attention output. Derived from the forward code, not
        measured (CPU kernels' workspace differs from CUDA's)."""
        rows, d = tokens.all, self.dim
        dual = tokens.image * d if self.dual else 0
        return Saved(act=rows * d * (1 + 3 + 3 + 1), ln=rows * d + dual, f32=(2 * rows * d) if self.qk_norm else 0)

    def gradient_buffer(self, tokens: Tokens) -> int:
        """Elements of the widest activation gradient in backward: the image feed-forward's
        ``[L_image, 4D]`` (the text one's is ``[L_text, 4D]``)."""
        return max(tokens.image, tokens.text if self.layers > 1 else 0) * 4 * self.dim

    # -- what autograd keeps for backward ----------------------------------------------------
    def saved(self, tokens: Tokens, train: Training, checkpointing: bool) -> Saved:
        """Tensors saved for backward by one forward of one sample (see :class:`Saved`). Exact for
        micro-batches of 2 or more; with one row the last block's ``to_out.0`` input (a slice of the
        joint attention output) is contiguous and keeps the whole ``[L, D]`` output, ``L_text·D`` more."""
        s = Saved()
        d, ti = self.dim, tokens.image
        lin = {x.name: x for x in self.top_linears()}
        patch = lin["pos_embed.proj"]  # a Conv2d: it keeps its (cast) input and weight whatever needs a gradient
        s.linear_input(patch, tokens, train, input_grad=False)
        if train.low_precision and train.full:
            s.casts += patch.in_features * patch.out_features
        temb_grad = False  # timestep and pooled-text MLPs: linear_1 → SiLU → linear_2, summed
        for embedder in ("timestep_embedder", "text_embedder"):
            first, second = (lin[f"time_text_embed.{embedder}.linear_{k}"] for k in (1, 2))
            s.linear_input(first, tokens, train, input_grad=False)
            if train.trains(first.name):
                s.act += d  # the SiLU keeps its input
            s.linear_input(second, tokens, train, input_grad=train.trains(first.name))
            temb_grad = temb_grad or train.trains(first.name) or train.trains(second.name)
        s.linear_input(lin["context_embedder"], tokens, train, input_grad=False)
        grad_img, grad_txt = train.trains(patch.name), train.trains("context_embedder")
        blocks: list[Saved] = []
        for i in range(self.layers):
            block, grad_img, grad_txt = self._block(i, tokens, train, grad_img, grad_txt, temb_grad)
            blocks.append(block)
        for block in blocks:
            s.add_flops(block)
            if not checkpointing:
                s.add(block)
        if checkpointing:  # each block keeps only its inputs: image + text streams
            s.act += self.layers * tokens.all * d
            s.recompute = max(blocks, key=lambda b: b.act + b.ln + b.f32, default=None)
        norm, proj = self.end_linears()  # norm_out (AdaLayerNormContinuous) and proj_out on the image tokens
        s.linear_input(norm, tokens, train, input_grad=temb_grad)
        if grad_img:  # the LayerNorm keeps the last block's image output and statistics; (1 + scale)
            s.ln += ti * d + 2 * ti
            s.act += d
        mod_grad = temb_grad or train.trains(norm.name)
        if mod_grad:
            s.ln += ti * d
        s.linear_input(proj, tokens, train, input_grad=grad_img or mod_grad, normed=True)
        if temb_grad or checkpointing:  # temb: kept by every modulation SiLU, or as a checkpointed block input
            s.act += d
        return s

    def _qk(self, s: Saved, rows: int, grad: bool, train: Training) -> None:
        """A q or k projection's output through its RMSNorm (weight: trained in a full fine-tune)."""
        if self.qk_norm is None:
            return
        if grad:  # RMSNorm computes in float32: its input (a float32 copy in low precision) and 1/rms; the
            s.f32 += rows * self.dim + rows * self.heads  # product with 1/rms keeps the projection's own output too
            s.act += rows * self.dim if train.low_precision else 0
        if train.full:
            s.f32 += rows * self.dim  # x·rstd, for the norm weight's gradient

    def _attention(self, s: Saved, rows: int, grad: bool) -> None:
        """SDPA's saved set: q, k (normed or concatenated: their own tensors), v, the output and a
        float32 log-sum-exp."""
        s.attention.append((rows, grad))
        if grad:
            s.act += 4 * rows * self.dim
            s.f32 += self.heads * rows

    def _block(self, i: int, tokens: Tokens, train: Training, grad_img: bool, grad_txt: bool,
               temb_grad: bool) -> tuple[Saved, bool, bool]:
        """``JointTransformerBlock``: image and text streams, one joint attention, ``attn2`` in dual
        blocks; the last block's text stream stops after its q, k, v."""
        s, d = Saved(), self.dim
        lin = {x.name.split(".", 2)[2]: x for x in self.block_linears_of(i)}
        last, dual = i == self.layers - 1, i in self.dual
        ti, tt = tokens.image, tokens.text
        img_mod = temb_grad or train.trains(lin["norm1.linear"].name)
        txt_mod = temb_grad or train.trains(lin["norm1_context.linear"].name)
        # joint attention: both streams' modulated inputs → q, k, v
        attn_grad = False
        x_grads = []
        for norm, rows, grad, mod_grad, qkv, products in (
                ("norm1.linear", ti, grad_img, img_mod, ("attn.to_q", "attn.to_k", "attn.to_v"), 2 if dual else 1),
                ("norm1_context.linear", tt, grad_txt, txt_mod, ("attn.add_q_proj", "attn.add_k_proj",
                                                                 "attn.add_v_proj"), 1)):
            s.linear_input(lin[norm], tokens, train, input_grad=temb_grad)  # SiLU(temb) → modulation vectors
            x_grad = s.modulated(rows, self.dim, grad, mod_grad, products)
            x_grads.append(x_grad)
            s.shared_input([lin[n] for n in qkv], tokens, train, input_grad=x_grad, normed=True)
            for n in qkv[:2]:
                self._qk(s, rows, x_grad or train.trains(lin[n].name), train)
            attn_grad = attn_grad or x_grad or any(train.trains(lin[n].name) for n in qkv)
        self._attention(s, tokens.all, attn_grad)
        # image stream: gated attention output(s), then the feed-forward
        out = lin["attn.to_out.0"]
        s.linear_input(out, tokens, train, input_grad=attn_grad)
        gated = attn_grad or train.trains(out.name)
        if img_mod:
            s.act += ti * d  # attention output, for the gate's gradient
        if dual:
            qkv2 = [lin[f"attn2.{n}"] for n in ("to_q", "to_k", "to_v")]
            s.shared_input(qkv2, tokens, train, input_grad=x_grads[0], normed=True)
            for x in qkv2[:2]:
                self._qk(s, ti, x_grads[0] or train.trains(x.name), train)
            attn2_grad = x_grads[0] or any(train.trains(x.name) for x in qkv2)
            self._attention(s, ti, attn2_grad)
            out2 = lin["attn2.to_out.0"]
            s.linear_input(out2, tokens, train, input_grad=attn2_grad)
            if train.trains(out2.name) and (not train.low_precision or (train.full and self.qk_norm is None)):
                # its input is a view of attention's output (CPU flash attention lays it out as [B, L, H, hd]),
                # already counted; a cast instead under autocast when float32 q/k norm weights make q float32
                s.act -= ti * d
            gated = gated or attn2_grad or train.trains(out2.name)
            if img_mod:
                s.act += ti * d
        hidden_grad = grad_img or gated or img_mod
        grad_img_out, gates_img = self._feed_forward(s, lin, "ff", ti, tokens, train, hidden_grad, img_mod)
        if gated or gates_img:
            s.act += (9 if dual else 6) * d  # the modulation vector (its gates are views of it)
        if last:
            return s, grad_img_out, False
        # text stream
        out = lin["attn.to_add_out"]
        s.linear_input(out, tokens, train, input_grad=attn_grad)
        gated = attn_grad or train.trains(out.name)
        if txt_mod:
            s.act += tt * d
        hidden_grad = grad_txt or gated or txt_mod
        grad_txt_out, gates_txt = self._feed_forward(s, lin, "ff_context", tt, tokens, train, hidden_grad, txt_mod)
        if gated or gates_txt:
            s.act += 6 * d
        return s, grad_img_out, grad_txt_out

    def _feed_forward(self, s: Saved, lin: dict[str, Linear], ff: str, rows: int, tokens: Tokens, train: Training,
                      grad: bool, mod_grad: bool) -> tuple[bool, bool]:
        """``norm2`` modulation → ``net.0.proj`` → tanh GELU → ``net.2`` → gate; (output needs a
        gradient, the gate keeps the modulation vector)."""
        x_grad = s.modulated(rows, self.dim, grad, mod_grad)
        up, down = lin[f"{ff}.net.0.proj"], lin[f"{ff}.net.2"]
        s.linear_input(up, tokens, train, input_grad=x_grad, normed=True)
        gelu_grad = x_grad or train.trains(up.name)
        if gelu_grad:
            s.act += rows * 4 * self.dim  # GELU input
        s.linear_input(down, tokens, train, input_grad=gelu_grad)
        ff_grad = gelu_grad or train.trains(down.name)
        if mod_grad:
            s.act += rows * self.dim  # feed-forward output, for the gate's gradient
        return grad or ff_grad or mod_grad, ff_grad
