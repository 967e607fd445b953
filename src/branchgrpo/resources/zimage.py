"""Z-Image's transformer (diffusers ``ZImageTransformer2DModel``, Z-Image and Z-Image-Turbo): its
linears, FLOPs and the tensors its forward saves for backward, block by block.

Structure (``diffusers/models/transformers/transformer_z_image.py``): a timestep MLP (256 → 1024 →
``min(D, 256)``, no SiLU after it) whose output ``temb`` feeds every modulated block's one-linear
``adaLN_modulation`` (→ 4·D: scale and tanh gate for attention and MLP) and, through a SiLU, the
final layer's scale; a patch embedding (``all_x_embedder.2-1``) and a caption embedding (RMSNorm +
linear on the Qwen3 states). Image tokens go through ``n_refiner_layers`` modulated
``noise_refiner`` blocks, caption tokens through as many unmodulated ``context_refiner`` blocks;
the two are then concatenated ``[image; caption]`` for the ``n_layers`` main blocks and the final
layer (affine-free LayerNorm × scale, then a linear on every token; the caption rows are dropped
afterwards). Every block: RMSNorm → (× scale) → q/k/v (no biases, q/k RMSNorm per head, complex
RoPE in float32) → attention → ``to_out.0`` → RMSNorm → (× gate) residual; RMSNorm → (× scale) →
SwiGLU ``w2(silu(w1 x) · w3 x)`` (width ``int(D/3·8)``) → RMSNorm → (× gate) residual.

Both sequences are padded to a multiple of 32 tokens (``SEQ_MULTI_OF``): the pad rows get a
learned ``x_pad_token``/``cap_pad_token`` (``torch.where``, which keeps its boolean mask when a
gradient flows) and run through every block like real ones, so :class:`Tokens` counts the padded
lengths. The walk (:meth:`ZImageArchitecture.saved`) is checked byte for byte in float32 against
``torch.autograd.graph.saved_tensors_hooks`` on real tiny models by
``tests/resources/test_zimage_resources.py``, which also says which precisions are covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from branchgrpo.resources.core import Linear, Saved, Tokens, Training

SEQ_MULTI_OF = 32  # diffusers' transformer_z_image.SEQ_MULTI_OF: both sequences are padded to it
ADALN_EMBED_DIM = 256  # the modulation's input width is min(D, 256)

# Tongyi-MAI/Z-Image-Turbo, transformer/config.json, as diffusers 0.42's ZImageTransformer2DModel
# defaults (written for that checkpoint; the base Z-Image has the same transformer shape). Not read
# from the hub here (no network): the values are the class defaults, which the published config
# repeats to our knowledge; 6,154,908,736 parameters by parameter_count (tests check it against the
# diffusers class built on the meta device).
Z_IMAGE_TURBO: dict[str, Any] = {
    "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16,
    "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5,
    "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
}


def padded(n: int) -> int:
    """``n`` tokens rounded up to a multiple of 32, as ``ZImageTransformer2DModel`` pads each sequence."""
    return n + (-n) % SEQ_MULTI_OF


@dataclass
class ZSaved(Saved):
    """:class:`Saved` plus the one-byte boolean pad masks ``torch.where`` keeps (per sample)."""

    bool_bytes: int = 0

    def bytes(self, batch: int, train: Training) -> int:
        return super().bytes(batch, train) + self.bool_bytes * batch


@dataclass
class ZImageArchitecture:
    """``ZImageTransformer2DModel`` from its ``config.json`` (missing keys: diffusers' defaults),
    text-to-image (no SigLIP branch, the first patch size)."""

    config: dict[str, Any]

    def __post_init__(self) -> None:
        c = self.config
        self.dim = int(c.get("dim", 3840))
        self.heads = int(c.get("n_heads", 30))
        self.head_dim = self.dim // self.heads
        self.mlp = int(self.dim / 3 * 8)  # FeedForward's hidden_dim
        self.layers = int(c.get("n_layers", 30))
        self.refiners = int(c.get("n_refiner_layers", 2))
        self.in_channels = int(c.get("in_channels", 16))
        self.patch = int((c.get("all_patch_size") or [2])[0])
        self.f_patch = int((c.get("all_f_patch_size") or [1])[0])
        self.cap_dim = int(c.get("cap_feat_dim", 2560))
        self.adaln = min(self.dim, ADALN_EMBED_DIM)
        self.key = f"{self.patch}-{self.f_patch}"
        if c.get("siglip_feat_dim") is not None:
            raise ValueError("model config siglip_feat_dim: the estimate covers text-to-image Z-Image "
                             "(siglip_feat_dim null), not Z-Image-Omni")

    # -- structure ---------------------------------------------------------------------------
    def top_linears(self) -> list[Linear]:
        patch_in = self.f_patch * self.patch * self.patch * self.in_channels
        return [Linear("t_embedder.mlp.0", 256, 1024, True, "sample"),
                Linear("t_embedder.mlp.2", 1024, self.adaln, True, "sample"),
                Linear(f"all_x_embedder.{self.key}", patch_in, self.dim, True, "image"),
                Linear("cap_embedder.1", self.cap_dim, self.dim, True, "text")]

    def block_of(self, kind: str, i: int) -> list[Linear]:
        """``kind``: ``noise_refiner`` (image rows), ``context_refiner`` (text) or ``layers`` (all)."""
        d, f, p = self.dim, self.mlp, f"{kind}.{i}."
        stream = {"noise_refiner": "image", "context_refiner": "text", "layers": "all"}[kind]
        out = [Linear(p + f"attention.{n}", d, d, False, stream) for n in ("to_q", "to_k", "to_v", "to_out.0")]
        out += [Linear(p + "feed_forward.w1", d, f, False, stream), Linear(p + "feed_forward.w2", f, d, False, stream),
                Linear(p + "feed_forward.w3", d, f, False, stream)]
        if kind != "context_refiner":
            out.append(Linear(p + "adaLN_modulation.0", self.adaln, 4 * d, True, "sample"))
        return out

    def end_linears(self) -> list[Linear]:
        out = self.patch * self.patch * self.f_patch * self.in_channels
        return [Linear(f"all_final_layer.{self.key}.adaLN_modulation.1", self.adaln, self.dim, True, "sample"),
                Linear(f"all_final_layer.{self.key}.linear", self.dim, out, True, "all")]

    def block_linears(self) -> list[list[Linear]]:
        """The FSDP units: one list per ``ZImageTransformerBlock`` (refiners and main layers)."""
        return ([self.block_of("noise_refiner", i) for i in range(self.refiners)]
                + [self.block_of("context_refiner", i) for i in range(self.refiners)]
                + [self.block_of("layers", i) for i in range(self.layers)])

    def linears(self) -> list[Linear]:
        return self.top_linears() + [x for block in self.block_linears() for x in block] + self.end_linears()

    def other_parameters(self) -> int:
        """Per block four RMSNorm weights of width D and the q/k RMSNorms (head_dim each); the caption
        RMSNorm (``cap_feat_dim``); ``x_pad_token`` and ``cap_pad_token`` (D each)."""
        blocks = 2 * self.refiners + self.layers
        return blocks * (4 * self.dim + 2 * self.head_dim) + self.cap_dim + 2 * self.dim

    def image_tokens(self, height: int, width: int) -> int:
        """Latent ``H/8 × W/8`` cut into 2×2 patches, padded to a multiple of 32."""
        return padded((height // (8 * self.patch)) * (width // (8 * self.patch)))

    def inference_peak(self, tokens: Tokens) -> Saved:
        """What a no-grad forward of one sample holds at its peak, inside a main block's SwiGLU:
        the residual, the modulated input, ``w1`` and ``w3``'s outputs and their product
        ``[L, F]`` each (SiLU's output is freed into the product). Derived from the forward code,
        not measured (CPU kernels' workspace differs from CUDA's)."""
        rows = tokens.all
        return Saved(act=rows * (2 * self.dim + 3 * self.mlp))

    def gradient_buffer(self, tokens: Tokens) -> int:
        """Elements of the widest activation gradient in backward: the SwiGLU's ``[L, F]``."""
        return tokens.all * self.mlp

    # -- what autograd keeps for backward ----------------------------------------------------
    def saved(self, tokens: Tokens, train: Training, checkpointing: bool) -> ZSaved:
        """Tensors saved for backward by one forward of one sample (see :class:`Saved`)."""
        s = ZSaved()
        d = self.dim
        top = {x.name: x for x in self.top_linears()}
        first, second = top["t_embedder.mlp.0"], top["t_embedder.mlp.2"]
        s.linear_input(first, tokens, train, input_grad=False)
        if train.trains(first.name):
            s.act += 1024  # the SiLU keeps its input
        s.linear_input(second, tokens, train, input_grad=train.trains(first.name))
        temb_grad = train.trains(first.name) or train.trains(second.name)
        temb_kept = False  # temb's storage: kept by the SiLU before the final scale and by trained adaLN linears
        # patch and caption embeddings, then the pad token: where(mask, pad, x) keeps the mask
        x_emb, cap_emb = top[f"all_x_embedder.{self.key}"], top["cap_embedder.1"]
        s.linear_input(x_emb, tokens, train, input_grad=False)
        if train.full:  # the caption RMSNorm's weight: its output x·rstd (float32) for the weight gradient
            s.f32 += tokens.text * self.cap_dim
        s.linear_input(cap_emb, tokens, train, input_grad=train.full, normed=True)
        grad_img = train.trains(x_emb.name) or train.full  # pad tokens are parameters
        grad_txt = train.trains(cap_emb.name) or train.full
        if grad_img:
            s.bool_bytes += tokens.image
        if grad_txt:
            s.bool_bytes += tokens.text
        blocks: list[Saved] = []
        inputs = 0
        rope = {"image": False, "text": False, "all": False}
        for i in range(self.refiners):
            inputs += tokens.image * d
            block, grad_img, keeps_temb, qk = self._block("noise_refiner", i, tokens, train, grad_img, temb_grad)
            blocks.append(block)
            temb_kept |= keeps_temb
            rope["image"] |= qk
        for i in range(self.refiners):
            inputs += tokens.text * d
            block, grad_txt, _, qk = self._block("context_refiner", i, tokens, train, grad_txt, temb_grad)
            blocks.append(block)
            rope["text"] |= qk
        grad = grad_img or grad_txt
        for i in range(self.layers):
            inputs += tokens.all * d
            block, grad, keeps_temb, qk = self._block("layers", i, tokens, train, grad, temb_grad)
            blocks.append(block)
            temb_kept |= keeps_temb
            rope["all"] |= qk
        for block in blocks:
            s.add_flops(block)
            if not checkpointing:
                s.add(block)
        if checkpointing:  # each block keeps its tensor inputs, needed or not: the sequence, temb, its RoPE table
            s.act += inputs
            s.recompute = max(blocks, key=lambda b: b.act + b.ln + b.f32, default=None)
            temb_kept = temb_kept or self.refiners + self.layers > 0
            rope = {"image": self.refiners > 0, "text": self.refiners > 0, "all": self.layers > 0}
        # the RoPE tables [L, head_dim/2] complex64 per sample, kept by the q/k products
        s.f32 += sum(tokens.rows(k) * self.head_dim for k, used in rope.items() if used)
        # final layer: SiLU(temb) → linear → 1 + scale; LayerNorm(x) · scale → linear, on every token
        mod, proj = self.end_linears()
        if temb_grad:
            temb_kept = True  # the SiLU keeps its input
        s.linear_input(mod, tokens, train, input_grad=temb_grad)  # keeps the SiLU's output when trained
        mod_grad = temb_grad or train.trains(mod.name)
        if grad:  # LayerNorm keeps its input, mean and rstd; the product keeps (1 + scale)
            s.ln += tokens.all * d + 2 * tokens.all
            s.act += d
        if mod_grad:
            s.ln += tokens.all * d
        s.linear_input(proj, tokens, train, input_grad=grad or mod_grad, normed=True)
        if temb_kept:
            s.act += self.adaln
        return s

    def _rms(self, s: Saved, rows: int, width: int, groups: int, grad: bool, train: Training) -> bool:
        """``RMSNorm`` over ``width`` in ``groups`` per row: float32 input and ``1/rms`` when a
        gradient flows to the input, ``x·rstd`` for the weight's gradient in a full fine-tune."""
        if grad:
            s.f32 += rows * width * groups + rows * groups
        if train.full:
            s.f32 += rows * width * groups
        return grad or train.full

    def _block(self, kind: str, i: int, tokens: Tokens, train: Training, grad: bool,
               temb_grad: bool) -> tuple[Saved, bool, bool, bool]:
        """One ``ZImageTransformerBlock``: (its record, output needs a gradient, keeps temb,
        q or k needs a gradient: the RoPE table is kept)."""
        s, d, f = Saved(), self.dim, self.mlp
        lin = {x.name.split(".", 2)[2]: x for x in self.block_of(kind, i)}
        stream = {"noise_refiner": "image", "context_refiner": "text", "layers": "all"}[kind]
        rows = tokens.rows(stream)
        modulated = "adaLN_modulation.0" in lin
        mod_grad = keeps_temb = False
        if modulated:
            ada = lin["adaLN_modulation.0"]
            s.shared_input([ada], tokens, train, input_grad=temb_grad)
            s.act -= self.adaln if train.trains(ada.name) else 0  # temb: one storage, counted by the caller
            keeps_temb = train.trains(ada.name)
            mod_grad = temb_grad or train.trains(ada.name)
            if mod_grad:
                s.act += 2 * d  # tanh keeps its outputs, the gates (their products keep the same storages)

        def modulate(x_grad: bool) -> bool:
            """RMSNorm(x) (· scale): whether the result needs a gradient."""
            n_grad = self._rms(s, rows, d, 1, x_grad, train)
            if modulated:
                if mod_grad:
                    s.act += rows * d  # the product keeps the normalised tensor for scale's gradient
                if n_grad:
                    s.act += d  # and (1 + scale) for the input's
                return n_grad or mod_grad
            return n_grad

        def gated(out_grad: bool) -> bool:
            """RMSNorm(out) (· gate): whether the residual branch carries a gradient."""
            n_grad = self._rms(s, rows, d, 1, out_grad, train)
            if modulated and mod_grad:
                s.act += rows * d  # the product keeps the normalised branch for the gate's gradient
            if modulated and n_grad and not mod_grad:
                s.act += d  # and the gate for the branch's (with mod_grad tanh keeps that storage already)
            return n_grad or (modulated and mod_grad)

        h_grad = modulate(grad)
        qkv = [lin[f"attention.{n}"] for n in ("to_q", "to_k", "to_v")]
        s.shared_input(qkv, tokens, train, input_grad=h_grad)
        qk_grad = False
        for x in qkv[:2]:
            g = h_grad or train.trains(x.name)
            normed = self._rms(s, rows, self.head_dim, self.heads, g, train)
            qk_grad = qk_grad or normed
        v_grad = h_grad or train.trains(qkv[2].name)
        attn_grad = qk_grad or v_grad
        s.attention.append((rows, attn_grad))
        if attn_grad:  # roped q, k, v and the output [L, D]; log-sum-exp [H, L] in float32
            s.act += 3 * rows * d
            s.f32 += self.heads * rows
        out = lin["attention.to_out.0"]
        if attn_grad:
            s.act += rows * d  # the attention output (to_out.0's input, one storage)
            s.shared_input([out], tokens, train, input_grad=True)
            s.act -= rows * d if train.trains(out.name) else 0
        else:
            s.shared_input([out], tokens, train, input_grad=False)
        branch = gated(attn_grad or train.trains(out.name))
        x_grad = grad or branch
        h_grad = modulate(x_grad)
        w1, w2, w3 = (lin[f"feed_forward.w{k}"] for k in (1, 2, 3))
        s.shared_input([w1, w3], tokens, train, input_grad=h_grad)
        a1 = h_grad or train.trains(w1.name)
        a3 = h_grad or train.trains(w3.name)
        if a1:
            s.act += rows * f  # SiLU keeps its input
        if a3:
            s.act += rows * f  # the product keeps SiLU's output
        if a1:
            s.act += rows * f  # and w3's output
        prod = a1 or a3
        s.linear_input(w2, tokens, train, input_grad=prod)
        branch = gated(prod or train.trains(w2.name))
        return s, x_grad or branch, keeps_temb, qk_grad
