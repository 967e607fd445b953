"""FLUX.1's transformer (diffusers ``FluxTransformer2DModel``, also the digits world's): its
linears, FLOPs and the tensors its forward saves for backward, block by block.

The saved-tensor walk mirrors ``diffusers/models/transformers/transformer_flux.py`` op by op: a
tensor is counted when the op that keeps it needs it for a gradient that is computed (which
depends on what is trained). ``tests/test_resources.py`` checks it byte for byte against
``torch.autograd.graph.saved_tensors_hooks`` on real tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from branchgrpo.resources.core import Linear, Saved, Tokens, Training


@dataclass
class FluxArchitecture:
    """``FluxTransformer2DModel`` from its ``config.json`` (missing keys: diffusers' defaults)."""

    config: dict[str, Any]

    def __post_init__(self) -> None:
        c = self.config
        self.heads = int(c.get("num_attention_heads", 24))
        self.head_dim = int(c.get("attention_head_dim", 128))
        self.dim = self.heads * self.head_dim
        self.mlp = 4 * self.dim  # mlp_ratio 4 in both block types
        self.double = int(c.get("num_layers", 19))
        self.single = int(c.get("num_single_layers", 38))
        self.in_channels = int(c.get("in_channels", 64))
        self.out_channels = int(c.get("out_channels") or self.in_channels)
        self.patch = int(c.get("patch_size", 1))
        self.joint_dim = int(c.get("joint_attention_dim", 4096))
        self.pooled_dim = int(c.get("pooled_projection_dim", 768))
        self.guidance = bool(c.get("guidance_embeds", False))

    # -- structure ---------------------------------------------------------------------------
    def top_linears(self) -> list[Linear]:
        """Embedders: timestep (and guidance) and pooled-text MLPs, the text and latent projections."""
        d = self.dim
        out = [Linear("time_text_embed.timestep_embedder.linear_1", 256, d, True, "sample"),
               Linear("time_text_embed.timestep_embedder.linear_2", d, d, True, "sample")]
        if self.guidance:
            out += [Linear("time_text_embed.guidance_embedder.linear_1", 256, d, True, "sample"),
                    Linear("time_text_embed.guidance_embedder.linear_2", d, d, True, "sample")]
        out += [Linear("time_text_embed.text_embedder.linear_1", self.pooled_dim, d, True, "sample"),
                Linear("time_text_embed.text_embedder.linear_2", d, d, True, "sample"),
                Linear("context_embedder", self.joint_dim, d, True, "text"),
                Linear("x_embedder", self.in_channels, d, True, "image")]
        return out

    def double_linears(self, i: int) -> list[Linear]:
        d, f, p = self.dim, self.mlp, f"transformer_blocks.{i}."
        rows = [("norm1.linear", d, 6 * d, "sample"), ("norm1_context.linear", d, 6 * d, "sample")]
        rows += [(f"attn.{n}", d, d, "image") for n in ("to_q", "to_k", "to_v")]
        rows += [(f"attn.{n}", d, d, "text") for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
        rows += [("attn.to_out.0", d, d, "image"), ("attn.to_add_out", d, d, "text"),
                 ("ff.net.0.proj", d, f, "image"), ("ff.net.2", f, d, "image"),
                 ("ff_context.net.0.proj", d, f, "text"), ("ff_context.net.2", f, d, "text")]
        return [Linear(p + n, i_, o, True, s) for n, i_, o, s in rows]

    def single_linears(self, i: int) -> list[Linear]:
        d, f, p = self.dim, self.mlp, f"single_transformer_blocks.{i}."
        rows = [("norm.linear", d, 3 * d, "sample"), ("proj_mlp", d, f, "all")]
        rows += [(f"attn.{n}", d, d, "all") for n in ("to_q", "to_k", "to_v")]
        rows += [("proj_out", d + f, d, "all")]
        return [Linear(p + n, i_, o, True, s) for n, i_, o, s in rows]

    def end_linears(self) -> list[Linear]:
        return [Linear("norm_out.linear", self.dim, 2 * self.dim, True, "sample"),
                Linear("proj_out", self.dim, self.patch * self.patch * self.out_channels, True, "image")]

    def linears(self) -> list[Linear]:
        out = self.top_linears()
        for i in range(self.double):
            out += self.double_linears(i)
        for i in range(self.single):
            out += self.single_linears(i)
        return out + self.end_linears()

    def other_parameters(self) -> int:
        """RMSNorm weights of q/k (4 per double block with the text ones, 2 per single block)."""
        return self.head_dim * (4 * self.double + 2 * self.single)

    def block_linears(self) -> list[list[Linear]]:
        """The FSDP units: one list of linears per transformer block."""
        return ([self.double_linears(i) for i in range(self.double)]
                + [self.single_linears(i) for i in range(self.single)])

    def inference_peak(self, tokens: Tokens) -> Saved:
        """What a no-grad forward of one sample holds at its peak, inside a single block at its
        attention call: the block input, the modulated input (LayerNorm class), the MLP branch
        ``[L, 4D]``, q and k after RMSNorm and RoPE (float32) with their compute-dtype casts, v and
        the attention output. Derived from the forward code, not measured (CPU kernels' workspace
        differs from CUDA's)."""
        rows, d = tokens.all, self.dim
        return Saved(act=5 * rows * d + rows * self.mlp, ln=rows * d, f32=2 * rows * d)

    def gradient_buffer(self, tokens: Tokens) -> int:
        """Elements of the widest activation gradient in backward: the single block's
        ``proj_out`` input ``[L, D + 4D]`` (the double block's widest is ``[L_image, 4D]``)."""
        return tokens.all * (self.dim + self.mlp) if self.single else tokens.image * self.mlp

    def image_tokens(self, height: int, width: int) -> int:
        """Packed latent tokens: VAE factor 8, then 2×2 patches (``FluxPipeline._pack_latents``)."""
        return (height // 16) * (width // 16)

    # -- what autograd keeps for backward ----------------------------------------------------
    def saved(self, tokens: Tokens, train: Training, checkpointing: bool) -> Saved:
        """Tensors saved for backward by one forward of one sample (see :class:`Saved`)."""
        s = Saved()
        d, ti, ta = self.dim, tokens.image, tokens.all
        linears = {x.name: x for x in self.top_linears()}
        temb_grad = False  # timestep (+ guidance) + pooled-text MLPs: linear_1 → SiLU → linear_2, summed
        for embedder in ("timestep_embedder", "guidance_embedder", "text_embedder"):
            if f"time_text_embed.{embedder}.linear_1" not in linears:
                continue
            first, second = (linears[f"time_text_embed.{embedder}.linear_{k}"] for k in (1, 2))
            s.linear_input(first, tokens, train, input_grad=False)
            if train.trains(first.name):
                s.act += d  # the SiLU keeps its input
            s.linear_input(second, tokens, train, input_grad=train.trains(first.name))
            temb_grad = temb_grad or train.trains(first.name) or train.trains(second.name)
        for name in ("context_embedder", "x_embedder"):
            s.linear_input(linears[name], tokens, train, input_grad=False)
        grad_img, grad_txt = train.trains("x_embedder"), train.trains("context_embedder")
        blocks: list[Saved] = []
        for i in range(self.double):
            block, grad_img, grad_txt = self._double_block(i, tokens, train, grad_img, grad_txt, temb_grad)
            blocks.append(block)
        grad = grad_img or grad_txt
        for i in range(self.single):
            block, grad = self._single_block(i, tokens, train, grad, temb_grad)
            blocks.append(block)
        for block in blocks:
            s.add_flops(block)
            if not checkpointing:
                s.add(block)
        if checkpointing:  # each block keeps only its inputs: image + text streams
            s.act += (self.double + self.single) * ta * d
            s.recompute = max(blocks, key=lambda b: b.act + b.ln + b.f32, default=None)
        # norm_out (AdaLayerNormContinuous) and proj_out on the image tokens
        norm, proj = self.end_linears()
        s.linear_input(norm, tokens, train, input_grad=temb_grad)
        if grad:  # the LayerNorm keeps the last block's output (a slice of the joint tensor)
            s.ln += (ta if self.single else ti) * d + 2 * ti
            s.act += d
        mod_grad = temb_grad or train.trains(norm.name)
        if mod_grad:
            s.ln += ti * d
        s.linear_input(proj, tokens, train, input_grad=grad or mod_grad, normed=True)
        s.shared_f32 += 2 * ta * self.head_dim  # RoPE cos and sin [L, head_dim], one copy for the batch
        if temb_grad or checkpointing:  # temb: kept by every modulation SiLU, or as a checkpointed block input
            s.act += d
        return s

    def _qk(self, s: Saved, rows: int, grad: bool, train: Training) -> None:
        """A q or k projection's output through its RMSNorm (weight: trained in a full fine-tune)."""
        if grad:  # RMSNorm computes in float32 (its input copy and 1/rms)
            s.f32 += rows * self.dim + rows * self.heads
        if train.full:
            s.f32 += rows * self.dim  # x·rstd, for the norm weight's gradient

    def _double_block(self, i: int, tokens: Tokens, train: Training, grad_img: bool, grad_txt: bool,
                      temb_grad: bool) -> tuple[Saved, bool, bool]:
        """``FluxTransformerBlock``: image and text streams, one joint attention."""
        lin = {x.name.split(".", 2)[2]: x for x in self.double_linears(i)}
        # without single blocks the last block's text output is discarded: no gradient reaches that branch
        text_live = i < self.double - 1 or self.single > 0
        return dual_stream_block(self, lin, FLUX_STREAMS, tokens, train, (grad_img, grad_txt), temb_grad,
                                 text_live, self.mlp)

    def _single_block(self, i: int, tokens: Tokens, train: Training, grad: bool,
                      temb_grad: bool) -> tuple[Saved, bool]:
        """``FluxSingleTransformerBlock``: parallel attention and MLP on the joint sequence."""
        s, d, f, rows = Saved(), self.dim, self.mlp, tokens.all
        lin = {x.name.split(".", 2)[2]: x for x in self.single_linears(i)}
        norm = lin["norm.linear"]
        mod_grad = temb_grad or train.trains(norm.name)
        s.linear_input(norm, tokens, train, input_grad=temb_grad)
        x_grad = s.modulated(rows, self.dim, grad, mod_grad)
        readers = [lin[n] for n in ("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v")]
        s.shared_input(readers, tokens, train, input_grad=x_grad, normed=True)
        mlp_grad = x_grad or train.trains(lin["proj_mlp"].name)
        if mlp_grad:
            s.act += rows * f
        for n in ("attn.to_q", "attn.to_k"):
            self._qk(s, rows, x_grad or train.trains(lin[n].name), train)
        attn_grad = x_grad or any(train.trains(x.name) for x in readers[1:])
        s.attention.append((rows, attn_grad))
        if attn_grad:
            s.act += 4 * rows * d
            s.f32 += self.heads * rows
        s.linear_input(lin["proj_out"], tokens, train, input_grad=attn_grad or mlp_grad)
        out_grad = attn_grad or mlp_grad or train.trains(lin["proj_out"].name)
        if mod_grad:
            s.act += rows * d
        if out_grad:
            s.act += 3 * d
        return s, grad or out_grad or mod_grad


@dataclass(frozen=True)
class StreamNames:
    """Module names of one stream of a dual-stream (MM-DiT) block, relative to the block: its
    modulation linear, q/k/v projections, attention output projection and MLP (``.net.0.proj``,
    ``.net.2``)."""

    modulation: str
    qkv: tuple[str, str, str]
    out: str
    mlp: str


FLUX_STREAMS = (StreamNames("norm1.linear", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0", "ff"),
                StreamNames("norm1_context.linear", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                            "attn.to_add_out", "ff_context"))


def dual_stream_block(arch: Any, lin: dict[str, Linear], names: tuple[StreamNames, StreamNames], tokens: Tokens,
                      train: Training, grads: tuple[bool, bool], temb_grad: bool, text_live: bool,
                      mlp: int) -> tuple[Saved, bool, bool]:
    """What one dual-stream block keeps for backward — FLUX.1's ``FluxTransformerBlock``, Qwen-Image's
    ``QwenImageTransformerBlock`` (and HunyuanVideo 1.5's, FLUX.1's by name): per stream a
    6-vector AdaLN modulation, q/k/v with RMSNorm'd q and k (``arch._qk``), one joint attention over
    both streams, gated output projection and a GELU MLP of width ``mlp``. ``grads``: whether the
    image and text streams' inputs need gradients; ``text_live``: whether the text output is used
    (the last block's is not, without later blocks). Returns the saved bytes and the two outputs'
    gradient flags."""
    s, d = Saved(), arch.dim
    streams = tuple(zip(names, (tokens.image, tokens.text), grads, (True, text_live)))
    attn_grad = False
    for n, rows, grad, _ in streams:
        mod_grad = temb_grad or train.trains(lin[n.modulation].name)
        s.linear_input(lin[n.modulation], tokens, train, input_grad=temb_grad)  # SiLU(temb) → 6 modulation vectors
        x_grad = s.modulated(rows, d, grad, mod_grad)
        s.shared_input([lin[q] for q in n.qkv], tokens, train, input_grad=x_grad, normed=True)
        for q in n.qkv[:2]:
            arch._qk(s, rows, x_grad or train.trains(lin[q].name), train)
        attn_grad = attn_grad or x_grad or any(train.trains(lin[q].name) for q in n.qkv)
    s.attention.append((tokens.all, attn_grad))
    if attn_grad:  # roped q, k, concatenated v, output: [B, H, L, hd]; log-sum-exp [B, H, L]
        s.act += 4 * tokens.all * d
        s.f32 += arch.heads * tokens.all
        if getattr(tokens, "masked", False):
            s.act += tokens.all  # a joint text mask, as an additive bias in the compute dtype [B, 1, 1, L]
    out_grads = []
    for n, rows, grad, live in streams:
        mod_grad = temb_grad or train.trains(lin[n.modulation].name)
        s.linear_input(lin[n.out], tokens, train, input_grad=attn_grad, live=live)
        gated_grad = attn_grad or train.trains(lin[n.out].name)
        if mod_grad:
            s.act += rows * d  # attention output, for the gate's gradient
        hidden_grad = grad or gated_grad or mod_grad
        x_grad = s.modulated(rows, d, hidden_grad, mod_grad)
        up, down = lin[f"{n.mlp}.net.0.proj"], lin[f"{n.mlp}.net.2"]
        s.linear_input(up, tokens, train, input_grad=x_grad, normed=True, live=live)
        gelu_grad = x_grad or train.trains(up.name)
        if gelu_grad:
            s.act += rows * mlp  # GELU input
        s.linear_input(down, tokens, train, input_grad=gelu_grad, live=live)
        mlp_grad = gelu_grad or train.trains(down.name)
        if mod_grad:
            s.act += rows * d  # MLP output, for the gate's gradient
        if gated_grad or mlp_grad:
            s.act += 6 * d  # the modulation vector (its gates are views of it)
        out_grads.append(hidden_grad or mlp_grad or mod_grad)
    return s, out_grads[0], out_grads[1]
