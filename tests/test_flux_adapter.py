"""FluxAdapter against diffusers' own FluxPipeline, on tiny random models of the real architectures.

The oracle: at η = 0 (pure ODE) our frontier rollout of the FLUX velocity model must reproduce
``FluxPipeline`` (same noise, same σ schedule) — final latents and decoded images — which pins the
timestep, packing, position-id and guidance conventions to the library's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from branchgrpo.models.flux import FluxAdapter, diffusers_dynamic_shift, flux_encoder_config
from branchgrpo.models.loading import ModelFilesNotFoundError, missing_files
from branchgrpo.models.prompt_cache import PromptNotCachedError, preprocess_prompts
from branchgrpo.sde import sigma_schedule
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.spec import TreeSpec

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street", "tree"]
PROMPTS = ["a photo of a cat", "red car on the street", "blue tree"]
IMAGE = 16  # pixels; tiny VAE factor 2 → 8×8 latent → 16 packed tokens
MAX_SEQ = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls on a shared 2-core machine: OpenMP thread hand-off costs ~1000× the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clip_tokenizer():
    """A byte-pair CLIP tokenizer whose merges spell out every word of WORDS."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1]] + parts[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=12)


def t5_tokenizer():
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_components(guidance: bool = False, seed: int = 0, t5_layers: int = 1) -> dict:
    """Random FLUX transformer, VAE (FLUX's scaling/shift factors), CLIP-L and T5 stand-ins."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=t5_layers, num_heads=2,
        relative_attention_num_buckets=8,
    )).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=guidance, axes_dims_rope=[4, 6, 6],
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=IMAGE, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def make_adapter(components: dict, **kwargs) -> FluxAdapter:
    kwargs = {"max_sequence_length": MAX_SEQ, "height": IMAGE, "width": IMAGE, **kwargs}
    return FluxAdapter(**components, **kwargs)


def flux_pipeline(components: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, **components)


@pytest.fixture(scope="module")
def components():
    return tiny_components(guidance=False)


# -- schedule and the oracle ----------------------------------------------------------------------


@pytest.mark.parametrize("steps", [4, 20])
def test_sigma_schedule_equals_scheduler_sigmas(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))  # FluxPipeline's default sigmas
    ours = sigma_schedule(steps, 3.0).float()
    # The scheduler holds float32: one rounding of each σ.
    torch.testing.assert_close(scheduler.sigmas, ours, rtol=0, atol=float(torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("resolution", [512, 720, 1024])
def test_dynamic_shift_reproduces_flux_dev_default_schedule(resolution):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    steps = 20
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config.json
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True,
    )
    mu = calculate_shift((resolution // 16) ** 2)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    shift = diffusers_dynamic_shift(resolution, resolution)
    assert shift == pytest.approx(np.exp(mu))
    ours = sigma_schedule(steps, shift).float()
    torch.testing.assert_close(scheduler.sigmas, ours, rtol=0, atol=float(torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("guidance", [False, True])
def test_ode_rollout_reproduces_flux_pipeline(guidance):
    steps, guidance_scale = 4, 4.0
    parts = tiny_components(guidance=guidance, seed=1)
    adapter = make_adapter(parts, guidance_scale=guidance_scale)
    conditioning = adapter.encode_prompts(PROMPTS[:2])
    spec = TreeSpec(steps=steps, shift=3.0, eta=0.0, split_plan={})
    tree = rollout(
        adapter.velocity_model(), conditioning, spec, num_prompts=2, latent_shape=adapter.latent_shape(),
        generator=torch.Generator().manual_seed(0), micro_batch=1,
    )
    noise = tree.latents[0]
    pipe = flux_pipeline(parts)
    call = dict(prompt=PROMPTS[:2], height=IMAGE, width=IMAGE, num_inference_steps=steps,
                guidance_scale=guidance_scale, max_sequence_length=MAX_SEQ)
    expected_latents = pipe(latents=noise.clone(), output_type="latent", **call).images
    torch.testing.assert_close(pipe.scheduler.sigmas, sigma_schedule(steps, 3.0).float(), rtol=0, atol=1.2e-7)
    expected_images = pipe(latents=noise.clone(), output_type="pt", **call).images

    final = tree.latents[-1]
    latent_diff = (final - expected_latents).abs().max().item()
    x0_diff = (tree.leaf_x0 - expected_latents).abs().max().item()  # x̂0 of the last step = final at σ_T = 0
    images = adapter.decode(tree.leaf_x0)
    image_diff = (images - expected_images).abs().max().item()
    print(f"guidance={guidance}: max|Δlatent|={latent_diff:.2e} max|Δx0|={x0_diff:.2e} max|Δimage|={image_diff:.2e}")
    # float32 (eps 1.2e-7) on O(1) latents over 4 steps; σ and t/1000 round differently by ~1 ulp.
    assert latent_diff < 1e-5 and x0_diff < 1e-5
    assert image_diff < 1e-5
    assert images.shape == expected_images.shape == (2, 3, IMAGE, IMAGE)
    assert expected_latents.abs().max() > 0.1  # the comparison is not between zeros


def test_guidance_scale_reaches_the_transformer():
    adapter = make_adapter(tiny_components(guidance=True, seed=2))
    conditioning = adapter.encode_prompts(PROMPTS[:1])
    x = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(3))
    sigma = torch.full((1,), 0.7)
    low = adapter.velocity_model(guidance_scale=1.0)(x, sigma, conditioning)
    high = adapter.velocity_model(guidance_scale=5.0)(x, sigma, conditioning)
    assert not torch.allclose(low, high)


# -- shapes, decoding --------------------------------------------------------------------------


def test_latent_shape_and_size_checks(components):
    adapter = make_adapter(components)
    assert adapter.vae_scale_factor == 2
    assert adapter.latent_size(16, 32) == (8, 16)
    assert adapter.latent_shape(16, 32) == (4 * 8, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        adapter.latent_shape(18, 16)
    velocity = adapter.velocity_model(16, 32)
    assert (velocity.latent_height, velocity.latent_width) == (8, 16)
    assert velocity.compute_dtype is None  # float32 on CPU


def test_decode_is_batched_and_in_unit_range(components):
    adapter = make_adapter(components)
    packed = 2.0 * torch.randn(5, *adapter.latent_shape(), generator=torch.Generator().manual_seed(4))
    whole = adapter.decode(packed, batch_size=5)
    pieces = adapter.decode(packed, batch_size=2)
    assert whole.shape == (5, 3, IMAGE, IMAGE) and whole.dtype == torch.float32
    assert whole.min() >= 0 and whole.max() <= 1
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-6)


# -- prompt encoding and the cache -------------------------------------------------------------


def _count_calls(module: torch.nn.Module, calls: list[int]):
    return module.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))


def test_encode_prompts_equals_pipeline_encode_prompt(components):
    adapter = make_adapter(components)
    ours = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():  # as FluxPipeline.__call__; grad mode picks other CPU kernels (±1 ulp)
        embeds, pooled, _ = flux_pipeline(components).encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ)
    assert ours["prompt_embeds"].shape == (3, MAX_SEQ, 32) and ours["pooled_prompt_embeds"].shape == (3, 16)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)


def test_cache_hit_skips_encoders_and_returns_identical_tensors(components, tmp_path):
    adapter = make_adapter(components, prompt_cache_dir=tmp_path)
    clip_calls, t5_calls = [], []
    hooks = [_count_calls(adapter.text_encoder, clip_calls), _count_calls(adapter.text_encoder_2, t5_calls)]
    try:
        first = adapter.encode_prompts(PROMPTS[:2])
        assert clip_calls == [2] and t5_calls == [2]
        second = adapter.encode_prompts(PROMPTS[:2])
        assert clip_calls == [2] and t5_calls == [2]  # no encoder call on a hit
        for name in first:
            assert torch.equal(first[name], second[name])
        mixed = adapter.encode_prompts([PROMPTS[2], PROMPTS[0], PROMPTS[2]])
        assert t5_calls == [2, 1]  # only the new prompt, once
        assert torch.equal(mixed["prompt_embeds"][1], first["prompt_embeds"][0])
        assert torch.equal(mixed["prompt_embeds"][0], mixed["prompt_embeds"][2])
    finally:
        for hook in hooks:
            hook.remove()
    files = sorted(p.name for p in (tmp_path / adapter.encoder_identity).rglob("*") if p.is_file())
    assert len([f for f in files if f.endswith(".safetensors")]) == 3
    assert "identity.json" in files and not [f for f in files if f.endswith(".tmp")]


def test_cache_identity_follows_the_encoders(components):
    base = make_adapter(components, source="black-forest-labs/FLUX.1-dev")
    assert base.encoder_identity == make_adapter(components, source="black-forest-labs/FLUX.1-dev").encoder_identity
    assert base.encoder_identity.startswith("black-forest-labs_FLUX.1-dev--")
    others = [
        make_adapter(components, source="/models/other-flux"),
        make_adapter(components, source="black-forest-labs/FLUX.1-dev", max_sequence_length=MAX_SEQ - 1),
        make_adapter({**components, "text_encoder_2": tiny_components(t5_layers=2)["text_encoder_2"]},
                     source="black-forest-labs/FLUX.1-dev"),
    ]
    identities = {base.encoder_identity} | {other.encoder_identity for other in others}
    assert len(identities) == 4


def test_preprocessed_cache_serves_an_adapter_without_text_encoders(components, tmp_path):
    encoder = make_adapter(components)
    report = preprocess_prompts(encoder, PROMPTS + PROMPTS[:1], tmp_path, batch_size=2)
    assert (report.prompts, report.unique_prompts, report.encoded, report.already_cached) == (4, 3, 3, 0)
    assert preprocess_prompts(encoder, PROMPTS, tmp_path).encoded == 0

    trainer_side = make_adapter(
        {**components, "text_encoder": None, "text_encoder_2": None},
        prompt_cache_dir=tmp_path, encoder_config=encoder.encoder_config,
    )
    cached = trainer_side.encode_prompts(PROMPTS)
    direct = encoder.encode_prompts(PROMPTS)
    for name in direct:
        torch.testing.assert_close(cached[name], direct[name], rtol=0, atol=0)
    with pytest.raises(PromptNotCachedError, match="branchgrpo preprocess"):
        trainer_side.encode_prompts(["a dog"])


# -- loading ----------------------------------------------------------------------------------


def save_layout(components: dict, folder):
    for name, part in components.items():
        part.save_pretrained(folder / name)


def test_missing_folder_raises_a_download_hint(tmp_path):
    with pytest.raises(ModelFilesNotFoundError) as info:
        FluxAdapter.from_pretrained(tmp_path / "FLUX.1-dev", dtype=torch.float32)
    message = str(info.value)
    assert "black-forest-labs/FLUX.1-dev" in message and "hf download" in message
    assert "text_encoder_2/" in message and str(tmp_path / "FLUX.1-dev") in message


def test_missing_subfolder_and_shard_are_named(components, tmp_path):
    save_layout(components, tmp_path)
    assert missing_files(tmp_path, components) == []
    for path in (tmp_path / "vae").glob("*.safetensors"):
        path.unlink()
    (tmp_path / "text_encoder_2" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors"}}'
    )
    import shutil

    shutil.rmtree(tmp_path / "tokenizer_2")
    with pytest.raises(ModelFilesNotFoundError) as info:
        FluxAdapter.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(info.value)
    assert "tokenizer_2/" in message and "vae/*.safetensors" in message
    assert "model-00001-of-00002.safetensors" in message
    assert "Traceback" not in message


def test_hub_id_offline_without_a_download_raises(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelFilesNotFoundError, match="black-forest-labs/FLUX.1-dev"):
        FluxAdapter.from_pretrained("black-forest-labs/FLUX.1-dev", local_files_only=True)


def test_from_pretrained_round_trip_with_lazy_text_encoders(components, tmp_path):
    save_layout(components, tmp_path)
    loaded = FluxAdapter.from_pretrained(
        tmp_path, dtype=torch.float32, text_encoders="lazy", max_sequence_length=MAX_SEQ,
        height=IMAGE, width=IMAGE, prompt_cache_dir=tmp_path / "cache",
    )
    in_memory = make_adapter(components, source=str(tmp_path.resolve()))
    assert loaded.text_encoder is None and loaded.text_encoder_2 is None
    assert loaded.encoder_config == flux_encoder_config(
        components["text_encoder"].config, components["text_encoder_2"].config, components["tokenizer"],
        components["tokenizer_2"], MAX_SEQ, torch.float32,
    )
    assert loaded.encoder_identity == in_memory.encoder_identity  # same cache folder either way

    first = loaded.encode_prompts(PROMPTS[:2])  # a miss: loads the text encoders now
    assert loaded.text_encoder_2 is not None
    expected = in_memory.encode_prompts(PROMPTS[:2])
    for name in expected:
        torch.testing.assert_close(first[name], expected[name], rtol=0, atol=0)
    x = torch.randn(2, *loaded.latent_shape(), generator=torch.Generator().manual_seed(5))
    sigma = torch.full((2,), 0.5)
    torch.testing.assert_close(
        loaded.velocity_model()(x, sigma, first), in_memory.velocity_model()(x, sigma, first), rtol=0, atol=0
    )
    torch.testing.assert_close(loaded.decode(x), in_memory.decode(x), rtol=0, atol=0)
