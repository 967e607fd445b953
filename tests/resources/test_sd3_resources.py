"""SD3.5's resource estimate (branchgrpo.resources.sd3) against diffusers' ``SD3Transformer2DModel``:
the parameter count on the meta device for SD3.5 Medium's config and on tiny real models (dual
attention blocks and q/k RMSNorm as SD3.5 Medium has them, and a plain SD3 without either); LoRA
counts against peft on the family's targets; on tiny random models, the tensors autograd saves for
backward (byte for byte, fp32 and bf16 autocast, LoRA and full, with and without checkpointing) and
forward/backward FLOPs against torch's FLOP counter. Mirrors tests/resources/test_flux2_resources.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from autograd_probe import SavedStorages

from branchgrpo.models.lora import LoraSpec, add_lora, default_target_modules
from branchgrpo.resources import Tokens, Training, backward_flops, forward_flops, lora_parameter_count, parameter_count
from branchgrpo.resources.sd3 import SD35_MEDIUM, SD3Architecture

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TINY = {
    "w16-3-dual0": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                        pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,),
                        qk_norm="rms_norm"),
    "w24-2-plain": dict(sample_size=8, patch_size=2, in_channels=8, num_layers=2, attention_head_dim=8,
                        num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24,
                        pooled_projection_dim=6, out_channels=8, pos_embed_max_size=16, dual_attention_layers=(),
                        qk_norm=None),
    "w16-2-dual01": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                         num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16,
                         pooled_projection_dim=6, out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0, 1),
                         qk_norm="rms_norm"),
}
SHAPES = [(2, 8, 8, 5), (3, 4, 12, 7)]  # (batch, latent height, latent width, text tokens)


def tiny_sd3(name: str, lora_rank: int | None = None, bf16_base: bool = False):
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**TINY[name])
    if bf16_base:  # the trainer's LoRA setup on a GPU: frozen base in bf16, fp32 adapters
        model.to(torch.bfloat16)
    if lora_rank:  # the sd3 family's targets (ModelFamily.lora_target_modules → default_target_modules)
        add_lora(model, LoraSpec(rank=lora_rank, target_modules=default_target_modules(model)))
    return model


def training(name: str, lora_rank: int | None, compute_bytes: int = 4) -> Training:
    if not lora_rank:
        return Training(None, (), compute_bytes=compute_bytes)
    return Training(lora_rank, tuple(default_target_modules(tiny_sd3(name))), compute_bytes=compute_bytes)


def tokens(name: str, height: int, width: int, text: int) -> Tokens:
    arch = SD3Architecture(TINY[name])
    return Tokens(arch.image_tokens(8 * height, 8 * width), text)


def forward(model, batch: int, height: int, width: int, text: int, bf16: bool = False):
    """The velocity call of ``SD3Velocity``: latents ``[B, C, H, W]``, T5+CLIP states, pooled CLIP, timestep."""
    c = model.config
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(
            hidden_states=torch.randn(batch, c.in_channels, height, width, generator=gen).to(dtype),
            encoder_hidden_states=torch.randn(batch, text, c.joint_attention_dim, generator=gen).to(dtype),
            pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=gen).to(dtype),
            timestep=(1000 * torch.rand(batch, generator=gen)).to(dtype), return_dict=False,
        )[0]


def measured_saved_bytes(model, batch: int, height: int, width: int, text: int, checkpointing: bool,
                         bf16: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters and buffers excluded)."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    with SavedStorages(model, buffers=True) as saved:
        forward(model, batch, height, width, text, bf16)
    return saved.bytes


def test_sd35_medium_parameter_count_equals_the_diffusers_class():
    """SD3.5 Medium's transformer built on the meta device from its config: 2,243,171,520 parameters."""
    with torch.device("meta"):  # allocates nothing
        model = diffusers.SD3Transformer2DModel(**{k: v for k, v in SD35_MEDIUM.items() if k[0] != "_"})
    assert parameter_count(SD3Architecture(dict(SD35_MEDIUM))) == sum(p.numel() for p in model.parameters())
    assert parameter_count(SD3Architecture(dict(SD35_MEDIUM))) == 2_243_171_520


@pytest.mark.parametrize("name", list(TINY))
def test_parameter_count_and_names_match_real_models(name):
    model = tiny_sd3(name)
    arch = SD3Architecture(TINY[name])
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())
    real = {n: (m.in_features, m.out_features, m.bias is not None)
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    real["pos_embed.proj"] = (model.pos_embed.proj.weight[0].numel(), model.pos_embed.proj.out_channels, True)
    assert {x.name: (x.in_features, x.out_features, x.bias) for x in arch.linears()} == real
    blocks = [x.name for block in arch.block_linears() for x in block]
    assert sorted(blocks) == sorted(n for n in real if n.startswith("transformer_blocks."))


@pytest.mark.parametrize("name", list(TINY))
def test_lora_counts_match_peft_on_the_family_targets(name):
    """Flow-GRPO's attention targets: the joint attention's eight projections, not ``attn2``'s."""
    model = tiny_sd3(name, lora_rank=3)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.element_size() == 4 for p in lora)
    assert not any("attn2" in n for n, _ in model.named_parameters() if "lora_" in n)
    assert lora_parameter_count(SD3Architecture(TINY[name]), training(name, 3)) == sum(p.numel() for p in lora)


CASES = list(itertools.product(TINY, SHAPES, [None, 4], [False, True]))


@pytest.mark.parametrize("name,shape,lora,checkpointing", CASES)
def test_saved_activations_match_autograd_exactly_in_fp32(name, shape, lora, checkpointing):
    model = tiny_sd3(name, lora)
    train = training(name, lora)
    estimate = SD3Architecture(TINY[name]).saved(tokens(name, *shape[1:]), train, checkpointing)
    assert estimate.bytes(shape[0], train) == measured_saved_bytes(model, *shape, checkpointing)


@pytest.mark.parametrize("name,shape,lora,checkpointing", CASES)
def test_saved_activations_match_autograd_exactly_under_bf16_autocast(name, shape, lora, checkpointing):
    """The trainer's mixed precision on CPU: fp32 masters (full) or a bf16 base with fp32 adapters
    (LoRA) under bf16 autocast; weight casts and per-adapter input casts included."""
    model = tiny_sd3(name, lora, bf16_base=lora is not None)
    train = training(name, lora, compute_bytes=2)
    estimate = SD3Architecture(TINY[name]).saved(tokens(name, *shape[1:]), train, checkpointing)
    assert estimate.bytes(shape[0], train) == measured_saved_bytes(model, *shape, checkpointing, bf16=True)


@pytest.mark.parametrize("name,lora", list(itertools.product(TINY, [None, 4])))
def test_flops_match_torch_flop_counter(name, lora):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    batch, height, width, text = 2, 8, 12, 5
    model = tiny_sd3(name, lora)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls the counter sees (QKᵀ, AV and their gradients)
        with FlopCounterMode(display=False) as counter:
            out = forward(model, batch, height, width, text)
        forward_counted = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.square().sum().backward()
        backward_counted = counter.get_total_flops()
    arch, train = SD3Architecture(TINY[name]), training(name, lora)
    trace = arch.saved(tokens(name, height, width, text), train, False)
    assert batch * forward_flops(trace, arch.dim, train.rank) == forward_counted
    assert batch * backward_flops(trace, arch.dim, train.rank) == backward_counted
    if not lora:
        assert forward_flops(trace, arch.dim) == arch.forward_flops(arch.image_tokens(64, 96), text)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("height,width,text", [(32, 32, 5), (32, 64, 7)])
def test_forward_flops_match_torch_flop_counter(name, height, width, text):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    config = TINY[name]
    model = diffusers.SD3Transformer2DModel(**config).eval()
    arch = SD3Architecture(config)
    x = torch.randn(1, arch.in_channels, height // 8, width // 8)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=x, encoder_hidden_states=torch.randn(1, text, arch.joint_dim),
              pooled_projections=torch.randn(1, arch.pooled_dim), timestep=torch.tensor([500]))
    image = arch.image_tokens(height, width)
    assert image == (height // 16) * (width // 16)
    assert counter.get_total_flops() == arch.forward_flops(image, text)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_buffer_is_the_widest_tensor_of_a_lora_backward(name, shape):
    """With LoRA (adapter gradients are narrow) the widest tensor any backward op makes is a
    feed-forward's ``[B·L, 4D]`` gradient, as :meth:`gradient_buffer` counts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    batch, height, width, text = shape
    out = forward(tiny_sd3(name, 4), batch, height, width, text)
    widest = Widest()
    with widest:
        out.square().sum().backward()
    assert widest.numel == batch * SD3Architecture(TINY[name]).gradient_buffer(tokens(name, height, width, text))


def test_plan_entry_reads_a_row_as_the_sd3_adapter_builds_it():
    """``plan``'s sd3 entry against what the family builds: image tokens are the transformer's own
    patches of ``SD3Adapter.latent_shape()`` (run through the tiny model's ``pos_embed``), text is
    CLIP's 77 tokens followed by ``max_sequence_length`` T5 tokens (``encode_prompt`` of diffusers'
    pipeline, which the adapter calls), the latent is ``latent_shape``'s, ``guidance_scale > 1``
    doubles the rows as ``SD3Velocity`` batches them, and the LoRA targets are the family's."""
    import math
    from types import SimpleNamespace

    from branchgrpo.families.sd3 import SD3Family
    from branchgrpo.models.sd3 import SD3Adapter, SD3Velocity
    from branchgrpo.resources.families import PLAN_FAMILIES

    entry, name = PLAN_FAMILIES["sd3"], "w24-2-plain"
    model, arch = tiny_sd3(name), SD3Architecture(TINY[name])
    options = {"height": 128, "width": 64, "max_sequence_length": 9}
    latent = SD3Adapter(transformer=model, height=128, width=64).latent_shape()  # (C, H/8, W/8)
    assert latent == (arch.in_channels, 16, 8)
    with torch.no_grad():
        patches = model.pos_embed(torch.zeros(1, *latent)).shape[1]
    assert entry.tokens(arch, options) == Tokens(patches, 77 + 9)
    assert entry.latent_elements(arch, options) == math.prod(latent)
    defaults = entry.tokens(SD3Architecture(dict(SD35_MEDIUM)), {})
    assert defaults == Tokens((512 // 16) ** 2, 77 + 128)
    # CFG rows: SD3Velocity calls the transformer once on [negative; positive] when guidance_scale > 1
    calls = []
    model.forward = lambda **kw: calls.append(kw["hidden_states"].shape[0]) or (kw["hidden_states"],)
    cond = {"prompt_embeds": torch.zeros(2, 3, arch.joint_dim), "pooled_prompt_embeds": torch.zeros(2, arch.pooled_dim)}
    cond.update({f"negative_{k}": v for k, v in cond.items()})
    for scale in (4.5, 1.0):
        SD3Velocity(model, guidance_scale=scale)(torch.zeros(2, *latent), torch.full((2,), 0.5), cond)
    assert calls == [2 * entry.rows_per_sample({"guidance_scale": 4.5}), 2 * entry.rows_per_sample({"guidance_scale": 1})]
    assert entry.rows_per_sample({}) == 2  # the family's default guidance 4.5
    bundle = SimpleNamespace(trainable=model)
    assert entry.lora_targets(arch) == tuple(SD3Family().lora_target_modules(bundle))


def test_plan_reads_the_sd35_medium_config():
    """configs/sd35-medium-flowgrpo.yaml at 512² with 128 T5 tokens: (512/16)² = 1024 image tokens and
    77 + 128 text tokens; the built-in SD3.5 Medium config when model.path holds none."""
    from branchgrpo.resources import estimate_job, transformer_config
    from branchgrpo.train.config import load_train_config

    config, source = transformer_config("sd3", "data/no-such-folder")
    assert config == SD35_MEDIUM and "built-in sd3.5-medium" in source
    job = estimate_job(load_train_config("configs/sd35-medium-flowgrpo.yaml", None, []), config, processes=1)
    assert job.parameters == 2_243_171_520 and (job.tokens.image, job.tokens.text) == (1024, 205)
