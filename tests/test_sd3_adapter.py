"""SD3Adapter against diffusers' own StableDiffusion3Pipeline, on tiny random models of the real
architectures (SD3.5-style MMDiT-X transformer with RMS q/k norm and a dual-attention block,
CLIP-L/CLIP-G stand-ins with projection, T5, an AutoencoderKL with SD3's scaling/shift factors).

The oracle: at η = 0 (pure ODE) our frontier rollout of the SD3 velocity model with
classifier-free guidance (negative prompt, g > 1) must reproduce ``StableDiffusion3Pipeline``
(same noise, same σ schedule) — final latents and decoded images — which pins the timestep
(1000·σ), CFG order/mixing, latent layout and VAE conventions to the library's.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from branchgrpo.models.loading import ModelFilesNotFoundError
from branchgrpo.models.prompt_cache import PromptNotCachedError
from branchgrpo.models.sd3 import (
    SD3Adapter,
    SD3FilesNotFoundError,
    SD3Velocity,
    diffusers_sd3_sigmas,
    sd3_encoder_config,
    spec_sigmas_for_pipeline,
)
from branchgrpo.sde import sigma_schedule
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.spec import TreeSpec

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street", "tree", "ugly", "blurry"]
PROMPTS = ["a photo of a cat", "red car on the street", "blue tree"]
NEGATIVE = "ugly blurry"
IMAGE = 16  # pixels; tiny VAE factor 2 → 8×8 latent, patch 2 → 16 tokens
MAX_SEQ = 10
GUIDANCE = 4.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
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


def tiny_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),  # SD3.5-M's MMDiT-X features
    ).eval()


def tiny_components(seed: int = 0, t5_layers: int = 1) -> dict:
    """Random SD3 transformer, VAE (SD3's scaling/shift factors), CLIP-L/G and T5 stand-ins."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)

    def clip(hidden: int) -> torch.nn.Module:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=8,
        )).eval()

    text_encoder, text_encoder_2 = clip(8), clip(16)  # 8 + 16 CLIP widths zero-padded to T5's 32
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=64, num_layers=t5_layers, num_heads=2,
        relative_attention_num_buckets=8,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=IMAGE, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    return dict(transformer=tiny_transformer(seed + 1), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                tokenizer_3=tokenizer_3)


def make_adapter(components: dict, **kwargs) -> SD3Adapter:
    kwargs = {"max_sequence_length": MAX_SEQ, "height": IMAGE, "width": IMAGE, "guidance_scale": GUIDANCE,
              "negative_prompt": NEGATIVE, **kwargs}
    return SD3Adapter(**components, **kwargs)


def sd3_pipeline(components: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **components)


@pytest.fixture(scope="module")
def components():
    return tiny_components()


# -- schedule and the oracle ----------------------------------------------------------------------


@pytest.mark.parametrize("steps", [4, 10])
def test_pipeline_sigmas_equal_sigma_schedule(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3.5's scheduler_config.json
    scheduler.set_timesteps(sigmas=spec_sigmas_for_pipeline(steps))
    torch.testing.assert_close(scheduler.sigmas, sigma_schedule(steps, 3.0).float(), rtol=0, atol=1.2e-7)
    torch.testing.assert_close(scheduler.timesteps, 1000 * scheduler.sigmas[:-1], rtol=0, atol=0)


def test_stock_sd3_schedule_differs_from_sigma_schedule():
    """Without ``sigmas=`` the pipeline spaces σ to shift(shift(1/1000)) — documented, not docs/method.md §2."""
    stock = diffusers_sd3_sigmas(10, 3.0)
    ours = sigma_schedule(10, 3.0)
    assert stock[0] == 1 and stock[-1] == 0 and stock.shape == ours.shape
    assert stock[-2] < 0.01 < 0.2 < ours[-2]


@pytest.mark.parametrize("micro_batch", [2, 1])
def test_ode_rollout_reproduces_sd3_pipeline_with_cfg(components, micro_batch):
    steps = 4
    adapter = make_adapter(components)
    conditioning = adapter.encode_prompts(PROMPTS[:2])
    spec = TreeSpec(steps=steps, shift=3.0, eta=0.0, split_plan={})
    tree = rollout(
        adapter.velocity_model(), conditioning, spec, num_prompts=2, latent_shape=adapter.latent_shape(),
        generator=torch.Generator().manual_seed(0), micro_batch=micro_batch,
    )
    noise = tree.latents[0]
    pipe = sd3_pipeline(components)
    call = dict(prompt=PROMPTS[:2], negative_prompt=NEGATIVE, height=IMAGE, width=IMAGE,
                num_inference_steps=steps, sigmas=spec_sigmas_for_pipeline(steps), guidance_scale=GUIDANCE,
                max_sequence_length=MAX_SEQ)
    expected_latents = pipe(latents=noise.clone(), output_type="latent", **call).images
    torch.testing.assert_close(pipe.scheduler.sigmas, sigma_schedule(steps, 3.0).float(), rtol=0, atol=1.2e-7)
    expected_images = pipe(latents=noise.clone(), output_type="pt", **call).images

    final = tree.latents[-1]
    latent_diff = (final - expected_latents).abs().max().item()
    x0_diff = (tree.leaf_x0 - expected_latents).abs().max().item()  # x̂0 of the last step = final at σ_T = 0
    images = adapter.decode(tree.leaf_x0)
    image_diff = (images - expected_images).abs().max().item()
    print(f"micro_batch={micro_batch}: max|Δlatent|={latent_diff:.2e} max|Δx0|={x0_diff:.2e} "
          f"max|Δimage|={image_diff:.2e}")
    assert latent_diff < 1e-5 and x0_diff < 1e-5
    assert image_diff < 1e-5
    assert images.shape == expected_images.shape == (2, 3, IMAGE, IMAGE)
    assert expected_latents.abs().max() > 0.1  # the comparison is not between zeros
    # CFG matters here: the unguided sample is elsewhere.
    unguided = pipe(latents=noise.clone(), output_type="latent", **{**call, "guidance_scale": 1.0}).images
    assert (unguided - expected_latents).abs().max() > 100 * max(latent_diff, 1e-7)


def test_cfg_is_one_doubled_call_equal_to_two_calls(components):
    adapter = make_adapter(components)
    cond = adapter.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    calls: list[int] = []
    hook = adapter.transformer.register_forward_hook(
        lambda _m, _a, kwargs, _o: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        guided = adapter.velocity_model()(x, sigma, cond)
    finally:
        hook.remove()
    assert calls == [4]  # one call on the doubled batch
    plain = adapter.velocity_model(guidance_scale=1.0)
    v_cond = plain(x, sigma, cond)
    v_uncond = plain(x, sigma, {"prompt_embeds": cond["negative_prompt_embeds"],
                                "pooled_prompt_embeds": cond["negative_pooled_prompt_embeds"]})
    torch.testing.assert_close(guided, v_uncond + GUIDANCE * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        adapter.velocity_model()(x, sigma, {k: cond[k] for k in ("prompt_embeds", "pooled_prompt_embeds")})


def test_timestep_is_1000_sigma(components):
    seen = []
    transformer = components["transformer"]
    hook = transformer.register_forward_hook(lambda _m, _a, kw, _o: seen.append(kw["timestep"]), with_kwargs=True)
    try:
        adapter = make_adapter(components)
        cond = adapter.encode_prompts(PROMPTS[:1])
        SD3Velocity(transformer, guidance_scale=1.0)(torch.zeros(1, 4, 8, 8), torch.tensor([0.25]), cond)
    finally:
        hook.remove()
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [250.0]


# -- shapes, decoding --------------------------------------------------------------------------


def test_latent_shape_and_size_checks(components):
    adapter = make_adapter(components)
    assert adapter.vae_scale_factor == 2 and adapter.patch_size == 2
    assert adapter.latent_shape() == (4, 8, 8)
    assert adapter.latent_shape(16, 32) == (4, 8, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        adapter.latent_shape(18, 16)
    assert adapter.velocity_model().compute_dtype is None  # float32 on CPU
    with pytest.raises(ValueError, match="multiple of 4"):
        adapter.velocity_model(18, 16)
    assert SD3Adapter().latent_shape(512, 512) == (16, 64, 64)  # SD3.5 defaults without modules


def test_decode_is_batched_and_in_unit_range(components):
    adapter = make_adapter(components)
    z = 2.0 * torch.randn(5, *adapter.latent_shape(), generator=torch.Generator().manual_seed(4))
    whole = adapter.decode(z, batch_size=5)
    pieces = adapter.decode(z, batch_size=2)
    assert whole.shape == (5, 3, IMAGE, IMAGE) and whole.dtype == torch.float32
    assert whole.min() >= 0 and whole.max() <= 1
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-6)
    assert adapter.decode(z[:1], IMAGE, IMAGE).shape == (1, 3, IMAGE, IMAGE)
    with pytest.raises(ValueError, match="do not match"):
        adapter.decode(z[:1], 2 * IMAGE, IMAGE)


# -- prompt encoding and the cache -------------------------------------------------------------


def test_encode_prompts_equals_pipeline_encode_prompt(components):
    adapter = make_adapter(components)
    ours = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = sd3_pipeline(components).encode_prompt(
            PROMPTS, None, None, negative_prompt=NEGATIVE, max_sequence_length=MAX_SEQ)
    assert ours["prompt_embeds"].shape == (3, 12 + MAX_SEQ, 32) and ours["pooled_prompt_embeds"].shape == (3, 16)
    assert set(ours) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                         "negative_pooled_prompt_embeds"}
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    # the negative prompt is encoded once (batch of 1) and repeated; the pipeline encodes P copies
    torch.testing.assert_close(ours["negative_prompt_embeds"], neg, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["negative_pooled_prompt_embeds"], neg_pooled, rtol=0, atol=1e-6)
    no_cfg = make_adapter(components, guidance_scale=1.0).encode_prompts(PROMPTS[:1])
    assert set(no_cfg) == {"prompt_embeds", "pooled_prompt_embeds"}


def test_preprocessed_cache_serves_an_adapter_without_text_encoders(components, tmp_path):
    encoder = make_adapter(components)
    report = encoder.preprocess_prompts(PROMPTS, tmp_path, batch_size=2)
    assert (report.unique_prompts, report.encoded) == (4, 4)  # the prompts and the negative prompt
    trainer_side = make_adapter(
        {**components, "text_encoder": None, "text_encoder_2": None, "text_encoder_3": None},
        prompt_cache_dir=tmp_path, encoder_config=encoder.encoder_config,
    )
    cached = trainer_side.encode_prompts(PROMPTS)
    direct = encoder.encode_prompts(PROMPTS)
    assert set(cached) == set(direct)
    for name in direct:
        torch.testing.assert_close(cached[name], direct[name], rtol=0, atol=1e-6)
    with pytest.raises(PromptNotCachedError, match="branchgrpo preprocess"):
        trainer_side.encode_prompts(["a dog"])


def test_cache_identity_follows_the_encoders(components):
    base = make_adapter(components, source="sd35")
    others = [
        make_adapter(components, source="other"),
        make_adapter(components, source="sd35", max_sequence_length=MAX_SEQ - 1),
        make_adapter({**components, "text_encoder_3": tiny_components(t5_layers=2)["text_encoder_3"]}, source="sd35"),
    ]
    assert len({base.encoder_identity} | {o.encoder_identity for o in others}) == 4


# -- loading ----------------------------------------------------------------------------------


def save_layout(components: dict, folder, scheduler: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler

    for name, part in components.items():
        part.save_pretrained(folder / name)
    if scheduler:
        FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")


def test_missing_folder_raises_a_download_hint(tmp_path):
    with pytest.raises(ModelFilesNotFoundError) as info:
        SD3Adapter.from_pretrained(tmp_path / "sd35", dtype=torch.float32)
    assert isinstance(info.value, SD3FilesNotFoundError)
    message = str(info.value)
    assert "stabilityai/stable-diffusion-3.5-medium" in message and "hf download" in message
    assert "text_encoder_3/" in message and str(tmp_path / "sd35") in message and "FLUX" not in message


def test_missing_subfolder_and_shard_are_named(components, tmp_path):
    save_layout(components, tmp_path)
    for path in (tmp_path / "vae").glob("*.safetensors"):
        path.unlink()
    (tmp_path / "text_encoder_3" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors"}}'
    )
    shutil.rmtree(tmp_path / "tokenizer_3")
    with pytest.raises(SD3FilesNotFoundError) as info:
        SD3Adapter.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(info.value)
    assert "tokenizer_3/" in message and "vae/*.safetensors" in message
    assert "model-00001-of-00002.safetensors" in message and "Traceback" not in message


def test_hub_id_offline_without_a_download_raises(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SD3FilesNotFoundError, match="stabilityai/stable-diffusion-3.5-medium"):
        SD3Adapter.from_pretrained("stabilityai/stable-diffusion-3.5-medium", local_files_only=True)


def test_from_pretrained_round_trip_with_lazy_text_encoders(components, tmp_path):
    save_layout(components, tmp_path)
    loaded = SD3Adapter.from_pretrained(
        tmp_path, dtype=torch.float32, text_encoders="lazy", max_sequence_length=MAX_SEQ, height=IMAGE,
        width=IMAGE, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, prompt_cache_dir=tmp_path / "cache",
    )
    in_memory = make_adapter(components, source=str(tmp_path.resolve()))
    assert loaded.text_encoder is None and loaded.text_encoder_3 is None
    assert loaded.encoder_config == sd3_encoder_config(
        components["text_encoder"].config, components["text_encoder_2"].config, components["text_encoder_3"].config,
        components["tokenizer"], components["tokenizer_2"], components["tokenizer_3"], MAX_SEQ, torch.float32,
    )
    assert loaded.encoder_identity == in_memory.encoder_identity
    first = loaded.encode_prompts(PROMPTS[:2])  # a miss: loads the text encoders now
    assert loaded.text_encoder_3 is not None
    expected = in_memory.encode_prompts(PROMPTS[:2])
    for name in expected:  # a reloaded CLIP projection may pick another matmul kernel: 1-ulp differences
        torch.testing.assert_close(first[name], expected[name], rtol=0, atol=1e-6)
    x = torch.randn(2, *loaded.latent_shape(), generator=torch.Generator().manual_seed(5))
    sigma = torch.full((2,), 0.5)
    torch.testing.assert_close(
        loaded.velocity_model()(x, sigma, first), in_memory.velocity_model()(x, sigma, first), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(loaded.decode(x), in_memory.decode(x), rtol=0, atol=1e-6)
