"""FLUX.2's transformer (diffusers ``Flux2Transformer2DModel``): its linears, FLOPs and the tensors
its forward saves for backward, block by block.

Differences from FLUX.1 (``flux.py``) that the walk follows, from
``diffusers/models/transformers/transformer_flux2.py``: no biases anywhere; one timestep (+
guidance) embedding feeds three modulation linears computed once per forward and shared by every
block of a kind (``double_stream_modulation_img/_txt``: 6·D each, ``single_stream_modulation``:
3·D), so the gates are views of those three vectors; SwiGLU feed-forwards (``linear_in`` D → 2·F,
``linear_out`` F → D, F = ``mlp_ratio``·D); single blocks fuse q, k, v and the MLP input into one
``attn.to_qkv_mlp_proj`` (D → 3·D + 2·F) whose output q, k, v and the MLP halves are views of,
and the attention and MLP outputs into ``attn.to_out`` (D + F → D). A tensor is counted when the
op that keeps it needs it for a gradient that is computed. ``tests/resources/test_flux2_resources.py``
checks it byte for byte against ``torch.autograd.graph.saved_tensors_hooks`` on real tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from branchgrpo.resources.core import Linear, Saved, Tokens, Training

# black-forest-labs/FLUX.2-dev, transformer/config.json: diffusers' Flux2Transformer2DModel defaults
# (written for FLUX.2 [dev]); 32,223,281,152 parameters
FLUX2_DEV: dict[str, Any] = {
    "_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-6, "guidance_embeds": True, "in_channels": 128, "joint_attention_dim": 15360, "mlp_ratio": 3.0,
    "num_attention_heads": 48, "num_layers": 8, "num_single_layers": 48, "out_channels": None, "patch_size": 1,
    "rope_theta": 2000, "timestep_guidance_channels": 256,
}


@dataclass
class Flux2Architecture:
    """``Flux2Transformer2DModel`` from its ``config.json`` (missing keys: diffusers' defaults)."""

    config: dict[str, Any]

    def __post_init__(self) -> None:
        c = self.config
        self.heads = int(c.get("num_attention_heads", 48))
        self.head_dim = int(c.get("attention_head_dim", 128))
        self.dim = self.heads * self.head_dim
        self.mlp = int(self.dim * float(c.get("mlp_ratio", 3.0)))  # F: SwiGLU width
        self.double = int(c.get("num_layers", 8))
        self.single = int(c.get("num_single_layers", 48))
        self.in_channels = int(c.get("in_channels", 128))
        self.out_channels = int(c.get("out_channels") or self.in_channels)
        self.patch = int(c.get("patch_size", 1))
        self.joint_dim = int(c.get("joint_attention_dim", 15360))
        self.time_channels = int(c.get("timestep_guidance_channels", 256))
        self.guidance = bool(c.get("guidance_embeds", True))

    # -- structure ---------------------------------------------------------------------------
    def top_linears(self) -> list[Linear]:
        """Timestep (and guidance) MLPs, the three shared modulations, the latent and text projections."""
        d, c = self.dim, self.time_channels
        embedders = ["timestep_embedder"] + (["guidance_embedder"] if self.guidance else [])
        out = []
        for e in embedders:
            out += [Linear(f"time_guidance_embed.{e}.linear_1", c, d, False, "sample"),
                    Linear(f"time_guidance_embed.{e}.linear_2", d, d, False, "sample")]
        out += [Linear("double_stream_modulation_img.linear", d, 6 * d, False, "sample"),
                Linear("double_stream_modulation_txt.linear", d, 6 * d, False, "sample"),
                Linear("single_stream_modulation.linear", d, 3 * d, False, "sample"),
                Linear("x_embedder", self.in_channels, d, False, "image"),
                Linear("context_embedder", self.joint_dim, d, False, "text")]
        return out

    def double_linears(self, i: int) -> list[Linear]:
        d, f, p = self.dim, self.mlp, f"transformer_blocks.{i}."
        rows = [(f"attn.{n}", d, d, "image") for n in ("to_q", "to_k", "to_v")]
        rows += [(f"attn.{n}", d, d, "text") for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
        rows += [("attn.to_out.0", d, d, "image"), ("attn.to_add_out", d, d, "text"),
                 ("ff.linear_in", d, 2 * f, "image"), ("ff.linear_out", f, d, "image"),
                 ("ff_context.linear_in", d, 2 * f, "text"), ("ff_context.linear_out", f, d, "text")]
        return [Linear(p + n, i_, o, False, s) for n, i_, o, s in rows]

    def single_linears(self, i: int) -> list[Linear]:
        d, f, p = self.dim, self.mlp, f"single_transformer_blocks.{i}."
        return [Linear(p + "attn.to_qkv_mlp_proj", d, 3 * d + 2 * f, False, "all"),
                Linear(p + "attn.to_out", d + f, d, False, "all")]

    def end_linears(self) -> list[Linear]:
        return [Linear("norm_out.linear", self.dim, 2 * self.dim, False, "sample"),
                Linear("proj_out", self.dim, self.patch * self.patch * self.out_channels, False, "image")]

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
        """The FSDP units: one list of linears per transformer block (the shared modulations are outside)."""
        return ([self.double_linears(i) for i in range(self.double)]
                + [self.single_linears(i) for i in range(self.single)])

    def inference_peak(self, tokens: Tokens) -> Saved:
        """What a no-grad forward of one sample holds at its peak, inside a single block at its
        attention call: the block input, the modulated input (LayerNorm class), the fused projection
        ``[L, 3D + 2F]`` (v and the MLP halves are views of it), q and k after RMSNorm and RoPE
        (float32) with their compute-dtype casts and the attention output. Derived from the forward
        code, not measured (CPU kernels' workspace differs from CUDA's)."""
        rows, d = tokens.all, self.dim
        return Saved(act=rows * (d + 3 * d + 2 * self.mlp + 2 * d + d), ln=rows * d, f32=2 * rows * d)

    def gradient_buffer(self, tokens: Tokens) -> int:
        """Elements of the widest activation gradient in backward: the single block's fused
        projection output ``[L, 3D + 2F]`` (the double block's widest is ``[L_image, 2F]``)."""
        if self.single:
            return tokens.all * (3 * self.dim + 2 * self.mlp)
        return tokens.image * 2 * self.mlp

    def image_tokens(self, height: int, width: int) -> int:
        """Packed latent tokens: VAE factor 8, then 2×2 patches (``Flux2Pipeline._patchify_latents``)."""
        return (height // 16) * (width // 16)

    # -- what autograd keeps for backward ----------------------------------------------------
    def saved(self, tokens: Tokens, train: Training, checkpointing: bool) -> Saved:
        """Tensors saved for backward by one forward of one sample (see :class:`Saved`)."""
        s = Saved()
        d, ti, ta = self.dim, tokens.image, tokens.all
        lin = {x.name: x for x in self.top_linears()}
        temb_grad = False  # timestep (+ guidance) MLPs: linear_1 → SiLU → linear_2, summed into temb
        for e in ("timestep_embedder", "guidance_embedder"):
            if f"time_guidance_embed.{e}.linear_1" not in lin:
                continue
            first, second = (lin[f"time_guidance_embed.{e}.linear_{k}"] for k in (1, 2))
            s.linear_input(first, tokens, train, input_grad=False)
            if train.trains(first.name):
                s.act += d  # the SiLU keeps its input
            s.linear_input(second, tokens, train, input_grad=train.trains(first.name))
            temb_grad = temb_grad or train.trains(first.name) or train.trains(second.name)
        if temb_grad:  # every SiLU(temb) (the three modulations, norm_out) keeps temb: one storage
            s.act += d
        mods = {}  # SiLU(temb) → linear, once per forward; blocks use views of these vectors
        for key, width, live in (("double_stream_modulation_img", 6, self.double > 0),
                                 ("double_stream_modulation_txt", 6, self.double > 0),
                                 ("single_stream_modulation", 3, self.single > 0)):  # unused without its blocks
            s.linear_input(lin[f"{key}.linear"], tokens, train, input_grad=temb_grad, live=live)
            mods[key] = (width, temb_grad or train.trains(f"{key}.linear"))
        for name in ("x_embedder", "context_embedder"):
            s.linear_input(lin[name], tokens, train, input_grad=False)
        grad_img, grad_txt = train.trains("x_embedder"), train.trains("context_embedder")
        mod_img, mod_txt = mods["double_stream_modulation_img"][1], mods["double_stream_modulation_txt"][1]
        mod_single = mods["single_stream_modulation"][1]
        kept = set()  # modulation vectors some gate keeps (views of the shared storage)
        blocks: list[Saved] = []
        for i in range(self.double):
            block, grad_img, grad_txt, gates = self._double_block(i, tokens, train, grad_img, grad_txt,
                                                                  mod_img, mod_txt)
            blocks.append(block)
            kept |= gates
        grad = grad_img or grad_txt
        for i in range(self.single):
            block, grad, gate = self._single_block(i, tokens, train, grad, mod_single)
            blocks.append(block)
            if gate:
                kept.add("single_stream_modulation")
        for block in blocks:
            s.add_flops(block)
            if not checkpointing:
                s.add(block)
        if checkpointing:  # each block keeps only its inputs: the streams and the modulation vectors
            s.act += (self.double + self.single) * ta * d
            kept = ({"double_stream_modulation_img", "double_stream_modulation_txt"} if self.double else set()) | (
                {"single_stream_modulation"} if self.single else set())
            s.recompute = max(blocks, key=lambda b: b.act + b.ln + b.f32, default=None)
        s.act += sum(mods[k][0] * d for k in kept)
        # norm_out (AdaLayerNormContinuous) and proj_out on the image tokens
        norm, proj = self.end_linears()
        s.linear_input(norm, tokens, train, input_grad=temb_grad)
        if grad:  # the LayerNorm keeps the last block's output: a slice of the joint [text; image] tensor
            s.ln += ta * d + 2 * ti  # (concatenated even without single blocks)
            s.act += d
        mod_grad = temb_grad or train.trains(norm.name)
        if mod_grad:
            s.ln += ti * d
        s.linear_input(proj, tokens, train, input_grad=grad or mod_grad, normed=True)
        s.shared_f32 += 2 * ta * self.head_dim  # RoPE cos and sin [L, head_dim], one copy for the batch
        return s

    def _qk(self, s: Saved, rows: int, grad: bool, train: Training, own: bool = True) -> None:
        """A q or k through its RMSNorm (weight: trained in a full fine-tune). ``own``: q/k is its
        own projection's output (double blocks); in single blocks it is a view of the fused output."""
        if grad:  # RMSNorm computes in float32: its input (a copy in low precision) and 1/rms
            s.f32 += rows * self.heads + (rows * self.dim if own or train.low_precision else 0)
        if train.full:
            s.f32 += rows * self.dim  # x·rstd, for the norm weight's gradient

    def _double_block(self, i: int, tokens: Tokens, train: Training, grad_img: bool, grad_txt: bool,
                      mod_img: bool, mod_txt: bool) -> tuple[Saved, bool, bool, set[str]]:
        """``Flux2TransformerBlock``: image and text streams, one joint attention, SwiGLU feed-forwards."""
        s, d, f = Saved(), self.dim, self.mlp
        lin = {x.name.split(".", 2)[2]: x for x in self.double_linears(i)}
        # the text stream always reaches the output: the streams are concatenated before the single
        # blocks (even when there are none), so backward runs through it with zero gradients
        streams = ((tokens.image, grad_img, mod_img, ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0",
                    "ff", "double_stream_modulation_img"),
                   (tokens.text, grad_txt, mod_txt, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                    "attn.to_add_out", "ff_context", "double_stream_modulation_txt"))
        attn_grad = False
        for rows, grad, mod_grad, qkv, _, _, _ in streams:
            x_grad = s.modulated(rows, self.dim, grad, mod_grad)
            s.shared_input([lin[n] for n in qkv], tokens, train, input_grad=x_grad, normed=True)
            for n in qkv[:2]:
                self._qk(s, rows, x_grad or train.trains(lin[n].name), train)
            attn_grad = attn_grad or x_grad or any(train.trains(lin[n].name) for n in qkv)
        s.attention.append((tokens.all, attn_grad))
        if attn_grad:  # roped q, k, concatenated v, output: [B, H, L, hd]; log-sum-exp [B, H, L]
            s.act += 4 * tokens.all * d
            s.f32 += self.heads * tokens.all
        out_grads, gates = [], set()
        for rows, grad, mod_grad, _, out, ff, mod in streams:
            s.linear_input(lin[out], tokens, train, input_grad=attn_grad)
            gated_grad = attn_grad or train.trains(lin[out].name)
            if mod_grad:
                s.act += rows * d  # attention output, for the gate's gradient
            hidden_grad = grad or gated_grad or mod_grad
            x_grad = s.modulated(rows, self.dim, hidden_grad, mod_grad)
            up, down = lin[f"{ff}.linear_in"], lin[f"{ff}.linear_out"]
            s.linear_input(up, tokens, train, input_grad=x_grad, normed=True)
            swiglu_grad = x_grad or train.trains(up.name)
            if swiglu_grad:  # SiLU and the product keep linear_in's output [L, 2F] (views) and SiLU's [L, F]
                s.act += rows * 3 * f
            s.linear_input(down, tokens, train, input_grad=swiglu_grad)
            ff_grad = swiglu_grad or train.trains(down.name)
            if mod_grad:
                s.act += rows * d  # feed-forward output, for the gate's gradient
            if gated_grad or ff_grad:
                gates.add(mod)  # the gates keep the shared modulation vector (counted once per forward)
            out_grads.append(hidden_grad or ff_grad or mod_grad)
        return s, out_grads[0], out_grads[1], gates

    def _single_block(self, i: int, tokens: Tokens, train: Training, grad: bool,
                      mod_grad: bool) -> tuple[Saved, bool, bool]:
        """``Flux2SingleTransformerBlock``: one fused projection, parallel attention and SwiGLU."""
        s, d, f, rows = Saved(), self.dim, self.mlp, tokens.all
        proj, out = self.single_linears(i)
        x_grad = s.modulated(rows, self.dim, grad, mod_grad)
        s.linear_input(proj, tokens, train, input_grad=x_grad, normed=True)
        p_grad = x_grad or train.trains(proj.name)
        if p_grad:  # q, k, v and both MLP halves are views of the output [L, 3D + 2F]; SiLU's output [L, F]
            s.act += rows * (3 * d + 2 * f) + rows * f
        for _ in ("q", "k"):
            self._qk(s, rows, p_grad, train, own=False)
        s.attention.append((rows, p_grad))
        if p_grad:  # roped q and k, output: [B, H, L, hd] (v is a view of the projection); log-sum-exp
            s.act += 3 * rows * d
            s.f32 += self.heads * rows
        s.linear_input(out, tokens, train, input_grad=p_grad)
        out_grad = p_grad or train.trains(out.name)
        if mod_grad:
            s.act += rows * d
        return s, grad or out_grad or mod_grad, out_grad
