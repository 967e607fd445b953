"""FLUX.2's resource estimate (branchgrpo.resources.flux2) against diffusers'
``Flux2Transformer2DModel``: the parameter count on the meta device for FLUX.2 [dev]'s config and on
tiny real models; LoRA counts against peft on the family's targets; on tiny random models, the
tensors autograd saves for backward (byte for byte, fp32 and bf16 autocast, LoRA and full, with and
without checkpointing) and forward/backward FLOPs against torch's FLOP counter. Mirrors
tests/test_resources.py (FLUX.1)."""

from __future__ import annotations

import itertools

import pytest
import torch

from autograd_probe import SavedStorages

from branchgrpo.models.flux2 import flux2_lora_target_modules
from branchgrpo.models.lora import LoraSpec, add_lora
from branchgrpo.resources import Tokens, Training, backward_flops, forward_flops, lora_parameter_count, parameter_count
from branchgrpo.resources.flux2 import FLUX2_DEV, Flux2Architecture

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

# widths, depths (one without double, one without single blocks), guidance on/off, mlp ratios
TINY = {
    "w16-1x1-guidance": dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
                             in_channels=8, joint_attention_dim=12, timestep_guidance_channels=16, mlp_ratio=3.0,
                             axes_dims_rope=[2, 2, 2, 2], guidance_embeds=True),
    "w24-2x2": dict(num_attention_heads=3, attention_head_dim=8, num_layers=2, num_single_layers=2, in_channels=16,
                    out_channels=4, joint_attention_dim=20, timestep_guidance_channels=8, mlp_ratio=2.0,
                    axes_dims_rope=[2, 2, 2, 2], guidance_embeds=False),
    "w32-0x2-guidance": dict(num_attention_heads=2, attention_head_dim=16, num_layers=0, num_single_layers=2,
                             in_channels=4, joint_attention_dim=8, timestep_guidance_channels=8, mlp_ratio=3.0,
                             axes_dims_rope=[4, 4, 4, 4], guidance_embeds=True),
    "w16-2x0": dict(num_attention_heads=1, attention_head_dim=16, num_layers=2, num_single_layers=0, in_channels=4,
                    joint_attention_dim=8, timestep_guidance_channels=8, mlp_ratio=3.0, axes_dims_rope=[4, 4, 4, 4],
                    guidance_embeds=False),
}
SHAPES = [(2, 16, 5), (3, 12, 7)]  # (batch, image tokens, text tokens)


def tiny_flux2(name: str, lora_rank: int | None = None, bf16_base: bool = False):
    torch.manual_seed(0)
    model = diffusers.Flux2Transformer2DModel(**TINY[name])
    if bf16_base:  # the trainer's LoRA setup on a GPU: frozen base in bf16, fp32 adapters
        model.to(torch.bfloat16)
    if lora_rank:  # the flux2 family's targets (families/flux2.py lora_target_modules)
        add_lora(model, LoraSpec(rank=lora_rank, target_modules=flux2_lora_target_modules(model)))
    return model


def training(name: str, lora_rank: int | None, compute_bytes: int = 4) -> Training:
    if not lora_rank:
        return Training(None, (), compute_bytes=compute_bytes)
    targets = tuple(flux2_lora_target_modules(tiny_flux2(name)))
    return Training(lora_rank, targets, compute_bytes=compute_bytes)


def forward(model, batch: int, image: int, text: int, bf16: bool = False):
    """The velocity call of ``Flux2Velocity``: packed latents, text states, 4-axis position ids,
    the guidance embedding's input when the model has one."""
    c = model.config
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    img_ids = torch.zeros(image, 4)
    img_ids[:, 1] = torch.arange(image)
    txt_ids = torch.zeros(text, 4)
    txt_ids[:, 3] = torch.arange(text)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(
            hidden_states=torch.randn(batch, image, c.in_channels, generator=gen).to(dtype),
            encoder_hidden_states=torch.randn(batch, text, c.joint_attention_dim, generator=gen).to(dtype),
            timestep=torch.rand(batch, generator=gen).to(dtype), img_ids=img_ids, txt_ids=txt_ids,
            guidance=torch.full((batch,), 4.0, dtype=dtype) if c.guidance_embeds else None, return_dict=False,
        )[0]


def measured_saved_bytes(model, batch: int, image: int, text: int, checkpointing: bool, bf16: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded). Under
    checkpointing the RoPE tables reach the blocks inside a tuple, a non-tensor argument the
    checkpoint holds itself: they are packed here from the first block's arguments."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    first = (model.transformer_blocks or model.single_transformer_blocks)[0]
    rope_at = 4 if len(model.transformer_blocks) else 3  # position of image_rotary_emb in the block's call
    with SavedStorages(model) as saved:

        def hold_rope(module, args) -> None:  # a pre-hook that returned a value would replace the arguments
            if checkpointing:
                for t in args[rope_at]:
                    saved.pack(t)

        hook = first.register_forward_pre_hook(hold_rope)
        forward(model, batch, image, text, bf16)
        hook.remove()
    return saved.bytes


def test_flux2_dev_parameter_count_equals_the_diffusers_class():
    """FLUX.2 [dev]'s transformer built on the meta device from its config: 32.2 B parameters."""
    with torch.device("meta"):  # allocates nothing
        model = diffusers.Flux2Transformer2DModel(**{k: v for k, v in FLUX2_DEV.items() if k[0] != "_"})
    assert parameter_count(Flux2Architecture(dict(FLUX2_DEV))) == sum(p.numel() for p in model.parameters())
    assert parameter_count(Flux2Architecture(dict(FLUX2_DEV))) == 32_223_281_152


@pytest.mark.parametrize("name", list(TINY))
def test_parameter_count_and_names_match_real_models(name):
    model = tiny_flux2(name)
    arch = Flux2Architecture(TINY[name])
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())
    real = {n: (m.in_features, m.out_features, m.bias is not None)
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {x.name: (x.in_features, x.out_features, x.bias) for x in arch.linears()} == real
    blocks = [x.name for block in arch.block_linears() for x in block]
    assert sorted(blocks) == sorted(n for n in real if "transformer_blocks." in n)


@pytest.mark.parametrize("name", list(TINY))
def test_lora_counts_match_peft_on_the_family_targets(name):
    model = tiny_flux2(name, lora_rank=3)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.element_size() == 4 for p in lora)
    assert lora_parameter_count(Flux2Architecture(TINY[name]), training(name, 3)) == sum(p.numel() for p in lora)


CASES = list(itertools.product(TINY, SHAPES, [None, 4], [False, True]))


@pytest.mark.parametrize("name,shape,lora,checkpointing", CASES)
def test_saved_activations_match_autograd_exactly_in_fp32(name, shape, lora, checkpointing):
    model = tiny_flux2(name, lora)
    train = training(name, lora)
    estimate = Flux2Architecture(TINY[name]).saved(Tokens(*shape[1:]), train, checkpointing)
    assert estimate.bytes(shape[0], train) == measured_saved_bytes(model, *shape, checkpointing)


@pytest.mark.parametrize("name,shape,lora,checkpointing", CASES)
def test_saved_activations_match_autograd_exactly_under_bf16_autocast(name, shape, lora, checkpointing):
    """The trainer's mixed precision on CPU: fp32 masters (full) or a bf16 base with fp32 adapters
    (LoRA) under bf16 autocast; weight casts and per-adapter input casts included."""
    batch, image, text = shape
    model = tiny_flux2(name, lora, bf16_base=lora is not None)
    train = training(name, lora, compute_bytes=2)
    estimate = Flux2Architecture(TINY[name]).saved(Tokens(image, text), train, checkpointing)
    assert estimate.bytes(batch, train) == measured_saved_bytes(model, batch, image, text, checkpointing, bf16=True)


@pytest.mark.parametrize("name,lora", list(itertools.product(TINY, [None, 4])))
def test_flops_match_torch_flop_counter(name, lora):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    batch, image, text = 2, 16, 5
    model = tiny_flux2(name, lora)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls the counter sees (QKᵀ, AV and their gradients)
        with FlopCounterMode(display=False) as counter:
            out = forward(model, batch, image, text)
        forward_counted = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.square().sum().backward()
        backward_counted = counter.get_total_flops()
    arch, train = Flux2Architecture(TINY[name]), training(name, lora)
    trace = arch.saved(Tokens(image, text), train, False)
    assert batch * forward_flops(trace, arch.dim, train.rank) == forward_counted
    assert batch * backward_flops(trace, arch.dim, train.rank) == backward_counted


@pytest.mark.parametrize("name", list(TINY))
def test_plan_entry_uses_the_family_lora_targets(name):
    """``plan``'s flux2 entry names the targets the trainer puts adapters on (the family's
    ``lora_target_modules`` on the built transformer), so its LoRA count is peft's."""
    from branchgrpo.resources.families import PLAN_FAMILIES

    model, arch = tiny_flux2(name), Flux2Architecture(TINY[name])
    targets = PLAN_FAMILIES["flux2"].lora_targets(arch)
    assert targets == tuple(flux2_lora_target_modules(model))
    assert lora_parameter_count(arch, Training(3, targets)) == sum(
        p.numel() for n, p in tiny_flux2(name, lora_rank=3).named_parameters() if "lora_" in n)


def test_plan_entry_reads_the_flux2_config():
    """configs/flux2-dev-branchgrpo.yaml at 1024² with 512 Mistral tokens: (1024/16)² = 4096 image
    tokens of 128 channels; one row per sample (guidance-distilled); the built-in FLUX.2 [dev] config."""
    from branchgrpo.resources import estimate_job, transformer_config
    from branchgrpo.resources.families import PLAN_FAMILIES
    from branchgrpo.train.config import load_train_config

    entry, arch = PLAN_FAMILIES["flux2"], Flux2Architecture(dict(FLUX2_DEV))
    options = {"height": 1024, "width": 768, "max_sequence_length": 300}
    assert entry.tokens(arch, options) == Tokens(64 * 48, 300) and entry.latent_elements(arch, options) == 64 * 48 * 128
    assert entry.tokens(arch, {}) == Tokens(4096, 512) and entry.rows_per_sample(options) == 1
    config, source = transformer_config("flux2", "data/no-such-folder")
    assert config == FLUX2_DEV and "built-in flux2-dev" in source
    job = estimate_job(load_train_config("configs/flux2-dev-branchgrpo.yaml", None, []), config, processes=8)
    assert job.parameters == 32_223_281_152 and (job.tokens.image, job.tokens.text) == (4096, 512)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_buffer_is_the_widest_tensor_of_a_lora_backward(name, shape):
    """With LoRA (adapter gradients are narrow) the widest tensor any backward op makes is the
    single block's fused projection gradient ``[B·L, 3D + 2F]`` (without single blocks: the
    SwiGLU input's ``[B·L_image, 2F]``), as :meth:`gradient_buffer` counts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    batch, image, text = shape
    out = forward(tiny_flux2(name, 4), batch, image, text)
    widest = Widest()
    with widest:
        out.square().sum().backward()
    assert widest.numel == batch * Flux2Architecture(TINY[name]).gradient_buffer(Tokens(image, text))
