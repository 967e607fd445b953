"""Wan's resource estimate (branchgrpo.resources.wan) against diffusers' ``WanTransformer3DModel``:
parameters on the meta device for the hub config; on tiny random models, the tensors autograd
saves for backward (``saved_tensors_hooks``) and torch's FLOP counter, as the trainer runs them
(float32, or bf16 autocast over float32 masters / a bf16 base loaded as diffusers loads it; the
family's LoRA targets or a full fine-tune; with and without gradient checkpointing)."""

from __future__ import annotations

import itertools

import pytest
import torch

from autograd_probe import SavedStorages

from branchgrpo.models.lora import WAN_TARGET_MODULES, LoraSpec, add_lora
from branchgrpo.resources import (
    Tokens, Training, backward_flops, forward_flops, lora_parameter_count, parameter_count,
)
from branchgrpo.resources.wan import (
    WAN21_T2V_1_3B, WAN22_T2V_A14B_EXPERT, WAN22_TI2V_5B, WanArchitecture, WanExpertsArchitecture,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TINY = {
    "w16-1": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                  text_dim=12, freq_dim=16, ffn_dim=40, num_layers=1, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    "w24-2-nonorm": dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=8, in_channels=8,
                         out_channels=4, text_dim=20, freq_dim=32, ffn_dim=56, num_layers=2, cross_attn_norm=False,
                         qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
}


def _meta_count(config: dict) -> int:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = diffusers.WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [WAN21_T2V_1_3B, WAN22_T2V_A14B_EXPERT, WAN22_TI2V_5B, *TINY.values()],
                         ids=["wan2.1-1.3b", "wan2.2-a14b-expert", "wan2.2-ti2v-5b", *TINY])
def test_parameter_count_equals_the_diffusers_class(config):
    assert parameter_count(WanArchitecture(dict(config))) == _meta_count(config)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("frames,height,width,text", [(1, 32, 32, 5), (5, 32, 48, 7)])
def test_forward_flops_match_torch_flop_counter(name, frames, height, width, text):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY[name]).eval()
    arch = WanArchitecture(TINY[name])
    latent_frames = (frames - 1) // 4 + 1
    x = torch.randn(1, arch.in_channels, latent_frames, height // 8, width // 8)
    # the math backend: attention as matmuls the counter sees (QKᵀ, AV)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, text, arch.text_dim))
    image = arch.image_tokens(frames, height, width)
    assert image == latent_frames * (height // 16) * (width // 16)
    assert counter.get_total_flops() == arch.forward_flops(image, text)


# (batch, latent frames, latent height, latent width, text tokens): image tokens F·H·W/4
SHAPES = [(2, 2, 4, 10, 7), (3, 1, 6, 4, 5)]


def tiny_wan(name: str, lora_rank: int | None, bf16_base: bool, tmp_path) -> torch.nn.Module:
    """The trainer's setup: every weight trained (float32 masters), or a LoRA base loaded in bf16
    by diffusers (its ``_keep_in_fp32_modules`` stay float32) with float32 adapters on the wan
    family's targets (``WAN_TARGET_MODULES``)."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY[name])
    if bf16_base:
        model.save_pretrained(tmp_path / name)
        model = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / name, torch_dtype=torch.bfloat16)
    if lora_rank:
        add_lora(model, LoraSpec(rank=lora_rank, target_modules=list(WAN_TARGET_MODULES)))
    else:
        model.requires_grad_(True)
    return model


def training(lora_rank: int | None, compute_bytes: int = 4) -> Training:
    return Training(lora_rank, WAN_TARGET_MODULES if lora_rank else (), compute_bytes=compute_bytes)


def forward(model, batch: int, frames: int, height: int, width: int, text: int, bf16: bool = False,
            per_token: bool = False):
    """As ``GuidedVelocity`` calls it: inputs in the base weights' dtype, autocast around the call;
    ``per_token``: one timestep per latent token ``[B, L]`` (TI2V-5B's ``expand_timesteps``)."""
    c = model.config
    gen = torch.Generator().manual_seed(1)
    dtype = next(p for n, p in model.named_parameters() if "lora_" not in n).dtype
    steps = (batch, frames * height * width // 4) if per_token else (batch,)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(hidden_states=torch.randn(batch, c.in_channels, frames, height, width, generator=gen).to(dtype),
                     timestep=1000 * torch.rand(*steps, generator=gen),
                     encoder_hidden_states=torch.randn(batch, text, c.text_dim, generator=gen).to(dtype),
                     return_dict=False)[0]


def measured_saved_bytes(model, shape, checkpointing: bool, bf16: bool = False, per_token: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded). Under
    checkpointing the RoPE tables are held by the checkpoint as a non-tensor argument instead."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    with SavedStorages(model) as saved:
        hook = model.rope.register_forward_hook(lambda m, i, out: [saved.pack(t) for t in out] if checkpointing else None)
        forward(model, *shape, bf16=bf16, per_token=per_token)
        hook.remove()
    return saved.bytes


def _tokens(shape) -> Tokens:
    _, frames, height, width, text = shape
    return Tokens(frames * height * width // 4, text)


@pytest.mark.parametrize("name,shape,lora,checkpointing",
                         list(itertools.product(TINY, SHAPES, [None, 4], [False, True])))
def test_saved_activations_match_autograd_exactly_in_fp32(name, shape, lora, checkpointing, tmp_path):
    train = training(lora)
    estimate = WanArchitecture(TINY[name]).saved(_tokens(shape), train, checkpointing)
    model = tiny_wan(name, lora, False, tmp_path)
    assert estimate.bytes(shape[0], train) == measured_saved_bytes(model, shape, checkpointing)


@pytest.mark.parametrize("name,shape,lora,checkpointing",
                         list(itertools.product(TINY, SHAPES, [None, 4], [False, True])))
def test_saved_activations_match_autograd_exactly_under_bf16_autocast(name, shape, lora, checkpointing, tmp_path):
    """bf16 autocast over float32 masters (full) or a bf16 base with float32 adapters (LoRA):
    the float32 LayerNorms, modulation and RMSNorm copies, weight casts and per-adapter input casts."""
    train = training(lora, compute_bytes=2)
    estimate = WanArchitecture(TINY[name]).saved(_tokens(shape), train, checkpointing)
    model = tiny_wan(name, lora, lora is not None, tmp_path)
    assert estimate.bytes(shape[0], train) == measured_saved_bytes(model, shape, checkpointing, bf16=True)


def test_checkpointing_keeps_less_and_recomputes_one_block():
    arch, train = WanArchitecture(WAN21_T2V_1_3B), training(None, compute_bytes=2)
    tokens = Tokens(arch.image_tokens(33, 480, 832), 512)
    plain, checkpointed = arch.saved(tokens, train, False), arch.saved(tokens, train, True)
    assert tokens.image == 9 * 30 * 52
    assert checkpointed.bytes(1, train) < plain.bytes(1, train) / 10
    assert checkpointed.recompute is not None and plain.recompute is None
    assert 30 * checkpointed.recompute.act < plain.act  # one block of 30, less the text states kept once


@pytest.mark.parametrize("name,lora", list(itertools.product(TINY, [None, 4])))
def test_training_flops_match_torch_flop_counter(name, lora, tmp_path):
    """Forward and backward FLOPs, cross-attention (image→text) included, against FlopCounterMode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    shape = SHAPES[0]
    model = tiny_wan(name, lora, False, tmp_path)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls the counter sees (QKᵀ, AV and their gradients)
        with FlopCounterMode(display=False) as counter:
            out = forward(model, *shape)
        forward_counted = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.square().sum().backward()
        backward_counted = counter.get_total_flops()
    arch, train = WanArchitecture(TINY[name]), training(lora)
    trace = arch.saved(_tokens(shape), train, False)
    assert len(trace.cross_attention) == arch.layers
    assert shape[0] * forward_flops(trace, arch.dim, train.rank) == forward_counted
    assert shape[0] * backward_flops(trace, arch.dim, train.rank) == backward_counted
    if lora is None:
        assert forward_flops(trace, arch.dim) == arch.forward_flops(_tokens(shape).image, _tokens(shape).text)


@pytest.mark.parametrize("name", TINY)
def test_two_experts_count_both_and_save_one(name, tmp_path):
    """Wan2.2-T2V-A14B's ``WanExperts``: parameters and LoRA adapters of both experts (peft's count
    through ``add_lora`` on the experts module); a row runs one expert, so what it saves for
    backward is one expert's, measured on that expert inside the module."""
    from branchgrpo.models.wan22_experts import WanExperts

    experts = WanExperts(tiny_wan(name, None, True, tmp_path), tiny_wan(name, None, True, tmp_path))
    arch = WanExpertsArchitecture(TINY[name])
    assert parameter_count(arch) == sum(p.numel() for p in experts.parameters()) == 2 * _meta_count(TINY[name])
    add_lora(experts, LoraSpec(rank=4, target_modules=list(WAN_TARGET_MODULES)))
    train = training(4, compute_bytes=2)
    lora = [p for n, p in experts.named_parameters() if "lora_" in n]
    assert {n.split(".")[0] for n, p in experts.named_parameters() if "lora_" in n} == {"transformer", "transformer_2"}
    assert lora_parameter_count(arch, train) == sum(p.numel() for p in lora) > 0
    shape = SHAPES[0]
    estimate = arch.saved(_tokens(shape), train, False)
    assert estimate.bytes(shape[0], train) == measured_saved_bytes(experts.transformer_2, shape, False, bf16=True)


@pytest.mark.parametrize("name,lora,bf16,checkpointing",
                         list(itertools.product(TINY, [None, 4], [False, True], [False, True])))
def test_per_token_timesteps_saved_activations_match_autograd_exactly(name, lora, bf16, checkpointing, tmp_path):
    """TI2V-5B's pipeline gives every latent token its own timestep: the timestep MLP runs on every
    token and each block keeps ``[L, 6·D]`` float32 modulation vectors."""
    shape, train = SHAPES[0], training(lora, compute_bytes=2 if bf16 else 4)
    arch = WanArchitecture(TINY[name], per_token_timesteps=True)
    estimate = arch.saved(_tokens(shape), train, checkpointing)
    model = tiny_wan(name, lora, bf16 and lora is not None, tmp_path)
    assert estimate.bytes(shape[0], train) == measured_saved_bytes(model, shape, checkpointing, bf16, per_token=True)
    per_sample = WanArchitecture(TINY[name]).saved(_tokens(shape), train, checkpointing)
    assert estimate.bytes(1, train) > per_sample.bytes(1, train)


@pytest.mark.parametrize("name,lora", list(itertools.product(TINY, [None, 4])))
def test_per_token_timesteps_flops_match_torch_flop_counter(name, lora, tmp_path):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    shape = SHAPES[1]
    model = tiny_wan(name, lora, False, tmp_path)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            out = forward(model, *shape, per_token=True)
        forward_counted = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.square().sum().backward()
        backward_counted = counter.get_total_flops()
    arch, train = WanArchitecture(TINY[name], per_token_timesteps=True), training(lora)
    trace = arch.saved(_tokens(shape), train, False)
    assert shape[0] * forward_flops(trace, arch.dim, train.rank) == forward_counted
    assert shape[0] * backward_flops(trace, arch.dim, train.rank) == backward_counted


@pytest.mark.parametrize("options", [{}, {"height": 256, "width": 512, "num_frames": 1, "guidance_scale": 1.0},
                                     {"height": 720, "width": 1280, "num_frames": 81, "max_sequence_length": 226}])
def test_plan_reads_a_wan_row_as_the_adapter_builds_it(options):
    """``plan``'s wan entry against the real adapter: image tokens are the latent ``(F', H, W)`` cut
    into ``(1, 2, 2)`` patches, the stored latent is ``latent_shape``, and a call has 2 rows per
    sample exactly when the velocity runs CFG (``uses_cfg``); the family's defaults where unset."""
    import math

    from branchgrpo.families.wan import WanOptions
    from branchgrpo.models.wan import WanAdapter, WanVelocity
    from branchgrpo.resources.families import PLAN_FAMILIES

    entry = PLAN_FAMILIES["wan"]
    arch = entry.architecture(dict(entry.hub_config))
    settings = {**WanOptions().__dict__, **options}
    adapter = WanAdapter(height=settings["height"], width=settings["width"], num_frames=settings["num_frames"],
                         guidance_scale=settings["guidance_scale"])
    frames, height, width = adapter.latent_size()
    tokens = entry.tokens(arch, options)
    assert tokens.image == frames * (height // 2) * (width // 2)
    assert tokens.text == settings["max_sequence_length"]
    assert entry.latent_elements(arch, options) == math.prod(adapter.latent_shape())
    velocity = WanVelocity(torch.nn.Identity(), **adapter._velocity_options(None, None))  # what velocity_model builds
    assert entry.rows_per_sample(options) == (2 if velocity.uses_cfg else 1)
