"""Wan2.2 (family ``wan22``): the conformance suite (tests/models/conformance.py) on tiny random
T2V-A14B models — two ``WanTransformer3DModel`` experts switched at ``boundary_ratio`` with their
own guidance scales — plus what is Wan2.2's own: per-row expert routing of mixed micro-batches,
the TI2V-5B variant (48-channel Wan2.2 VAE, 4×16×16 compression, per-token timesteps), LoRA on
both experts and its export in diffusers' per-expert convention, and one BranchGRPO iteration
through the family's own ``build`` (folder loading, LoRA on both experts, the Trainer).

The oracle: at η = 0 our frontier rollout reproduces ``WanPipeline`` (diffusers 0.42) with both
experts and a boundary inside the schedule (σ 1, 0.9 → high-noise expert; 0.75, 0.5 → low-noise
expert at shift 3, 4 steps, boundary 0.875), on the same noise: final latents and decoded videos.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil

import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.families import get_family
from branchgrpo.models.lora import LoraSpec, add_lora, has_lora, lora_named_parameters, trainable_parameters
from branchgrpo.models.wan import WanVelocity
from branchgrpo.models.wan22 import (
    Wan22Adapter,
    Wan22FilesNotFoundError,
    Wan22Velocity,
    WanExperts,
    export_expert_loras,
    load_expert_loras_into,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conformance import FamilyCase, brightness, check_decode, check_oracle, conformance_tests  # noqa: E402

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street", "tree", "ugly", "blurry"]
PROMPTS = ("a photo of a cat", "red car on the street", "blue tree")
NEGATIVE = "ugly blurry"
HEIGHT, WIDTH, FRAMES = 32, 48, 5  # A14B: VAE 8×/4× → latent [16, 2, 4, 6]
HEIGHT_5B, WIDTH_5B = 64, 96  # TI2V-5B: VAE 16×/4× → latent [48, 2, 4, 6]; patch (1, 2, 2) → 12 tokens per frame
MAX_SEQ = 10
GUIDANCE, GUIDANCE_2 = 4.0, 3.0  # Wan2.2 T2V-A14B's (high-noise, low-noise) guidance
BOUNDARY = 0.875  # T2V-A14B's model_index.json
STEPS, SHIFT = 4, 3.0  # σ = 1, 0.9, 0.75, 0.5: the switch falls inside the schedule


def umt5_tokenizer():
    """A sentencepiece-unigram tokenizer (the UMT5 kind) whose pieces are the words of WORDS."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_transformer(channels: int = 16):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
        out_channels=channels, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def tiny_components(seed: int = 0, t5_layers: int = 1) -> dict:
    """UMT5, the Wan2.1 VAE (A14B uses it: 8×/4×, default latent mean/std) and two random experts."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = umt5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=t5_layers, num_heads=2,
        relative_attention_num_buckets=8,
    )).eval()
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
    ).eval()
    return dict(transformer=tiny_transformer(), transformer_2=tiny_transformer(), vae=vae,
                text_encoder=text_encoder, tokenizer=tokenizer)


def tiny_components_5b(seed: int = 0) -> dict:
    """TI2V-5B: one 48-channel transformer on the Wan2.2 VAE (residual, patch 2, 16× spatial, z_dim 48)."""
    from diffusers import AutoencoderKLWan

    components = tiny_components(seed)
    del components["transformer_2"]
    gen = torch.Generator().manual_seed(seed + 100)
    components["vae"] = AutoencoderKLWan(
        base_dim=8, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
        is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
        latents_mean=(0.2 * torch.randn(48, generator=gen)).tolist(),
        latents_std=(0.4 + 0.8 * torch.rand(48, generator=gen)).tolist(),
    ).eval()
    components["transformer"] = tiny_transformer(48)
    return components


def make_adapter(components: dict, **kwargs) -> Wan22Adapter:
    two = components.get("transformer_2") is not None
    defaults = {"max_sequence_length": MAX_SEQ, "num_frames": FRAMES, "negative_prompt": NEGATIVE,
                "decode_batch_size": 4}
    if two:
        defaults.update(height=HEIGHT, width=WIDTH, boundary_ratio=BOUNDARY, guidance_scale=GUIDANCE,
                        guidance_scale_2=GUIDANCE_2)
    else:
        defaults.update(height=HEIGHT_5B, width=WIDTH_5B, guidance_scale=5.0, expand_timesteps=True)
    return Wan22Adapter(**components, **{**defaults, **kwargs})


def euler_scheduler():
    """Euler on docs/method.md §2's σ grid (``WanPipeline.__call__`` takes no ``sigmas=``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from branchgrpo.models.base import spec_sigmas_for_pipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    stock = scheduler.set_timesteps
    scheduler.set_timesteps = lambda steps, device=None: stock(sigmas=spec_sigmas_for_pipeline(steps), device=device)
    return scheduler


def wan22_pipeline(components: dict):
    from diffusers import WanPipeline

    if components.get("transformer_2") is not None:
        return WanPipeline(scheduler=euler_scheduler(), boundary_ratio=BOUNDARY, **components)
    return WanPipeline(scheduler=euler_scheduler(), expand_timesteps=True, **components)


def pipeline_embeds(pipe, prompts: list[str]) -> dict:
    embeds, negative = pipe.encode_prompt(prompts, negative_prompt=NEGATIVE, max_sequence_length=MAX_SEQ,
                                          device=torch.device("cpu"))
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}


def write_model_index(folder, two_experts: bool = True) -> None:
    """The ``model_index.json`` that ``WanPipeline.save_pretrained`` writes for these components."""
    index = {"_class_name": "WanPipeline", "boundary_ratio": BOUNDARY if two_experts else None,
             "expand_timesteps": not two_experts,
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"] if two_experts else [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))


def load_adapter(folder, cache_dir) -> Wan22Adapter:
    write_model_index(folder)
    return Wan22Adapter.from_pretrained(
        folder, dtype=torch.float32, text_encoders="lazy", max_sequence_length=MAX_SEQ, height=HEIGHT, width=WIDTH,
        num_frames=FRAMES, guidance_scale=GUIDANCE, guidance_scale_2=GUIDANCE_2, negative_prompt=NEGATIVE,
        prompt_cache_dir=cache_dir,
    )


CASE = FamilyCase(
    name="wan22",
    components=lambda seed: tiny_components(seed=seed),
    adapter=make_adapter,
    pipeline=wan22_pipeline,
    call=dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, guidance_scale=GUIDANCE, guidance_scale_2=GUIDANCE_2,
              negative_prompt=NEGATIVE, max_sequence_length=MAX_SEQ),
    pipeline_embeds=pipeline_embeds,
    output_shape=(FRAMES, 3, HEIGHT, WIDTH),
    prompts=PROMPTS,
    steps=STEPS,
    shift=SHIFT,
    decode_atol=1e-5,  # the Wan VAE picks other conv kernels per batch size: float32 rounding (~2e-6)
    pass_sigmas=False,
    output_attr="frames",
    guidance_off={"guidance_scale": 1.0, "guidance_scale_2": 1.0},
    adapter_guidance_off={"guidance_scale": 1.0, "guidance_scale_2": 1.0},
    lora=False,  # the suite's LoRA and trainer checks train `adapter.transformer` alone: both experts below
    trainer=False,
    load=load_adapter,
)
globals().update(conformance_tests(CASE))

CASE_5B = dataclasses.replace(
    CASE, components=lambda seed: tiny_components_5b(seed=seed),
    call=dict(height=HEIGHT_5B, width=WIDTH_5B, num_frames=FRAMES, guidance_scale=5.0, negative_prompt=NEGATIVE,
              max_sequence_length=MAX_SEQ),
    output_shape=(FRAMES, 3, HEIGHT_5B, WIDTH_5B), guidance_off={"guidance_scale": 1.0},
    adapter_guidance_off={"guidance_scale": 1.0}, load=None,
)


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=3)


def record_calls(modules: dict[str, torch.nn.Module]) -> tuple[list, list]:
    """Hooks appending ``(name, batch rows, timestep)`` for each call of each module; returns (calls, hooks)."""
    calls, hooks = [], []
    for name, module in modules.items():
        def hook(_module, _args, kwargs, _out, name=name):
            calls.append((name, kwargs["hidden_states"].shape[0], kwargs["timestep"].detach().clone()))
        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    return calls, hooks


# -- experts: routing and guidance ----------------------------------------------------------------


def test_experts_switch_where_the_pipeline_switches(components):
    """The same expert serves the same step in our rollout and in WanPipeline: high noise while
    1000·σ >= 875 (steps 0, 1), low noise after (steps 2, 3)."""
    from conformance import ode_tree, pipeline_sample

    experts = {"transformer": components["transformer"], "transformer_2": components["transformer_2"]}
    adapter = make_adapter(components)
    calls, hooks = record_calls(experts)
    try:
        tree = ode_tree(CASE, adapter, micro_batch=2)
        ours = [(name, float(t[0])) for name, _, t in calls]
        calls.clear()
        pipeline_sample(CASE, wan22_pipeline(components), tree.latents[0], "latent")
        theirs = [(name, float(t[0])) for name, _, t in calls]
    finally:
        for hook in hooks:
            hook.remove()
    # ours: one doubled CFG call per step; the pipeline: cond then uncond
    assert ours == [("transformer", 1000.0), ("transformer", 900.0), ("transformer_2", 750.0), ("transformer_2", 500.0)]
    assert theirs == [entry for entry in ours for _ in range(2)]


def expected_row(components: dict, x: torch.Tensor, sigma: float, cond: dict, row: int) -> torch.Tensor:
    """One row by hand: the expert the pipeline would pick for σ, its guidance mixed explicitly."""
    high = 1000.0 * torch.tensor(sigma, dtype=torch.float32) >= BOUNDARY * 1000
    expert = components["transformer" if high else "transformer_2"]
    scale = GUIDANCE if high else GUIDANCE_2
    plain = WanVelocity(expert, guidance_scale=1.0)
    s = torch.tensor([sigma])
    v_cond = plain(x[row : row + 1], s, {"prompt_embeds": cond["prompt_embeds"][row : row + 1]})
    v_uncond = plain(x[row : row + 1], s, {"prompt_embeds": cond["negative_prompt_embeds"][row : row + 1]})
    return v_uncond + scale * (v_cond - v_uncond)


def test_mixed_micro_batch_calls_each_expert_once_on_its_rows(components):
    adapter = make_adapter(components)
    sigmas = [0.95, 0.5, BOUNDARY, 0.2, 0.9]  # high, low, high (1000σ = 875 exactly: t >= boundary), low, high
    cond = adapter.encode_prompts([PROMPTS[i % 3] for i in range(len(sigmas))])
    x = torch.randn(len(sigmas), *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    velocity = adapter.velocity_model()
    torch.testing.assert_close(velocity.high_noise_rows(torch.tensor(sigmas)),
                               torch.tensor([True, False, True, False, True]))
    calls, hooks = record_calls({name: components[name] for name in ("transformer", "transformer_2")})
    try:
        mixed = velocity(x, torch.tensor(sigmas), cond)
    finally:
        for hook in hooks:
            hook.remove()
    # one doubled CFG call per expert, on its own rows only
    assert [(name, rows, t.tolist()) for name, rows, t in calls] == [
        ("transformer", 6, [950.0, 875.0, 900.0] * 2), ("transformer_2", 4, [500.0, 200.0] * 2)]
    by_hand = torch.cat([expected_row(components, x, s, cond, i) for i, s in enumerate(sigmas)])
    diff = (mixed - by_hand).abs().max().item()
    print(f"mixed micro-batch vs per-row calls: max|Δ|={diff:.2e} (scale {by_hand.abs().max():.2f})")
    torch.testing.assert_close(mixed, by_hand, rtol=0, atol=1e-5)
    # all rows on one side: one expert, one call
    calls, hooks = record_calls({name: components[name] for name in ("transformer", "transformer_2")})
    try:
        velocity(x[:2], torch.tensor([0.3, 0.1]), {k: v[:2] for k, v in cond.items()})
    finally:
        for hook in hooks:
            hook.remove()
    assert [(name, rows) for name, rows, _ in calls] == [("transformer_2", 4)]


def test_mixed_micro_batch_backpropagates_into_both_experts(components):
    adapter = make_adapter(components)
    experts = adapter.experts
    cond = adapter.encode_prompts(list(PROMPTS[:2]))
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    experts.requires_grad_(True)
    try:
        adapter.velocity_model()(x, torch.tensor([0.3, 0.95]), cond).square().mean().backward()
        for name, module in experts.experts():
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            assert grads and any(g.abs().max() > 0 for g in grads), name
    finally:
        experts.requires_grad_(False)
        experts.zero_grad(set_to_none=True)


@pytest.mark.parametrize("sigmas", [(0.3, 0.1), (0.95, 0.9), (0.3, 0.95)], ids=["low", "high", "mixed"])
def test_lockstep_calls_both_experts_and_changes_no_velocity_or_gradient(components, sigmas):
    """Sharded over several processes (FSDP2), the experts' collectives run inside their calls, so every
    call runs both experts in one order whatever its rows (a training micro-batch differs per process):
    an expert without rows runs on row 0 and adds exactly zero, to the velocity and to every gradient."""
    adapter = make_adapter(components)
    velocity, experts = adapter.velocity_model(), adapter.experts
    assert velocity.lockstep is None and not velocity.in_lockstep()  # unsharded: one call per expert with rows
    cond = adapter.encode_prompts(list(PROMPTS[:2]))
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(3))
    results = {}
    experts.requires_grad_(True)
    try:
        for lockstep in (False, True):
            velocity.lockstep = lockstep
            calls, hooks = record_calls({name: components[name] for name in ("transformer", "transformer_2")})
            try:
                out = velocity(x, torch.tensor(sigmas), cond)
                out.square().mean().backward()
            finally:
                for hook in hooks:
                    hook.remove()
            grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                     for name, p in experts.named_parameters()}
            results[lockstep] = (out.detach(), grads, [name for name, *_ in calls])
            experts.zero_grad(set_to_none=True)
    finally:
        experts.requires_grad_(False)
    (plain, plain_grads, plain_calls), (locked, locked_grads, locked_calls) = results[False], results[True]
    assert locked_calls == ["transformer", "transformer_2"]
    assert len(plain_calls) == len({s >= BOUNDARY for s in sigmas})  # the experts with rows, once each
    torch.testing.assert_close(locked, plain, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(locked_grads[name], grad, rtol=0, atol=0, msg=name)


def test_guidance_conventions_and_checks(components):
    adapter = make_adapter(components)
    velocity = adapter.velocity_model()
    assert (velocity.guidance_scale, velocity.guidance_scale_2, velocity.boundary_timestep) == (4.0, 3.0, 875.0)
    assert adapter.velocity_model(guidance_scale_2=None).guidance_scale_2 == 3.0  # the adapter's
    assert make_adapter(components, guidance_scale_2=None).velocity_model().guidance_scale_2 == 4.0  # pipeline: = g
    with pytest.raises(ValueError, match="guidance_scale_2=3.0 needs guidance_scale > 1"):
        make_adapter(components, guidance_scale=1.0).velocity_model()
    with pytest.raises(ValueError, match="boundary_ratio"):
        Wan22Adapter(**components)
    assert velocity.compute_dtype is None  # float32 on CPU
    velocity.compute_dtype = torch.bfloat16  # what use_master_weights sets reaches both experts
    assert velocity._high.compute_dtype == velocity._low.compute_dtype == torch.bfloat16


# -- TI2V-5B --------------------------------------------------------------------------------------


def test_ti2v_5b_rollout_reproduces_the_pipeline_with_per_token_timesteps():
    components = tiny_components_5b(seed=1)
    adapter = make_adapter(components)
    assert adapter.latent_shape() == (48, 2, 4, 6) and adapter.vae_scale_factor == 16
    assert adapter.latent_shape(704, 1280, 121) == (48, 31, 44, 80)  # the authors' 1280×704, 121 frames
    with pytest.raises(ValueError, match="multiple of 32x32"):
        adapter.latent_shape(48, 96)
    calls, hooks = record_calls({"transformer": components["transformer"]})
    try:
        check_oracle(CASE_5B, components, micro_batch=2)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = 2 * 2 * 3  # F' · H/2 · W/2 latent tokens
    ours_shapes = {tuple(t.shape) for _, rows, t in calls if rows == 4}  # our doubled CFG calls
    theirs_shapes = {tuple(t.shape) for _, rows, t in calls if rows == 2}  # the pipeline's
    assert ours_shapes == {(4, tokens)} and theirs_shapes == {(2, tokens)}
    assert all(bool((t == t[:, :1]).all()) for _, _, t in calls)  # one timestep per row, on every token


def test_ti2v_5b_decode_is_batched_and_in_unit_range():
    check_decode(CASE_5B, tiny_components_5b(seed=0))


# -- LoRA on both experts -------------------------------------------------------------------------


def test_lora_on_both_experts_exports_one_file_per_expert_that_the_pipeline_loads(tmp_path):
    from safetensors import safe_open

    trained, fresh = tiny_components(seed=5), tiny_components(seed=5)
    adapter = make_adapter(trained)
    targets = get_family("wan22").lora_target_modules(None)
    add_lora(adapter.experts, LoraSpec(rank=4, alpha=12.0, target_modules=targets))
    assert has_lora(trained["transformer"]) and has_lora(trained["transformer_2"])
    names = [name for name, _ in lora_named_parameters(adapter.experts)]
    assert len(names) == 2 * (2 * 8 * 2)  # 2 experts × (A, B) × attn1/attn2 q, k, v, out × 2 blocks
    assert {name.split(".")[0] for name in names} == {"transformer", "transformer_2"}
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in trainable_parameters(adapter.experts):
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))  # stands in for training

    paths = export_expert_loras(adapter.experts, tmp_path / "lora")
    with pytest.raises(ValueError, match="one file per expert"):
        export_expert_loras(adapter.experts, tmp_path / "lora.safetensors")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["lora_transformer.safetensors",
                                                                     "lora_transformer_2.safetensors"]
    for path in paths.values():
        with safe_open(str(path), "pt") as handle:
            keys, metadata = list(handle.keys()), handle.metadata()
        assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
        config = json.loads(metadata["lora_adapter_metadata"])
        assert (config["transformer.r"], config["transformer.lora_alpha"]) == (4, 12.0)

    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor([0.95, 0.3])  # one row per expert
    cond = adapter.encode_prompts(list(PROMPTS[:2]))
    pipe = wan22_pipeline(fresh)
    pipe.load_lora_weights(str(paths["transformer"]))
    with torch.no_grad():
        ours = adapter.velocity_model()(x, sigma, cond)
        half = make_adapter({**fresh, "transformer": pipe.transformer,
                             "transformer_2": pipe.transformer_2}).velocity_model()(x, sigma, cond)
    torch.testing.assert_close(half[0], ours[0], rtol=0, atol=1e-6)  # the high-noise row is already ours
    assert (half[1] - ours[1]).abs().max() > 1e-2  # the low-noise expert needs its own file
    pipe.load_lora_weights(str(paths["transformer_2"]), load_into_transformer_2=True)
    with torch.no_grad():
        loaded = make_adapter({**fresh, "transformer": pipe.transformer,
                               "transformer_2": pipe.transformer_2}).velocity_model()(x, sigma, cond)
        base = make_adapter(tiny_components(seed=5)).velocity_model()(x, sigma, cond)
    diff = (loaded - ours).abs().max().item()
    print(f"pipeline with both LoRA files vs our velocity: max|Δ|={diff:.2e}")
    torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-6)
    assert ((ours - base).abs().flatten(1).amax(dim=1) > 1e-2).all()  # the LoRA moved both rows


# -- the family: options, configs, loading ----------------------------------------------------------


def family_options(**values):
    return get_family("wan22").options_class(**values)


def test_options_defaults_and_errors_name_the_field():
    a14b, ti2v = family_options(), family_options(variant="ti2v-5b")
    assert (a14b.guidance_scale, a14b.guidance_scale_2, a14b.boundary_ratio) == (4.0, 3.0, None)
    assert (ti2v.guidance_scale, ti2v.guidance_scale_2) == (5.0, None)
    cases = [
        (dict(variant="t2v-5b"), "model.options.variant"),
        (dict(variant="ti2v-5b", height=496), "model.options.height"),  # a multiple of 16, not of 32
        (dict(variant="ti2v-5b", guidance_scale_2=3.0), "model.options.guidance_scale_2"),
        (dict(variant="ti2v-5b", boundary_ratio=0.9), "model.options.boundary_ratio"),
        (dict(guidance_scale=1.0), "model.options.guidance_scale_2"),  # 3.0 would be ignored by the pipeline
        (dict(boundary_ratio=1.5), "model.options.boundary_ratio"),
        (dict(num_frames=32), "model.options.num_frames"),
        (dict(width=40), "model.options.width"),
        (dict(max_sequence_length=0), "model.options.max_sequence_length"),
    ]
    for values, field in cases:
        with pytest.raises(ConfigError) as info:
            family_options(**values)
        assert info.value.field == field, (values, str(info.value))
    assert family_options(height=496).height == 496  # fine for A14B
    assert family_options(guidance_scale=1.0, guidance_scale_2=1.0).guidance_scale_2 == 1.0


@pytest.mark.parametrize("path, variant, shift", [("configs/wan22-a14b-branchgrpo.yaml", "t2v-a14b", 12.0),
                                                  ("configs/wan22-ti2v-5b-branchgrpo.yaml", "ti2v-5b", 5.0)])
def test_configs_resolve(path, variant, shift):
    from branchgrpo.train.config import load_train_config

    config = load_train_config(path)
    options = get_family("wan22").options(config)
    assert config.model.family == "wan22" and options.variant == variant
    assert config.method.tree.steps == 20 and config.method.tree.shift == shift


def test_missing_files_are_named(components, tmp_path):
    from conformance import save_layout

    with pytest.raises(Wan22FilesNotFoundError, match="model_index.json"):
        Wan22Adapter.from_pretrained(tmp_path, dtype=torch.float32)
    save_layout(components, tmp_path)
    write_model_index(tmp_path)
    shutil.rmtree(tmp_path / "transformer_2")
    with pytest.raises(Wan22FilesNotFoundError) as info:
        Wan22Adapter.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(info.value)
    assert "Wan2.2 weights not found" in message and "transformer_2/" in message
    assert "hf download Wan-AI/Wan2.2-T2V-A14B-Diffusers" in message and "Traceback" not in message
    # model_index.json without transformer_2 is TI2V-5B: the folder then loads with one transformer
    write_model_index(tmp_path, two_experts=False)
    loaded = Wan22Adapter.from_pretrained(tmp_path, dtype=torch.float32, text_encoders="none",
                                          max_sequence_length=MAX_SEQ, height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    assert loaded.num_experts == 1 and loaded.expand_timesteps and loaded.boundary_ratio is None


# -- one BranchGRPO iteration through the family's own build ----------------------------------------


def save_pipeline(components: dict, folder) -> None:
    """A real diffusers folder: ``WanPipeline.save_pretrained`` (model_index.json with boundary_ratio)."""
    wan22_pipeline(components).save_pretrained(str(folder), safe_serialization=True)


def family_trainer(root, *overrides):
    """A Trainer that builds tiny A14B from ``root/model`` as ``model.family=wan22`` with LoRA (rank 4)."""
    from branchgrpo.rewards.base import as_reward
    from branchgrpo.train.config import load_train_config
    from branchgrpo.train.trainer import Trainer

    config = load_train_config(None, "branchgrpo", [
        f"run.output_dir={root / 'run'}", "run.iterations=1", "run.progress=false", "run.tensorboard=false",
        "run.dump_tree_every=0", "run.checkpoint_every=0", "run.device=cpu", "model.family=wan22",
        f"model.path={root.parent / 'model'}", "model.dtype=float32", f"model.options.height={HEIGHT}",
        f"model.options.width={WIDTH}", f"model.options.num_frames={FRAMES}",
        f"model.options.max_sequence_length={MAX_SEQ}", f"model.options.negative_prompt={NEGATIVE}",
        "model.lora.rank=4", "model.lora.alpha=8", f"data.train_prompts={root.parent / 'prompts.txt'}",
        f"data.heldout_prompts={root.parent / 'heldout.txt'}", "data.prompts_per_iteration=2",
        "eval.samples_per_prompt=1", f"tree.steps={STEPS}", f"tree.shift={SHIFT}", "split_plan=0:2,2:2",
        "update.updates_per_iteration=1", "update.learning_rate=1e-3", *overrides,
    ])
    torch.manual_seed(0)  # LoRA's A starts random (peft's "gaussian" init): the same A in every run
    return config, Trainer(config, reward=as_reward(brightness, modality="video"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Tiny A14B saved as a diffusers folder, loaded by ``model.family=wan22`` with LoRA, one iteration."""
    root = tmp_path_factory.mktemp("wan22_run")
    save_pipeline(tiny_components(seed=7), root / "model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "heldout.txt").write_text(PROMPTS[0] + "\n")
    config, trainer = family_trainer(root / "plain")
    experts = trainer.model.policy.transformer
    before = {k: v.detach().clone() for k, v in experts.state_dict().items()}
    summary = trainer.run()
    return dict(root=root / "plain", config=config, trainer=trainer, before=before, summary=summary)


def test_one_branchgrpo_iteration_trains_lora_on_both_experts(trained_run):
    trainer, before = trained_run["trainer"], trained_run["before"]
    assert trained_run["summary"].iterations == 1
    bundle = trainer.model
    assert isinstance(bundle.adapter, Wan22Adapter) and bundle.adapter.num_experts == 2
    assert isinstance(bundle.policy, Wan22Velocity) and bundle.policy.boundary_timestep == 875.0
    assert isinstance(bundle.policy.transformer, WanExperts)
    assert bundle.trainable.transformer is bundle.policy.transformer  # LoraWeights over both experts
    after = bundle.policy.transformer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:5]
    assert {k.split(".")[0] for k in changed} == {"transformer", "transformer_2"}  # both experts learned
    assert set(bundle.trainable.state_dict()) == {k for k in after if ".lora_" in k}  # checkpoints hold both
    rows = [json.loads(line) for line in (trained_run["root"] / "run" / "metrics.jsonl").read_text().splitlines()]
    train = next(row for row in rows if "reward_mean" in row)
    numbers = [v for v in train.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert "nonfinite_keys" not in train and all(math.isfinite(v) for v in numbers)
    assert train["optimizer_steps"] == 1 and 0 < train["reward_mean"] < 1 and train["reward_std"] > 0
    assert train["ratio_max_deviation_first_step"] < 1e-4  # the rollout policy is the trained one (docs/method.md §8)


def test_family_exports_reproduce_the_trained_policy(trained_run, tmp_path, capsys):
    """``branchgrpo export``'s two paths: one LoRA file per expert (through the CLI, from the run folder), and
    a full folder with both experts merged."""
    from diffusers import WanPipeline

    family, trainer, config = get_family("wan22"), trained_run["trainer"], trained_run["config"]
    bundle = trainer.model
    x = torch.randn(2, *bundle.latent_shape, generator=torch.Generator().manual_seed(8))
    sigma = torch.tensor([0.95, 0.3])
    cond = bundle.encode_prompts(list(PROMPTS[:2]))
    with torch.no_grad():
        ours = bundle.policy(x, sigma, cond)

    from branchgrpo.cli import main

    assert main(["export", str(trained_run["root"] / "run"), str(tmp_path / "lora.safetensors")]) == 0  # rebuilds
    assert "load_into_transformer_2=True" in capsys.readouterr().out
    pipe = WanPipeline.from_pretrained(str(config.model.path))
    load_expert_loras_into(pipe, {name: tmp_path / "lora" / f"lora_{name}.safetensors"
                                  for name in ("transformer", "transformer_2")})
    full = family.export(bundle, config, tmp_path / "full", "symlink")
    assert "WanPipeline.from_pretrained" in full
    merged = WanPipeline.from_pretrained(str(tmp_path / "full"))
    assert merged.config.boundary_ratio == BOUNDARY and not has_lora(merged.transformer_2)
    for name, loaded in (("lora", pipe), ("full", merged)):
        adapter = make_adapter({"transformer": loaded.transformer, "transformer_2": loaded.transformer_2,
                                "vae": None, "text_encoder": None, "tokenizer": None})
        with torch.no_grad():
            theirs = adapter.velocity_model()(x, sigma, cond)
        diff = (theirs - ours).abs().max().item()
        print(f"export {name}: max|Δv|={diff:.2e}")
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    with torch.no_grad():
        base = make_adapter(tiny_components(seed=7)).velocity_model()(x, sigma, cond)
    assert ((ours - base).abs().flatten(1).amax(dim=1) > 0).all()  # training moved both rows' experts


def test_family_checks_and_prompt_encoder(trained_run, tmp_path):
    from branchgrpo.train.config import load_train_config

    family, config = get_family("wan22"), trained_run["config"]
    assert family.check(config) == []
    wrong = load_train_config(None, "branchgrpo", ["model.family=wan22", f"model.path={config.model.path}",
                                                   "model.options.variant=ti2v-5b"])
    [problem] = family.check(wrong)
    assert problem.field == "model.options.variant" and "t2v-a14b" in str(problem)
    full = copy.deepcopy(config)
    full.model.lora = None  # full fine-tuning: both experts are trainable (the loader froze them)
    bundle = family.build(full, torch.device("cpu"), torch.float32)
    assert bundle.trainable is bundle.policy.transformer and bundle.adapter.num_experts == 2
    assert all(p.requires_grad for p in bundle.trainable.parameters())
    encoder = family.prompt_encoder(config, torch.device("cpu"), torch.float32)
    assert encoder.transformer is None and encoder.vae is None and encoder.text_encoder is not None
    encoder.preprocess_prompts(list(PROMPTS), tmp_path)
    reader = trained_run["trainer"].model.adapter
    cached = Wan22Adapter(text_encoder=None, tokenizer=reader.tokenizer, prompt_cache_dir=tmp_path,
                          encoder_config=encoder.encoder_config, source=encoder.source, max_sequence_length=MAX_SEQ,
                          negative_prompt=NEGATIVE).encode_prompts(list(PROMPTS))
    direct = encoder.encode_prompts(list(PROMPTS))
    for key in direct:
        torch.testing.assert_close(cached[key], direct[key], rtol=0, atol=1e-6)


def test_one_rank_fsdp_shards_both_experts_and_equals_the_plain_run(trained_run):
    """run.parallel=fsdp: each expert's blocks are sharded, the experts' container is the root (every
    expert call goes through its forward, so the root gathers the embeddings and heads)."""
    config, trainer = family_trainer(trained_run["root"].parent / "fsdp", "run.parallel=fsdp")
    try:
        assert trainer.dist.sharded
        trainer.run()
        experts = trainer.model.policy.transformer
        assert type(experts).__name__.startswith("FSDP")
        blocks = [block for _, module in experts.experts() for block in module.blocks]
        assert len(blocks) == 4 and all(type(block).__name__.startswith("FSDP") for block in blocks)
        sharded = dict(trainer.model.trainable.named_parameters())
        plain = dict(trained_run["trainer"].model.trainable.named_parameters())
        assert sharded.keys() == plain.keys()
        for name, want in plain.items():
            torch.testing.assert_close(sharded[name].full_tensor(), want.detach(), rtol=1e-4, atol=1e-6)
    finally:
        trainer.dist.close()


def _two_rank_fsdp_trainer(out, *overrides):
    # one parent per micro-batch: each is one step, so one expert, in an order of the rank's own
    return family_trainer(out, "run.parallel=fsdp", "engine.train_micro_batch=1", *overrides)[1]


def test_two_rank_fsdp_equals_the_plain_run(trained_run):
    """Two gloo processes with FSDP, one prompt each: their training micro-batches route rows to
    different experts, so the experts run in lockstep (Wan22Velocity.in_lockstep) and the update equals the
    one-process run's. Without it the ranks' collectives pair different experts: here (experts of equal
    shapes) nothing fails but the update is wrong (the first LoRA tensor compared: 36 of 96 values off);
    with gradient checkpointing (tests/train/test_config_launch.py) the ranks waited for each other until
    gloo's timeout."""
    from safetensors.torch import load_file
    from test_distributed import run_two

    out = trained_run["root"].parent / "two"
    run_two(out, factory=_two_rank_fsdp_trainer)
    trained = load_file(str(out / "run" / "weights" / "model.safetensors"))
    plain = dict(trained_run["trainer"].model.trainable.named_parameters())
    assert trained.keys() == plain.keys()
    for name, want in plain.items():
        # Adam's first step moves every value by about the learning rate (1e-3), so a wrong expert pairing
        # is off by ~1e-3; a reduction in another order is off by float32 rounding that Adam's division can
        # lift near zero gradients (measured 2.7e-6 on one of 96 values)
        torch.testing.assert_close(trained[name], want.detach(), rtol=1e-4, atol=1e-5)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["processes"] for row in rows if "reward_mean" in row] == [2]
