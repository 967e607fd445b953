"""Z-Image's resource estimate (branchgrpo.resources.zimage) against diffusers'
``ZImageTransformer2DModel``: the parameter count on the meta device for Z-Image-Turbo's config and
on tiny real models; LoRA counts against peft on the family's targets; on tiny random models, the
tensors autograd saves for backward (byte for byte in float32, LoRA and full, with and without
checkpointing) and forward/backward FLOPs against torch's FLOP counter; plan's zimage entry against
the adapter's own row. The model is called as ``ZImageVelocity`` calls it: one ``[C, 1, h, w]``
latent and one unpadded caption ``[L, D]`` per row. Caption lengths here are multiples of 32: for
other lengths the transformer's caption RoPE table gets ``32·⌈L/32⌉ − L`` extra rows (its
``_pad_with_ids`` pads the already padded grid again), which a count in padded tokens cannot know;
the plan's upper bound, ``max_sequence_length`` = 512, is a multiple of 32."""

from __future__ import annotations

import itertools

import pytest
import torch

from autograd_probe import SavedStorages

from branchgrpo.models.lora import LoraSpec, add_lora
from branchgrpo.models.zimage import ZIMAGE_TARGET_MODULES
from branchgrpo.resources import Tokens, Training, backward_flops, forward_flops, lora_parameter_count, parameter_count
from branchgrpo.resources.zimage import Z_IMAGE_TURBO, ZImageArchitecture, padded

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

# widths, refiner/main depths, patch input widths; head_dim = sum(axes_dims)
TINY = {
    "w32-r1-l2": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
                      n_heads=2, n_kv_heads=2, cap_feat_dim=12, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32]),
    "w48-r2-l1": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=8, dim=48, n_layers=1, n_refiner_layers=2,
                      n_heads=3, n_kv_heads=3, cap_feat_dim=20, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32]),
}
SHAPES = [(1, 8, 8, 32), (2, 8, 16, 64)]  # (batch, latent h, latent w, caption tokens): 16 and 32 image tokens


def tiny_zimage(name: str, lora_rank: int | None = None):
    torch.manual_seed(0)
    model = diffusers.ZImageTransformer2DModel(**TINY[name])
    if lora_rank:  # the zimage family's targets (families/zimage.py lora_target_modules)
        add_lora(model, LoraSpec(rank=lora_rank, target_modules=list(ZIMAGE_TARGET_MODULES)))
    return model


def training(lora_rank: int | None) -> Training:
    return Training(lora_rank, tuple(ZIMAGE_TARGET_MODULES) if lora_rank else ())


def tokens(h: int, w: int, text: int) -> Tokens:
    return Tokens(padded(h * w // 4), padded(text))


def forward(model, batch: int, h: int, w: int, text: int):
    c = model.config
    gen = torch.Generator().manual_seed(1)
    latents = [torch.randn(c.in_channels, 1, h, w, generator=gen) for _ in range(batch)]
    captions = [torch.randn(text, c.cap_feat_dim, generator=gen) for _ in range(batch)]
    out = model(latents, torch.rand(batch, generator=gen), captions, return_dict=False)[0]
    return torch.stack(out)


def measured_saved_bytes(model, batch: int, h: int, w: int, text: int, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    with SavedStorages(model) as saved:
        forward(model, batch, h, w, text)
    return saved.bytes


def test_z_image_turbo_parameter_count_equals_the_diffusers_class():
    """Z-Image-Turbo's transformer built on the meta device from the built-in config: 6.15 B parameters."""
    with torch.device("meta"):
        model = diffusers.ZImageTransformer2DModel(**{k: v for k, v in Z_IMAGE_TURBO.items() if k[0] != "_"})
    count = sum(p.numel() for p in model.parameters())
    assert parameter_count(ZImageArchitecture(dict(Z_IMAGE_TURBO))) == count == 6_154_908_736


@pytest.mark.parametrize("name", list(TINY))
def test_parameter_count_and_names_match_real_models(name):
    model, arch = tiny_zimage(name), ZImageArchitecture(TINY[name])
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())
    real = {n: (m.in_features, m.out_features, m.bias is not None)
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {x.name: (x.in_features, x.out_features, x.bias) for x in arch.linears()} == real
    blocks = [x.name for block in arch.block_linears() for x in block]
    assert sorted(blocks) == sorted(n for n in real if n.split(".")[0] in ("noise_refiner", "context_refiner", "layers"))


@pytest.mark.parametrize("name", list(TINY))
def test_lora_counts_match_peft_on_the_family_targets(name):
    lora = [p for n, p in tiny_zimage(name, lora_rank=3).named_parameters() if "lora_" in n]
    assert lora and lora_parameter_count(ZImageArchitecture(TINY[name]), training(3)) == sum(p.numel() for p in lora)


CASES = list(itertools.product(TINY, SHAPES, [None, 4], [False, True]))


@pytest.mark.parametrize("name,shape,lora,checkpointing", CASES)
def test_saved_activations_match_autograd_exactly_in_fp32(name, shape, lora, checkpointing):
    batch, h, w, text = shape
    train = training(lora)
    estimate = ZImageArchitecture(TINY[name]).saved(tokens(h, w, text), train, checkpointing)
    assert estimate.bytes(batch, train) == measured_saved_bytes(tiny_zimage(name, lora), batch, h, w, text,
                                                                checkpointing)


@pytest.mark.parametrize("name,lora", list(itertools.product(TINY, [None, 4])))
def test_flops_match_torch_flop_counter(name, lora):
    """Every token the transformer runs is counted, the 32-multiple padding rows included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    batch, h, w, text = 2, 8, 8, 32
    model = tiny_zimage(name, lora)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            out = forward(model, batch, h, w, text)
        forward_counted = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.square().sum().backward()
        backward_counted = counter.get_total_flops()
    arch, train = ZImageArchitecture(TINY[name]), training(lora)
    trace = arch.saved(tokens(h, w, text), train, False)
    assert batch * forward_flops(trace, arch.dim, train.rank) == forward_counted
    assert batch * backward_flops(trace, arch.dim, train.rank) == backward_counted


def test_plan_entry_reads_a_row_as_the_adapter_builds_it():
    """``ZImageVelocity`` passes one latent ``[16, H/8, W/8]`` and one unpadded caption per row;
    the transformer pads each to a multiple of 32 (measured here on a tiny model's block input).
    Plan counts ``max_sequence_length`` rounded up to 32 (an upper bound), the adapter's latent
    shape, and 2 rows per sample when ``guidance_scale > 0`` (Z-Image's convention)."""
    from branchgrpo.models.zimage import ZImageVelocity
    from branchgrpo.resources import estimate_job, transformer_config
    from branchgrpo.resources.families import PLAN_FAMILIES
    from branchgrpo.train.config import load_train_config

    entry, big = PLAN_FAMILIES["zimage"], ZImageArchitecture(dict(Z_IMAGE_TURBO))
    assert entry.tokens(big, {}) == Tokens(4096, 512) and entry.latent_elements(big, {}) == 16 * 128 * 128
    options = {"height": 720, "width": 720, "max_sequence_length": 300}
    assert entry.tokens(big, options) == Tokens(padded(45 * 45), 320) == Tokens(2048, 320)
    assert entry.latent_elements(big, options) == 16 * 90 * 90
    assert entry.rows_per_sample({}) == 1 and entry.rows_per_sample({"guidance_scale": 0.5}) == 2
    assert entry.lora_targets(big) == tuple(ZIMAGE_TARGET_MODULES)
    # the rows the real velocity call builds: main-block input length per row, rows per call
    name = "w32-r1-l2"
    model, arch = tiny_zimage(name), ZImageArchitecture(TINY[name])
    seen = []
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    velocity = ZImageVelocity(model, guidance_scale=2.0)
    caption = torch.randn(1, 40, 12)
    mask = torch.zeros(1, 40)
    mask[:, :37] = 1  # a 37-token prompt; the negative has 5 tokens: padded to 64 and 32
    neg_mask = torch.zeros(1, 40)
    neg_mask[:, :5] = 1
    options = {"height": 8 * 12, "width": 8 * 10, "max_sequence_length": 37, "guidance_scale": 2.0}
    row = entry.tokens(arch, options)
    with torch.no_grad():
        velocity(torch.randn(1, 4, 12, 10), torch.tensor([0.5]),
                 {"prompt_embeds": caption, "prompt_mask": mask, "negative_prompt_embeds": caption,
                  "negative_prompt_mask": neg_mask})
    assert seen == [(entry.rows_per_sample(options), row.all, arch.dim)]
    assert row == Tokens(32, 64) and entry.latent_elements(arch, options) == 4 * 12 * 10
    config, source = transformer_config("zimage", "data/no-such-folder")
    assert config == Z_IMAGE_TURBO and "built-in z-image-turbo" in source
    job = estimate_job(load_train_config("configs/zimage-branchgrpo.yaml", None, []), config, processes=8)
    assert job.parameters == 6_154_908_736 and (job.tokens.image, job.tokens.text) == (4096, 512)


@pytest.mark.parametrize("name", list(TINY))
def test_gradient_buffer_is_the_widest_tensor_of_a_lora_backward(name):
    """With LoRA the widest tensor a backward op makes is a SwiGLU gradient ``[B·L, F]``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    batch, h, w, text = 2, 8, 8, 32
    out = forward(tiny_zimage(name, 4), batch, h, w, text)
    widest = Widest()
    with widest:
        out.square().sum().backward()
    assert widest.numel == batch * ZImageArchitecture(TINY[name]).gradient_buffer(tokens(h, w, text))
