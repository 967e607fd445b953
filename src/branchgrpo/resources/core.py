"""Building blocks of the estimate: linears, token counts, what is trained and in which
precision, and the walk's record of saved tensors and linear calls (FLOPs).

An architecture (:class:`branchgrpo.resources.flux.FluxArchitecture`) lists its linears with
diffusers' module names and walks its forward once per configuration, filling a :class:`Saved`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear``: ``stream`` is what its rows are: ``image``/``text`` tokens, ``all`` (the
    joint sequence) or ``sample`` (one row per sample: timestep and modulation vectors)."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    stream: str

    @property
    def parameters(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Tokens:
    """Sequence lengths of one sample: image (latent patch) tokens and text tokens."""

    image: int
    text: int

    @property
    def all(self) -> int:
        return self.image + self.text

    def rows(self, stream: str) -> int:
        return {"image": self.image, "text": self.text, "all": self.all, "sample": 1}[stream]


class Architecture(Protocol):
    """What the counting functions and ``branchgrpo plan`` need from an architecture."""

    dim: int  # the hidden size (attention FLOPs are ``4·L²·dim``)

    def linears(self) -> list[Linear]: ...

    def block_linears(self) -> list[list[Linear]]: ...

    def other_parameters(self) -> int: ...

    def saved(self, tokens: Tokens, train: "Training", checkpointing: bool) -> "Saved": ...

    def inference_peak(self, tokens: Tokens) -> "Saved": ...

    def gradient_buffer(self, tokens: Tokens) -> int: ...


@dataclass(frozen=True)
class Training:
    """What the optimizer trains (every weight, or peft LoRA adapters with ``lora_rank``) and the
    precision the forward runs in: ``compute_bytes`` 2 is bf16 autocast over float32 trainable
    tensors (``use_master_weights``); ``cuda``: CUDA autocast, whose LayerNorm and RMSNorm run in
    float32 (``torch._C._dispatch_has_kernel_for_dispatch_key("aten::layer_norm", "AutocastCUDA")``),
    so the tensors they keep are float32 and the modulated inputs they feed are float32 too."""

    lora_rank: int | None = None
    lora_targets: tuple[str, ...] | str = ()
    compute_bytes: int = 4
    cuda: bool = False

    @property
    def full(self) -> bool:
        return self.lora_rank is None

    @property
    def rank(self) -> int:
        return self.lora_rank or 0

    @property
    def low_precision(self) -> bool:
        return self.compute_bytes < 4

    @property
    def ln_bytes(self) -> int:
        return 4 if self.cuda or not self.low_precision else self.compute_bytes

    def lora(self, name: str) -> bool:
        """Whether peft puts an adapter on module ``name`` (``peft.tuners.tuners_utils``'
        ``check_target_module_exists``: a string is a full regex match, a list matches the whole
        name or a ``.``-separated suffix)."""
        if self.full:
            return False
        if isinstance(self.lora_targets, str):
            return re.fullmatch(self.lora_targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.lora_targets)

    def trains(self, name: str) -> bool:
        """Whether a gradient is computed for module ``name``'s weight or its adapter."""
        return self.full or self.lora(name)


@dataclass(frozen=True)
class LinearUse:
    """One linear in a forward: its rows per sample, whether its input needs a gradient, and
    whether its weight (``trained``) or an adapter on it (``lora``) is trained."""

    linear: Linear
    rows: int
    input_grad: bool
    trained: bool
    lora: bool
    live: bool = True


@dataclass
class Saved:
    """What one forward keeps for backward, in elements by storage class, and what it computes.

    Per sample: ``act`` in the compute dtype; ``ln``, LayerNorm inputs, outputs and statistics
    (float32 under CUDA autocast, the compute dtype otherwise); ``f32``, always float32 (RMSNorm's
    copies, attention's log-sum-exp). Per forward: ``shared_f32`` (the RoPE tables) and ``casts``,
    autocast's compute-dtype copies of float32 weights that backward needs. ``recompute``: under
    gradient checkpointing, the largest block's own set, alive while backward recomputes it.
    ``uses`` and ``attention`` record every linear and attention call, for the FLOP counts.
    """

    act: int = 0
    ln: int = 0
    f32: int = 0
    shared_f32: int = 0
    casts: int = 0
    recompute: "Saved | None" = None
    uses: list[LinearUse] = field(default_factory=list)
    attention: list[tuple[int, bool]] = field(default_factory=list)  # (tokens, needs a gradient) per block
    # cross-attention calls: (query rows, key/value rows, needs a gradient), e.g. Wan's image→text
    # (query rows, key/value rows, whether q needs a gradient, whether k and v do)
    cross_attention: list[tuple[int, int, bool, bool]] = field(default_factory=list)

    def add_flops(self, other: "Saved") -> None:
        self.uses += other.uses
        self.attention += other.attention
        self.cross_attention += other.cross_attention

    def add(self, other: "Saved") -> None:
        self.act += other.act
        self.ln += other.ln
        self.f32 += other.f32
        self.shared_f32 += other.shared_f32
        self.casts += other.casts

    def modulated(self, rows: int, dim: int, grad: bool, mod_grad: bool, products: int = 1) -> bool:
        """AdaLN ``LayerNorm(x)·(1 + scale) + shift`` without affine weights (FLUX.1/.2, Qwen-Image,
        SD3), ``products`` modulations of one normalised tensor; whether the result needs a gradient.
        ``grad``: x needs one; ``mod_grad``: scale and shift do."""
        if grad:  # the LayerNorm keeps its input and statistics, each product keeps its (1 + scale)
            self.ln += rows * dim + 2 * rows
            self.act += products * dim
        if mod_grad:  # the products keep the normalised tensor (one storage) for the gradient of scale
            self.ln += rows * dim
        return grad or mod_grad

    def linear_input(self, linear: Linear, tokens: Tokens, train: Training, input_grad: bool,
                     normed: bool = False, live: bool = True) -> None:
        """One linear reading its own input (see :meth:`shared_input`)."""
        self.shared_input([linear], tokens, train, input_grad, normed, live)

    def shared_input(self, linears: Sequence[Linear], tokens: Tokens, train: Training, input_grad: bool,
                     normed: bool = False, live: bool = True) -> None:
        """Linears reading one tensor. A trained one keeps the input for its weight gradient (once:
        the same storage) and, with LoRA, ``lora_B`` keeps ``lora_A``'s output. In low precision
        each keeps its own cast instead when it casts: float32 adapters cast their input (peft's
        ``_cast_input_dtype``, then autocast), and under CUDA autocast every linear reading a
        ``normed`` (float32, LayerNorm-modulated) input does. Autocast's casts of float32 weights
        are kept when a gradient flows to the input (``input_grad``) — for ``lora_B`` always.
        ``live``: whether the output reaches the model's output (backward skips dead branches)."""
        self.uses += [LinearUse(x, tokens.rows(x.stream), input_grad, train.trains(x.name), train.lora(x.name), live)
                      for x in linears]
        trained = [x for x in linears if train.trains(x.name)]
        if not trained:
            return
        rows = tokens.rows(trained[0].stream)
        copies = 1
        if train.low_precision and not train.full:
            copies = sum(train.lora(x.name) for x in trained)
        elif train.low_precision and normed and train.cuda:
            copies = len(trained)
        self.act += rows * trained[0].in_features * copies
        self.act += sum(rows * train.rank for x in trained if train.lora(x.name))
        if train.low_precision:
            for x in trained:
                if train.full:
                    self.casts += x.in_features * x.out_features if input_grad else 0
                else:
                    self.casts += train.rank * (x.out_features + (x.in_features if input_grad else 0))

    def bytes(self, batch: int, train: Training) -> int:
        """Bytes for a micro-batch of ``batch`` samples in ``train``'s precision."""
        return ((self.act * batch + self.casts) * train.compute_bytes
                + self.ln * batch * train.ln_bytes + (self.f32 * batch + self.shared_f32) * 4)


def autocast_weight_copies(arch: Architecture, train: Training, outside_blocks_only: bool = False) -> int:
    """Elements of the compute-dtype casts autocast makes of float32 trained weights (matrices:
    full weights, or LoRA ``A`` and ``B``). Autocast caches them for the whole forward and
    backward keeps them; with checkpointing, blocks recompute theirs, so only the casts
    ``outside_blocks_only`` stay saved. None without low precision."""
    if not train.low_precision:
        return 0
    inside = {x.name for block in arch.block_linears() for x in block}
    total = 0
    for x in arch.linears():
        if outside_blocks_only and x.name in inside:
            continue
        if train.full:
            total += x.in_features * x.out_features
        elif train.lora(x.name):
            total += train.rank * (x.in_features + x.out_features)
    return total


def forward_flops(trace: Saved, dim: int, rank: int = 0) -> int:
    """FLOPs of one sample's forward: ``2·rows·in·out`` per linear (plus ``2·rows·r·(in + out)``
    per LoRA adapter), ``4·L²·D`` per joint attention (``QKᵀ`` and ``AV``) and ``4·Lq·Lkv·D`` per
    cross-attention."""
    total = 0
    for use in trace.uses:
        x = use.linear
        total += 2 * use.rows * x.in_features * x.out_features
        if use.lora:
            total += 2 * use.rows * rank * (x.in_features + x.out_features)
    return (total + sum(4 * rows * rows * dim for rows, _ in trace.attention)
            + sum(4 * q * kv * dim for q, kv, *_ in trace.cross_attention))


def backward_flops(trace: Saved, dim: int, rank: int = 0) -> int:
    """FLOPs of one sample's backward, counting only the gradients autograd computes: a
    linear's input gradient when its input needs one, its weight gradient when trained (LoRA:
    ``A`` and ``B``'s), and attention's ``dQ, dK, dV`` (2× its forward; fused kernels also
    recompute ``QKᵀ``, which is not model work). Cross-attention counts each of its four
    products only where needed: ``dP = dO·Vᵀ`` when q or k needs a gradient, ``dQ`` when q does,
    ``dK`` and ``dV`` when k and v do (text states from a frozen projection need none)."""
    total = 0
    for use in (u for u in trace.uses if u.live):
        x, rows = use.linear, use.rows
        base = 2 * rows * x.in_features * x.out_features
        total += base if use.input_grad else 0
        total += base if use.trained and not use.lora else 0
        if use.lora:  # B: input and weight gradients; A: weight gradient and, when needed, input gradient
            total += 2 * (2 * rows * rank * x.out_features) + 2 * rows * x.in_features * rank
            total += 2 * rows * x.in_features * rank if use.input_grad else 0
    return (total + sum(8 * rows * rows * dim for rows, grad in trace.attention if grad)
            + sum(2 * q * kv * dim * (int(q_grad or kv_grad) + int(q_grad) + 2 * int(kv_grad))
                  for q, kv, q_grad, kv_grad in trace.cross_attention))


def parameter_count(arch: Architecture) -> int:
    """Parameters of the transformer (``sum(p.numel())`` of the diffusers model)."""
    return sum(x.parameters for x in arch.linears()) + arch.other_parameters()


def lora_parameter_count(arch: Architecture, train: Training) -> int:
    """Parameters peft adds: ``r·(in + out)`` per targeted linear (``lora_A``, ``lora_B``, no bias)."""
    return sum(train.rank * (x.in_features + x.out_features) for x in arch.linears() if train.lora(x.name))


