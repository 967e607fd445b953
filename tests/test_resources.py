"""Resource estimates (branchgrpo.resources) against the real diffusers models, peft, autograd's
saved tensors and torch's FLOP counter, on tiny FLUX transformers on CPU."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from autograd_probe import SavedStorages

from branchgrpo.cli import main
from branchgrpo.models.lora import DEFAULT_TARGET_MODULES, LoraSpec, add_lora
from branchgrpo.resources import (
    HUB_CONFIGS, FluxArchitecture, Tokens, Training, backward_flops, estimate_job, forward_flops,
    lora_parameter_count, parameter_count, parse_memory, transformer_config,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

# different widths, depths (one without single blocks, one without double blocks), guidance on/off
TINY = {
    "w32-1x1": dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1, in_channels=8,
                    joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=[4, 6, 6]),
    "w24-2x3-guidance": dict(num_attention_heads=3, attention_head_dim=8, num_layers=2, num_single_layers=3,
                             in_channels=16, joint_attention_dim=40, pooled_projection_dim=20, guidance_embeds=True,
                             axes_dims_rope=[2, 2, 4]),
    "w64-3x0": dict(num_attention_heads=4, attention_head_dim=16, num_layers=3, num_single_layers=0, in_channels=4,
                    joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=[4, 6, 6]),
    "w32-0x2": dict(num_attention_heads=1, attention_head_dim=32, num_layers=0, num_single_layers=2, in_channels=4,
                    joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=[8, 12, 12]),
}
SHAPES = [(2, 16, 5), (3, 36, 7)]  # (batch, image tokens, text tokens)


def tiny_flux(name: str, lora_rank: int | None = None, bf16_base: bool = False, targets=DEFAULT_TARGET_MODULES):
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**TINY[name])
    if bf16_base:  # the trainer's LoRA setup on a GPU: frozen base in bf16, fp32 adapters
        model.to(torch.bfloat16)
    if lora_rank:
        add_lora(model, LoraSpec(rank=lora_rank, target_modules=targets))
    return model


def training(lora_rank: int | None, compute_bytes: int = 4, targets=DEFAULT_TARGET_MODULES) -> Training:
    targets = targets if isinstance(targets, str) else tuple(targets)
    return Training(lora_rank, targets if lora_rank else (), compute_bytes=compute_bytes)


def forward(model, batch: int, image: int, text: int, bf16: bool = False):
    c = model.config
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    ids = torch.zeros(image, 3)
    ids[:, 1] = torch.arange(image)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(
            hidden_states=torch.randn(batch, image, c.in_channels, generator=gen).to(dtype),
            encoder_hidden_states=torch.randn(batch, text, c.joint_attention_dim, generator=gen).to(dtype),
            pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=gen).to(dtype),
            timestep=torch.rand(batch, generator=gen).to(dtype), img_ids=ids, txt_ids=torch.zeros(text, 3),
            guidance=torch.full((batch,), 3.5, dtype=dtype) if c.guidance_embeds else None, return_dict=False,
        )[0]


def measured_saved_bytes(model, batch: int, image: int, text: int, checkpointing: bool, bf16: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded). Under
    checkpointing the RoPE tables are held by the checkpoint as a non-tensor argument instead."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    with SavedStorages(model) as saved:
        hook = model.pos_embed.register_forward_hook(
            lambda m, i, out: [saved.pack(t) for t in out] if checkpointing else None)
        forward(model, batch, image, text, bf16)
        hook.remove()
    return saved.bytes


def test_flux_dev_parameter_count_is_the_published_one():
    arch = FluxArchitecture(HUB_CONFIGS["flux-dev"])
    assert parameter_count(arch) == 11_901_408_320
    with torch.device("meta"):  # allocates nothing
        model = diffusers.FluxTransformer2DModel(**{k: v for k, v in HUB_CONFIGS["flux-dev"].items() if k[0] != "_"})
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(TINY))
def test_byte_counts_match_real_models(name):
    arch = FluxArchitecture(TINY[name])
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_flux(name).to(dtype)
        size = torch.finfo(dtype).bits // 8
        assert sum(p.numel() * p.element_size() for p in model.parameters()) == parameter_count(arch) * size


def test_digits_transformer_count_matches_the_shipped_model():
    config, source = transformer_config("digits", None)
    model = diffusers.FluxTransformer2DModel(**{k: v for k, v in config.items() if k[0] != "_"})
    assert parameter_count(FluxArchitecture(config)) == sum(p.numel() for p in model.parameters()) == 1_302_276
    assert source.endswith("digits/transformer/config.json")


@pytest.mark.parametrize("targets", [DEFAULT_TARGET_MODULES, ["proj_mlp", "ff.net.2", "norm1.linear"],
                                     r".*transformer_blocks\.1\.attn\.to_[qk]"])
@pytest.mark.parametrize("name", ["w24-2x3-guidance", "w64-3x0"])
def test_lora_counts_match_peft(name, targets):
    model = tiny_flux(name, lora_rank=3, targets=targets)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    expected = sum(p.numel() for p in lora)
    assert expected > 0
    assert lora_parameter_count(FluxArchitecture(TINY[name]), training(3, targets=targets)) == expected
    assert all(p.element_size() == 4 for p in lora)  # fp32 adapters: 4 bytes each, as the estimate counts


@pytest.mark.parametrize("name,shape,lora,checkpointing",
                         list(itertools.product(TINY, SHAPES, [None, 4], [False, True])))
def test_saved_activations_match_autograd_exactly_in_fp32(name, shape, lora, checkpointing):
    model = tiny_flux(name, lora)
    train = training(lora)
    estimate = FluxArchitecture(TINY[name]).saved(Tokens(*shape[1:]), train, checkpointing)
    assert estimate.bytes(shape[0], train) == measured_saved_bytes(model, *shape, checkpointing)


@pytest.mark.parametrize("name,shape,lora,checkpointing",
                         list(itertools.product(TINY, SHAPES, [None, 4], [False, True])))
def test_saved_activations_match_autograd_exactly_under_bf16_autocast(name, shape, lora, checkpointing):
    """The trainer's mixed precision on CPU: fp32 masters (full) or a bf16 base with fp32 adapters
    (LoRA) under bf16 autocast; weight casts and per-adapter input casts included."""
    batch, image, text = shape
    model = tiny_flux(name, lora, bf16_base=lora is not None)
    train = training(lora, compute_bytes=2)
    estimate = FluxArchitecture(TINY[name]).saved(Tokens(image, text), train, checkpointing)
    assert estimate.bytes(batch, train) == measured_saved_bytes(model, batch, image, text, checkpointing, bf16=True)


@pytest.mark.parametrize("name", list(TINY))
def test_saved_activations_upper_bound_at_batch_one(name):
    """With one sample the attention output's slices are already contiguous, so the copies the
    estimate counts for ``to_out``/``to_add_out`` are views: an upper bound within 8%."""
    measured = measured_saved_bytes(tiny_flux(name), 1, 64, 12, False)
    estimate = FluxArchitecture(TINY[name]).saved(Tokens(64, 12), training(None), False).bytes(1, training(None))
    assert measured <= estimate <= 1.08 * measured


@pytest.mark.parametrize("name,lora", list(itertools.product(TINY, [None, 4])))
def test_flops_match_torch_flop_counter(name, lora):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    batch, image, text = 2, 16, 5
    model = tiny_flux(name, lora)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls the counter sees (QKᵀ, AV and their gradients)
        with FlopCounterMode(display=False) as counter:
            out = forward(model, batch, image, text)
        forward_counted = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.square().sum().backward()
        backward_counted = counter.get_total_flops()
    arch, train = FluxArchitecture(TINY[name]), training(lora)
    trace = arch.saved(Tokens(image, text), train, False)
    assert batch * forward_flops(trace, arch.dim, train.rank) == forward_counted
    assert batch * backward_flops(trace, arch.dim, train.rank) == backward_counted


def test_parse_memory():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("80 GiB") == 80 * 2**30
    assert parse_memory("81920MiB") == 80 * 2**30
    assert parse_memory("1.5T") == 1.5e12
    for bad in ("80XB", "", "-1GB", "0GB", "GB"):
        with pytest.raises(ValueError, match="--gpu-memory"):
            parse_memory(bad)


def _flux_job(*overrides: str):
    from branchgrpo.train.config import load_train_config

    return load_train_config("configs/flux-dev-hps.yaml", None, list(overrides))


def test_job_state_bytes_full_fsdp_offload_and_lora():
    """Closed forms: a full fine-tune keeps 16 bytes per parameter (fp32 weights, gradients, two
    moments), 1/N each under FSDP, on the host with CPU offload; LoRA keeps the bf16 base."""
    n = 11_901_408_320
    full = estimate_job(_flux_job(), HUB_CONFIGS["flux-dev"], processes=8)
    state = {r.name: r for r in full.persistent + full.phases["update"]}
    assert state["trained weights (fp32 masters)"].device == 4 * n // 8
    assert state["AdamW moments (2 × fp32)"].device == 8 * n // 8
    assert state["gradients (fp32)"].device == 4 * n // 8
    offload = estimate_job(_flux_job("run.cpu_offload=true"), HUB_CONFIGS["flux-dev"], processes=8)
    assert all(r.device == 0 for r in offload.persistent)
    assert sum(r.host for r in offload.persistent) == 12 * n // 8
    lora = estimate_job(_flux_job("model.lora.rank=32", "run.parallel=ddp"), HUB_CONFIGS["flux-dev"], processes=1)
    state = {r.name: r for r in lora.persistent}
    assert state["frozen weights (bfloat16)"].device == 2 * n
    assert lora.trained_parameters == 52_297_728  # peft's count on FLUX.1-dev's attention projections
    assert state["trained weights (fp32 masters)"].device == 4 * lora.trained_parameters


def test_job_flops_follow_the_tree():
    """Rollout rows × forward FLOPs; training forwards × (forward + backward); one more forward
    per training row with checkpointing. The rows are the tree's NFE counts (docs/method.md §10)."""
    from branchgrpo.tree.nfe import plan

    job = _flux_job()
    estimate = estimate_job(job, HUB_CONFIGS["flux-dev"], processes=1)
    counts, prompts, f = plan(job.method).counts, estimate.prompts_per_process, estimate.flops
    assert f["rollout"] == prompts * counts.rollout_calls * f["forward_per_row"]
    assert f["update"] == prompts * counts.training_forwards * (f["forward_per_row"] + f["backward_per_row"])
    assert f["recompute"] == prompts * counts.training_forwards * f["forward_per_row"]
    d, tokens = 3072, 720 // 16 * 720 // 16 + 512
    assert f["forward_per_row"] > 57 * 4 * tokens**2 * d  # more than the attention alone


def test_transformer_config_prefers_the_model_folder(tmp_path):
    folder = tmp_path / "flux" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TINY["w32-1x1"]))
    assert transformer_config("flux", str(tmp_path / "flux")) == (TINY["w32-1x1"], str(folder / "config.json"))
    config, source = transformer_config("flux", str(tmp_path / "missing"))
    assert config["num_single_layers"] == 38 and "built-in flux-dev" in source
    with pytest.raises(ValueError, match="model.family=no-such-family"):  # a family plan does not cover
        transformer_config("no-such-family", None)


def test_cli_plan_prints_the_resource_table(capsys):
    args = ["plan", "--config", "configs/digits-branchgrpo.yaml", "--processes", "2", "--gpu-memory", "80GB"]
    assert main([*args, "data.prompts_per_iteration=6"]) == 0
    out = capsys.readouterr().out
    assert "resources per process: digits transformer, 1.30 M parameters, all trained" in out
    assert "per iteration: 3 prompt(s)" in out  # 6 prompts shared by 2 processes
    assert "peak per process:" in out and "GPU memory 74.51 GiB: fits" in out
    assert main(["plan", "--config", "configs/flux-dev-hps.yaml", "--json", "model.lora.rank=32"]) == 0
    resources = json.loads(capsys.readouterr().out)["resources"]
    assert resources["parameters"] == 11_901_408_320 and resources["trained_parameters"] == 52_297_728
    assert resources["fits"] is None and resources["peak_bytes"] == max(resources["phase_peak_bytes"].values())


@pytest.mark.parametrize("args,field", [(["--gpu-memory", "80XB"], "--gpu-memory"),
                                        (["--processes", "0"], "--processes")])
def test_cli_plan_bad_values_are_one_line_errors(capsys, args, field):
    assert main(["plan", "--config", "configs/digits-branchgrpo.yaml", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"branchgrpo: error: {field}")


def test_cli_plan_sizing_needs_a_config(capsys):
    assert main(["plan", "--processes", "8"]) == 2
    assert "--config" in capsys.readouterr().err
