"""Wan's transformer (diffusers ``WanTransformer3DModel``, Wan2.1 T2V and each Wan2.2 T2V-A14B
expert): its parameters, FLOPs and the tensors its forward saves for backward, block by block.

Structure (``diffusers/models/transformers/transformer_wan.py``): a Conv3d patch embedding
(kernel = stride = ``patch_size``), timestep MLP + ``time_proj`` to 6 modulation vectors, a
two-layer text projection, then per block self-attention (q/k RMSNorm across heads), cross-attention
on the text tokens (same), an affine LayerNorm before it (``cross_attn_norm``) and a GELU MLP;
``scale_shift_table`` per block (6·D) and at the end (2·D).

The saved-tensor walk (:meth:`WanArchitecture.saved`) mirrors that forward op by op as the trainer
runs it (``models/base.py`` ``GuidedVelocity``: inputs in the dtype of the base weights, i.e.
float32 masters for a full fine-tune and the compute dtype for a LoRA base, under autocast): the
LayerNorms are ``FP32LayerNorm`` (float32 whatever the autocast), the AdaLN modulation and its gates
are float32, the residual stream stays in the compute dtype, RMSNorm keeps a float32 copy of its
input. ``tests/resources/test_wan_resources.py`` checks it byte for byte against
``torch.autograd.graph.saved_tensors_hooks`` on real tiny models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from branchgrpo.resources.core import Linear, LinearUse, Saved, Tokens, Training

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json
WAN21_T2V_1_3B: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
    "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}

# Wan2.2 (Wan-Video/Wan2.2, wan/configs/wan_t2v_A14B.py and wan_ti2v_5B.py: dim, ffn_dim, freq_dim,
# num_heads, num_layers, patch_size, in_dim; text_dim 4096 is UMT5-XXL's, as in Wan2.1) in diffusers' names.
# T2V-A14B: each of its two experts (high-noise ``transformer``, low-noise ``transformer_2``).
WAN22_T2V_A14B_EXPERT: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 40,
    "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
# TI2V-5B: one transformer on the 48-channel Wan2.2 VAE latents
WAN22_TI2V_5B: dict[str, Any] = {**WAN22_T2V_A14B_EXPERT, "num_attention_heads": 24, "in_channels": 48,
                                 "out_channels": 48, "ffn_dim": 14336, "num_layers": 30}


@dataclass
class WanArchitecture:
    """``WanTransformer3DModel`` (text-to-video: no image embedder, no added k/v projections).
    ``prefix``: put before every module name (``"transformer_2."`` for an expert inside ``WanExperts``).
    ``per_token_timesteps``: the transformer gets one timestep per latent token (TI2V-5B's pipeline,
    ``expand_timesteps``), so the timestep MLP runs on every token and every block's modulation is
    ``[L, 6·D]`` instead of ``[6·D]``."""

    config: dict[str, Any]
    prefix: str = ""
    per_token_timesteps: bool = False

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
        d, p, c = self.dim, math.prod(self.patch), f"{self.prefix}condition_embedder."
        # the patch embedding is a Conv3d with stride = kernel: a linear on each patch
        return [Linear(f"{self.prefix}patch_embedding", self.in_channels * p, d, True, "image"),
                Linear(c + "time_embedder.linear_1", self.freq_dim, d, True, self._time),
                Linear(c + "time_embedder.linear_2", d, d, True, self._time),
                Linear(c + "time_proj", d, 6 * d, True, self._time),
                Linear(c + "text_embedder.linear_1", self.text_dim, d, True, "text"),
                Linear(c + "text_embedder.linear_2", d, d, True, "text")]

    @property
    def _time(self) -> str:
        """The rows of the timestep MLP and modulation: one per sample, or one per image token."""
        return "image" if self.per_token_timesteps else "sample"

    def block_linears_of(self, i: int) -> list[Linear]:
        d, p = self.dim, f"{self.prefix}blocks.{i}."
        rows = [(f"attn1.{n}", d, d, "image") for n in ("to_q", "to_k", "to_v", "to_out.0")]
        rows += [("attn2.to_q", d, d, "image"), ("attn2.to_k", d, d, "text"), ("attn2.to_v", d, d, "text"),
                 ("attn2.to_out.0", d, d, "image"),
                 ("ffn.net.0.proj", d, self.ffn, "image"), ("ffn.net.2", self.ffn, d, "image")]
        return [Linear(p + n, i_, o, True, s) for n, i_, o, s in rows]

    def end_linears(self) -> list[Linear]:
        return [Linear(f"{self.prefix}proj_out", self.dim, self.out_channels * math.prod(self.patch), True, "image")]

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

    # -- what autograd keeps for backward ----------------------------------------------------
    def saved(self, tokens: Tokens, train: Training, checkpointing: bool) -> Saved:
        """Tensors saved for backward by one forward of one sample (see :class:`Saved`).

        ``checkpointing``: diffusers' ``enable_gradient_checkpointing`` (what ``model.gradient_checkpointing``
        calls, ``train/components.py``): every ``WanTransformerBlock`` runs under non-reentrant
        ``torch.utils.checkpoint``, which keeps the block's tensor inputs — the image stream per block,
        the text states and the 6 modulation vectors once (the same tensors for every block) — and the
        RoPE tables as a non-tensor argument."""
        s = Saved()
        d, ti, tt = self.dim, tokens.image, tokens.text
        m = tokens.rows(self._time)  # rows of temb and of the modulation vectors
        lin = {x.name[len(self.prefix):]: x for x in self.top_linears()}
        # patch embedding, a Conv3d: its backward keeps the input and (autocast's cast of) the weight
        patch = lin["patch_embedding"]
        if train.lora(patch.name):
            s.linear_input(patch, tokens, train, input_grad=False)
        else:
            s.uses.append(LinearUse(patch, ti, False, train.trains(patch.name), False))
            if train.trains(patch.name):
                s.act += ti * patch.in_features
                s.casts += patch.in_features * patch.out_features if train.low_precision else 0
        # timestep: sinusoid → linear_1 → SiLU → linear_2 = temb; SiLU(temb) → time_proj = 6 vectors
        first, second, proj = (lin[f"condition_embedder.{n}"] for n in (
            "time_embedder.linear_1", "time_embedder.linear_2", "time_proj"))
        s.linear_input(first, tokens, train, input_grad=False)
        if train.trains(first.name):
            s.act += m * d  # the SiLU keeps linear_1's output
        s.linear_input(second, tokens, train, input_grad=train.trains(first.name))
        temb_grad = train.trains(first.name) or train.trains(second.name)
        if temb_grad:  # SiLU(temb) keeps temb, cast to the inputs' dtype (float32 masters in a full fine-tune)
            if train.full:
                s.f32 += m * d
            else:
                s.act += m * d
        s.linear_input(proj, tokens, train, input_grad=temb_grad)
        proj_grad = temb_grad or train.trains(proj.name)
        # text: linear_1 → GELU(tanh) → linear_2
        t1, t2 = (lin[f"condition_embedder.text_embedder.linear_{k}"] for k in (1, 2))
        s.linear_input(t1, tokens, train, input_grad=False)
        if train.trains(t1.name):
            s.act += tt * d
        s.linear_input(t2, tokens, train, input_grad=train.trains(t1.name))
        text_grad = train.trains(t1.name) or train.trains(t2.name)

        grad = train.trains(patch.name)
        blocks: list[Saved] = []
        text_kept = False
        for i in range(self.layers):
            block, grad, kept = self._block(i, tokens, train, grad, text_grad, proj_grad)
            blocks.append(block)
            text_kept = text_kept or kept
        for block in blocks:
            s.add_flops(block)
            if not checkpointing:
                s.add(block)
        if checkpointing:  # the checkpoint keeps each block's image input, the text and the modulation once
            s.act += self.layers * ti * d + tt * d + 6 * m * d
            s.recompute = max(blocks, key=lambda b: b.act + b.ln + b.f32, default=None)
        elif text_kept:  # the text states every cross-attention's k/v read: one tensor for all blocks
            s.act += tt * d
        # norm_out (FP32LayerNorm, scale_shift_table + temb) and proj_out
        out = self.end_linears()[0]
        x_grad = self._modulated(s, ti, m, grad, temb_grad or train.full)
        s.linear_input(out, tokens, train, input_grad=x_grad)
        s.shared_f32 += 2 * ti * self.head_dim  # RoPE cos and sin [L, head_dim], one copy for the batch
        return s

    def _modulated(self, s: Saved, rows: int, mod_rows: int, grad: bool, mod_grad: bool) -> bool:
        """``FP32LayerNorm(x.float())·(1 + scale) + shift`` (no affine weights, float32; ``mod_rows``
        rows of scale and shift); whether it needs a gradient."""
        if grad:  # the LayerNorm keeps its float32 input and statistics, the product keeps (1 + scale)
            s.f32 += rows * self.dim + 2 * rows + mod_rows * self.dim
        if mod_grad:  # the product keeps the normalised tensor for the gradient of scale
            s.f32 += rows * self.dim
        return grad or mod_grad

    def _rms(self, s: Saved, rows: int, grad: bool, train: Training) -> None:
        """A q or k projection through its RMSNorm across heads (float32 input copy and ``1/rms``;
        ``x/rms`` for the weight's gradient in a full fine-tune)."""
        if grad:
            s.f32 += rows * self.dim + rows
        if train.full:
            s.f32 += rows * self.dim

    @staticmethod
    def _out(s: Saved, out: Linear, tokens: Tokens, train: Training, input_grad: bool) -> None:
        """``to_out.0`` on the attention output: the same storage the attention keeps, unless an
        adapter casts its own copy (low precision LoRA)."""
        s.linear_input(out, tokens, train, input_grad=input_grad)
        if train.trains(out.name) and not (train.low_precision and not train.full):
            s.act -= tokens.image * out.in_features

    def _block(self, i: int, tokens: Tokens, train: Training, grad: bool, text_grad: bool,
               proj_grad: bool) -> tuple[Saved, bool, bool]:
        """``WanTransformerBlock``: self-attention, cross-attention on the text, feed-forward.
        Returns the block's set, whether its output needs a gradient, and whether it keeps the text
        states themselves (counted once for all blocks)."""
        s, d, f, ti, tt = Saved(), self.dim, self.ffn, tokens.image, tokens.text
        m = tokens.rows(self._time)
        lin = {x.name[len(f"{self.prefix}blocks.{i}."):]: x for x in self.block_linears_of(i)}
        trains = lambda n: train.trains(lin[n].name)  # noqa: E731
        mod_grad = proj_grad or train.full  # scale_shift_table + temb: trained in a full fine-tune
        # self-attention
        x_grad = self._modulated(s, ti, m, grad, mod_grad)
        qkv = [lin[f"attn1.to_{n}"] for n in "qkv"]
        s.shared_input(qkv, tokens, train, input_grad=x_grad)
        for n in ("attn1.to_q", "attn1.to_k"):
            self._rms(s, ti, x_grad or trains(n), train)
        attn_grad = x_grad or any(train.trains(x.name) for x in qkv)
        s.attention.append((ti, attn_grad))
        if attn_grad:  # roped q, k, v and the output [B, H, L, hd]; log-sum-exp [B, H, L]
            s.act += 4 * ti * d
            s.f32 += self.heads * ti
        self._out(s, lin["attn1.to_out.0"], tokens, train, attn_grad)
        gated_grad = attn_grad or trains("attn1.to_out.0")
        if mod_grad:
            s.act += ti * d  # attention output, for the gate's gradient
        grad = grad or gated_grad or mod_grad
        # cross-attention: norm2 (affine FP32LayerNorm, trained in a full fine-tune) or the identity
        if self.cross_norm and (grad or train.full):
            s.f32 += ti * d + 2 * ti
        q_grad = grad or (self.cross_norm and train.full)
        s.linear_input(lin["attn2.to_q"], tokens, train, input_grad=q_grad)
        kv = [lin["attn2.to_k"], lin["attn2.to_v"]]
        kv_set = Saved()
        kv_set.shared_input(kv, tokens, train, input_grad=text_grad)
        kept = any(train.trains(x.name) for x in kv) and not (train.low_precision and not train.full)
        if kept:  # the adapters read the text states themselves (no per-block cast): counted once, in saved()
            kv_set.act -= tt * d
        s.add(kv_set)
        s.add_flops(kv_set)
        self._rms(s, ti, q_grad or trains("attn2.to_q"), train)
        self._rms(s, tt, text_grad or trains("attn2.to_k"), train)
        cross_q_grad = q_grad or trains("attn2.to_q")
        cross_kv_grad = text_grad or trains("attn2.to_k") or trains("attn2.to_v")
        cross_grad = cross_q_grad or cross_kv_grad
        s.cross_attention.append((ti, tt, cross_q_grad, cross_kv_grad))
        if cross_grad:  # q and the output [B, H, L, hd], k and v [B, H, T, hd], log-sum-exp [B, H, L]
            s.act += 2 * ti * d + 2 * tt * d
            s.f32 += self.heads * ti
        self._out(s, lin["attn2.to_out.0"], tokens, train, cross_grad)
        grad = grad or cross_grad or trains("attn2.to_out.0")
        # feed-forward: norm3 modulated, GELU(tanh) MLP, gated residual
        x_grad = self._modulated(s, ti, m, grad, mod_grad)
        up, down = lin["ffn.net.0.proj"], lin["ffn.net.2"]
        s.linear_input(up, tokens, train, input_grad=x_grad)
        gelu_grad = x_grad or train.trains(up.name)
        if gelu_grad:
            s.act += ti * f  # GELU input
        s.linear_input(down, tokens, train, input_grad=gelu_grad)
        ff_grad = gelu_grad or train.trains(down.name)
        if mod_grad:
            s.f32 += ti * d  # ff_output.float(), for the gate's gradient
        if gated_grad or ff_grad:
            s.f32 += 6 * m * d  # the float32 modulation vectors (the gates are views of them)
        return s, grad or ff_grad or mod_grad, kept

    def inference_peak(self, tokens: Tokens) -> Saved:
        """What a no-grad forward of one sample holds at its peak inside a block, the larger of two
        moments: at self-attention (the block input, the modulated input, q, k, v and the output,
        RMSNorm's float32 copy and the float32 LayerNorm output) and in the feed-forward (input,
        modulated input, the ``[L, ffn]`` up-projection and GELU output, float32 LayerNorm output
        and its modulation); the text states in both. Derived from the forward code, not measured."""
        ti, tt, d, f = tokens.image, tokens.text, self.dim, self.ffn
        attention = Saved(act=6 * ti * d + tt * d, f32=2 * ti * d)
        mlp = Saved(act=2 * ti * d + 2 * ti * f + tt * d, f32=2 * ti * d)
        return max(attention, mlp, key=lambda x: 2 * x.act + 4 * x.f32)

    def gradient_buffer(self, tokens: Tokens) -> int:
        """Elements of the widest activation gradient in backward: the feed-forward's ``[L, ffn]``."""
        return tokens.image * max(self.ffn, self.dim)


@dataclass
class WanExpertsArchitecture:
    """Wan2.2-T2V-A14B as the trainer holds it (``models/wan22_experts.py`` ``WanExperts``): two
    experts of one ``config`` (``transformer`` for high noise, ``transformer_2`` for low noise), both
    resident, both trained (full or LoRA in each), both sharded under FSDP (each expert's blocks).

    Parameters, LoRA adapters, optimizer state, autocast weight casts and FSDP units count both
    experts. A transformer row runs one expert (``Wan22Velocity`` splits a micro-batch that mixes
    steps on both sides of the boundary into one call per expert, each on its own rows), so what one
    row saves for backward, computes and holds in a forward is one expert's: :meth:`saved`,
    :meth:`inference_peak` and :meth:`gradient_buffer` are the high-noise expert's (the same
    architecture as the other)."""

    config: dict[str, Any]

    def __post_init__(self) -> None:
        from branchgrpo.models.wan22_experts import EXPERT_NAMES

        self.experts = [WanArchitecture(self.config, prefix=f"{name}.") for name in EXPERT_NAMES]
        self.dim = self.experts[0].dim

    def linears(self) -> list[Linear]:
        return [x for expert in self.experts for x in expert.linears()]

    def block_linears(self) -> list[list[Linear]]:
        return [block for expert in self.experts for block in expert.block_linears()]

    def other_parameters(self) -> int:
        return sum(expert.other_parameters() for expert in self.experts)

    def image_tokens(self, frames: int, height: int, width: int) -> int:
        return self.experts[0].image_tokens(frames, height, width)

    def saved(self, tokens: Tokens, train: Training, checkpointing: bool) -> Saved:
        return self.experts[0].saved(tokens, train, checkpointing)

    def inference_peak(self, tokens: Tokens) -> Saved:
        return self.experts[0].inference_peak(tokens)

    def gradient_buffer(self, tokens: Tokens) -> int:
        return self.experts[0].gradient_buffer(tokens)
