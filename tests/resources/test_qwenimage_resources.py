"""Qwen-Image's resource estimate (branchgrpo.resources.qwenimage) against diffusers'
``QwenImageTransformer2DModel``: the parameter count on the meta device for the hub config; on tiny
random models, the tensors autograd saves for backward (byte for byte, fp32 and bf16 autocast, LoRA
on the family's targets and full, with and without checkpointing, with and without a text mask and
a second image in the sequence as Qwen-Image-Edit's source) and forward/backward FLOPs against
torch's FLOP counter. Mirrors tests/test_resources.py (FLUX)."""

from __future__ import annotations

import itertools

import pytest
import torch

from autograd_probe import SavedStorages

from branchgrpo.families.qwenimage import QWENIMAGE_TARGET_MODULES
from branchgrpo.models.lora import LoraSpec, add_lora
from branchgrpo.resources import Training, backward_flops, forward_flops, lora_parameter_count, parameter_count
from branchgrpo.resources.qwenimage import QWEN_IMAGE, QwenImageArchitecture, QwenTokens

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TINY = {
    "w16-2": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4)),
    "w24-1": dict(patch_size=2, in_channels=32, out_channels=8, num_layers=1, attention_head_dim=8,
                  num_attention_heads=3, joint_attention_dim=20, axes_dims_rope=(2, 2, 4)),
}


@pytest.mark.parametrize("config", [QWEN_IMAGE, *TINY.values()], ids=["qwen-image", *TINY])
def test_parameter_count_equals_the_diffusers_class(config):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = diffusers.QwenImageTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert parameter_count(QwenImageArchitecture(dict(config))) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("height,width,text", [(32, 32, 5), (32, 64, 7)])
def test_forward_flops_match_torch_flop_counter(name, height, width, text):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(**TINY[name]).eval()
    arch = QwenImageArchitecture(TINY[name])
    image = arch.image_tokens(height, width)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=torch.randn(1, image, arch.in_channels),
              encoder_hidden_states=torch.randn(1, text, arch.joint_dim),
              encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.long), timestep=torch.tensor([0.5]),
              img_shapes=[(1, height // 16, width // 16)])
    assert counter.get_total_flops() == arch.forward_flops(image, text)


# (batch, packed grids of the image stream, text tokens): one image; an edit row's target + source
SHAPES = [(2, [(4, 4)], 5), (3, [(3, 4), (2, 3)], 7)]


def tiny_qwen(name: str, lora_rank: int | None = None, bf16_base: bool = False):
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(**TINY[name])
    if bf16_base:  # the trainer's LoRA setup on a GPU: frozen base in bf16, fp32 adapters
        model.to(torch.bfloat16)
    if lora_rank:
        add_lora(model, LoraSpec(rank=lora_rank, target_modules=list(QWENIMAGE_TARGET_MODULES)))
    return model


def training(lora_rank: int | None, compute_bytes: int = 4) -> Training:
    return Training(lora_rank, QWENIMAGE_TARGET_MODULES if lora_rank else (), compute_bytes=compute_bytes)


def forward(model, batch: int, grids, text: int, masked: bool, bf16: bool = False):
    """The adapter's call: packed latents (the grids' tokens in a row), Qwen2.5-VL states and their
    mask (row 0 padded in its last two tokens when ``masked``; None otherwise, as the adapter passes
    an all-ones mask), ``img_shapes`` per row."""
    c = model.config
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    mask = None
    if masked:
        mask = torch.ones(batch, text, dtype=torch.bool)
        mask[0, -2:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(
            hidden_states=torch.randn(batch, sum(h * w for h, w in grids), c.in_channels, generator=gen).to(dtype),
            encoder_hidden_states=torch.randn(batch, text, c.joint_attention_dim, generator=gen).to(dtype),
            encoder_hidden_states_mask=mask, timestep=torch.rand(batch, generator=gen).to(dtype),
            img_shapes=[[(1, h, w) for h, w in grids]] * batch, return_dict=False,
        )[0]


def measured_saved_bytes(model, batch: int, grids, text: int, masked: bool, checkpointing: bool,
                         bf16: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded). Under
    checkpointing the RoPE tables are held by the checkpoint as a non-tensor argument instead, and
    the bool text mask (one byte per text token, a block input) is kept: it is checked here and
    left out, as the estimate's element classes have no one-byte storage."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    with SavedStorages(model) as saved:
        hook = model.pos_embed.register_forward_hook(
            lambda m, i, out: [saved.pack(t) for t in out] if checkpointing else None)
        forward(model, batch, grids, text, masked, bf16)
        hook.remove()
    assert saved.bool_bytes == (batch * text if masked and checkpointing else 0)
    return saved.bytes - saved.bool_bytes


def _tokens(grids, text: int, masked: bool) -> QwenTokens:
    return QwenTokens(sum(h * w for h, w in grids), text, masked=masked)


CASES = list(itertools.product(TINY, SHAPES, [None, 4], [False, True], [False, True]))


@pytest.mark.parametrize("name,shape,lora,checkpointing,masked", CASES)
def test_saved_activations_match_autograd_exactly_in_fp32(name, shape, lora, checkpointing, masked):
    batch, grids, text = shape
    train = training(lora)
    estimate = QwenImageArchitecture(TINY[name]).saved(_tokens(grids, text, masked), train, checkpointing)
    measured = measured_saved_bytes(tiny_qwen(name, lora), batch, grids, text, masked, checkpointing)
    assert estimate.bytes(batch, train) == measured


@pytest.mark.parametrize("name,shape,lora,checkpointing,masked", CASES)
def test_saved_activations_match_autograd_exactly_under_bf16_autocast(name, shape, lora, checkpointing, masked):
    """The trainer's mixed precision on CPU: fp32 masters (full) or a bf16 base with fp32 adapters
    (LoRA) under bf16 autocast; weight casts, per-adapter input casts and RMSNorm's bf16 inputs included."""
    batch, grids, text = shape
    train = training(lora, compute_bytes=2)
    estimate = QwenImageArchitecture(TINY[name]).saved(_tokens(grids, text, masked), train, checkpointing)
    model = tiny_qwen(name, lora, bf16_base=lora is not None)
    assert estimate.bytes(batch, train) == measured_saved_bytes(model, batch, grids, text, masked, checkpointing,
                                                                bf16=True)


@pytest.mark.parametrize("edit", [False, True])
def test_the_adapters_true_cfg_call_is_two_masked_rows_per_sample(edit):
    """The real adapter call (QwenImageVelocity / QwenImageEditVelocity, guidance 4): one sample
    is a transformer batch of two rows ([negative; positive], the short negative padded, so a text
    mask), and for the edit model the source's packed tokens join each row's image stream; the
    saved tensors inside the transformer are ``saved(...).bytes(2)`` (what ``plan`` counts with 2
    rows per sample)."""
    from branchgrpo.models.qwenimage_edit import QwenImageEditVelocity
    from branchgrpo.models.qwenimage_transformer import QwenImageVelocity

    model, gen = tiny_qwen("w16-2", 4), torch.Generator().manual_seed(2)
    c, text = model.config, 5
    conditioning = {"prompt_embeds": torch.randn(1, text, c.joint_attention_dim, generator=gen),
                    "prompt_embeds_mask": torch.ones(1, text),
                    "negative_prompt_embeds": torch.randn(1, 3, c.joint_attention_dim, generator=gen),
                    "negative_prompt_embeds_mask": torch.ones(1, 3)}
    image = 4 * 4  # latent 8×8 → 4×4 packed tokens
    if edit:  # a source seen as a 2×3 packed grid
        conditioning |= {"image_latents": torch.randn(1, 6, c.in_channels, generator=gen),
                         "image_latent_shape": torch.tensor([[2.0, 3.0]])}
        image += 6
    policy = (QwenImageEditVelocity if edit else QwenImageVelocity)(model, 8, 8, guidance_scale=4.0)
    saved = SavedStorages(model)  # recording inside the transformer's call only, not the guidance around it
    model.register_forward_pre_hook(lambda *_: saved.__enter__() and None)  # None: the arguments stay
    model.register_forward_hook(lambda *_: saved.__exit__(None, None, None))
    policy(torch.randn(1, 16, c.in_channels, generator=gen), torch.tensor([0.5]), conditioning)
    train = training(4)
    row = QwenImageArchitecture(TINY["w16-2"]).saved(QwenTokens(image, text, masked=True), train, False)
    assert row.bytes(2, train) == saved.bytes


def test_plan_counts_qwen_images_rows_and_tokens():
    """``plan``'s reading of the two families: true CFG doubles every call's rows (guidance_scale
    > 1; 1 turns it off), Qwen-Image-Edit adds the source's tokens at ``condition_area`` (1024² →
    64×64 packed), the tree stores only the generated latent ``[(H/16)·(W/16), 64]``."""
    from branchgrpo.resources import estimate_job
    from branchgrpo.resources.families import PLAN_FAMILIES
    from branchgrpo.train.config import load_train_config

    arch = QwenImageArchitecture(QWEN_IMAGE)
    qwen, edit = PLAN_FAMILIES["qwenimage"], PLAN_FAMILIES["qwenimage-edit"]
    assert qwen.tokens(arch, {"height": 1328, "width": 1328}) == QwenTokens(83 * 83, 512, masked=True)
    assert qwen.tokens(arch, {"guidance_scale": 1.0, "max_sequence_length": 300}) == QwenTokens(83 * 83, 300)
    assert edit.tokens(arch, {"height": 1024, "width": 1024}) == QwenTokens(2 * 64 * 64, 1024, masked=True)
    # a 512×1024 output: its source at 1024² pixels with that aspect is 1440×736 (multiples of 32)
    assert edit.tokens(arch, {"height": 1024, "width": 512}).image == 64 * 32 + (1440 // 16) * (736 // 16)
    assert edit.latent_elements(arch, {}) == 64 * 64 * 64 and qwen.latent_elements(arch, {}) == 83 * 83 * 64
    assert [f.rows_per_sample({"guidance_scale": g}) for f in (qwen, edit) for g in (4.0, 1.0)] == [2, 1, 2, 1]
    config = load_train_config("configs/qwenimage-branchgrpo.yaml", None, [])
    off = load_train_config("configs/qwenimage-branchgrpo.yaml", None, ["model.options.guidance_scale=1.0"])
    on, plain = (estimate_job(x, QWEN_IMAGE, processes=8) for x in (config, off))
    assert on.parameters == 20_430_401_088
    assert {k: 2 * v for k, v in plain.forwards.items()} == on.forwards
    assert on.flops["forward_per_row"] == plain.flops["forward_per_row"] == arch.forward_flops(83 * 83, 512)


def test_lora_count_matches_peft_on_the_family_targets():
    model = tiny_qwen("w16-2", lora_rank=3)
    expected = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert expected > 0
    assert lora_parameter_count(QwenImageArchitecture(TINY["w16-2"]), training(3)) == expected


@pytest.mark.parametrize("name,lora,shape", list(itertools.product(TINY, [None, 4], SHAPES)))
def test_forward_and_backward_flops_match_torch_flop_counter(name, lora, shape):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    batch, grids, text = shape
    model = tiny_qwen(name, lora)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls the counter sees (QKᵀ, AV and their gradients)
        with FlopCounterMode(display=False) as counter:
            out = forward(model, batch, grids, text, masked=True)
        forward_counted = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.square().sum().backward()
        backward_counted = counter.get_total_flops()
    arch, train = QwenImageArchitecture(TINY[name]), training(lora)
    trace = arch.saved(_tokens(grids, text, True), train, False)
    assert batch * forward_flops(trace, arch.dim, train.rank) == forward_counted
    assert batch * backward_flops(trace, arch.dim, train.rank) == backward_counted
    image = sum(h * w for h, w in grids)  # the walk's linears agree with the closed form without adapters
    assert forward_flops(arch.saved(_tokens(grids, text, True), training(None), False), arch.dim) == \
        arch.forward_flops(image, text)


@pytest.mark.parametrize("name,shape", list(itertools.product(TINY, SHAPES)))
def test_gradient_buffer_is_the_widest_tensor_of_a_lora_backward(name, shape):
    """With LoRA (adapter gradients are narrow) the widest tensor any backward op makes is the
    image MLP's ``[B·L_image, 4D]`` activation gradient, as :meth:`gradient_buffer` counts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    batch, grids, text = shape
    out = forward(tiny_qwen(name, 4), batch, grids, text, masked=False)
    widest = Widest()
    with widest:
        out.square().sum().backward()
    tokens = _tokens(grids, text, False)
    assert widest.numel == batch * QwenImageArchitecture(TINY[name]).gradient_buffer(tokens)
