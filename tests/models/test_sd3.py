"""SD3 / SD3.5: the adapter conformance suite (tests/models/conformance.py) on tiny random models of
the real architectures (SD3.5-style MMDiT-X transformer with RMS q/k norm and a dual-attention block,
CLIP-L/CLIP-G stand-ins with projection, T5, an AutoencoderKL with SD3's scaling/shift factors), plus
what is SD3's own: its stock schedule, classifier-free guidance as one doubled call, the timestep
convention, latent sizes and the folder layout's errors.

The oracle: at η = 0 (pure ODE) our frontier rollout of the SD3 velocity model with
classifier-free guidance (negative prompt, g > 1) reproduces ``StableDiffusion3Pipeline``
(same noise, same σ schedule) — final latents and decoded images — which pins the timestep
(1000·σ), CFG order/mixing, latent layout and VAE conventions to the library's.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from branchgrpo.models.loading import ModelFilesNotFoundError
from branchgrpo.models.sd3 import (
    SD3Adapter,
    SD3FilesNotFoundError,
    SD3Velocity,
    diffusers_sd3_sigmas,
    spec_sigmas_for_pipeline,
)
from branchgrpo.sde import sigma_schedule

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conformance import FamilyCase, conformance_tests  # noqa: E402

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street", "tree", "ugly", "blurry"]
PROMPTS = ["a photo of a cat", "red car on the street", "blue tree"]
NEGATIVE = "ugly blurry"
IMAGE = 16  # pixels; tiny VAE factor 2 → 8×8 latent, patch 2 → 16 tokens
MAX_SEQ = 10
GUIDANCE = 4.5


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


def pipeline_embeds(pipe, prompts: list[str]) -> dict:
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, negative_prompt=NEGATIVE, max_sequence_length=MAX_SEQ)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_pooled}


def load_adapter(folder, cache_dir) -> SD3Adapter:
    return SD3Adapter.from_pretrained(
        folder, dtype=torch.float32, text_encoders="lazy", max_sequence_length=MAX_SEQ, height=IMAGE, width=IMAGE,
        guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, prompt_cache_dir=cache_dir,
    )


CASE = FamilyCase(
    name="sd3",
    components=lambda seed: tiny_components(seed=seed),
    adapter=make_adapter,
    pipeline=sd3_pipeline,
    call=dict(negative_prompt=NEGATIVE, height=IMAGE, width=IMAGE, guidance_scale=GUIDANCE,
              max_sequence_length=MAX_SEQ),
    pipeline_embeds=pipeline_embeds,
    output_shape=(3, IMAGE, IMAGE),
    prompts=tuple(PROMPTS),
    guidance_off={"guidance_scale": 1.0},  # CFG matters: the unguided sample is elsewhere
    adapter_guidance_off={"guidance_scale": 1.0},
    load=load_adapter,
)
globals().update(conformance_tests(CASE))


@pytest.fixture(scope="module")
def components():
    return tiny_components()


# -- schedule and guidance ----------------------------------------------------------------------


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


def test_decode_checks_the_requested_size(components):
    adapter = make_adapter(components)
    z = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(4))
    assert adapter.decode(z, IMAGE, IMAGE).shape == (1, 3, IMAGE, IMAGE)
    with pytest.raises(ValueError, match="do not match"):
        adapter.decode(z, 2 * IMAGE, IMAGE)


# -- the prompt-cache identity -----------------------------------------------------------------


def test_cache_identity_follows_the_text_encoder_configs(components):
    base = make_adapter(components, source="sd35")
    deeper_t5 = make_adapter({**components, "text_encoder_3": tiny_components(t5_layers=2)["text_encoder_3"]},
                             source="sd35")
    assert deeper_t5.encoder_identity != base.encoder_identity


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
