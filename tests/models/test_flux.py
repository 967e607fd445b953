"""FLUX.1: the adapter conformance suite (tests/models/conformance.py) on tiny random models of the
real architectures, plus what is FLUX's own: the σ schedule and its resolution-dependent shift, the
guidance embedding (with and without), packed-latent sizes and the folder layout's errors.

The oracle: at η = 0 (pure ODE) our frontier rollout of the FLUX velocity model reproduces
``FluxPipeline`` (same noise, same σ schedule) — final latents and decoded images — which pins the
timestep, packing, position-id and guidance conventions to the library's.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from branchgrpo.models.flux import FluxAdapter, diffusers_dynamic_shift
from branchgrpo.models.loading import ModelFilesNotFoundError, missing_files
from branchgrpo.sde import sigma_schedule

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conformance import FamilyCase, check_oracle, conformance_tests, save_layout  # noqa: E402

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street", "tree"]
PROMPTS = ["a photo of a cat", "red car on the street", "blue tree"]
IMAGE = 16  # pixels; tiny VAE factor 2 → 8×8 latent → 16 packed tokens
MAX_SEQ = 10
GUIDANCE = 4.0  # the embedded guidance of FLUX.1-dev-style transformers


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
    kwargs = {"max_sequence_length": MAX_SEQ, "height": IMAGE, "width": IMAGE, "guidance_scale": GUIDANCE, **kwargs}
    return FluxAdapter(**components, **kwargs)


def flux_pipeline(components: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, **components)


def pipeline_embeds(pipe, prompts: list[str]) -> dict:
    embeds, pooled, _text_ids = pipe.encode_prompt(prompts, max_sequence_length=MAX_SEQ)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def load_adapter(folder, cache_dir) -> FluxAdapter:
    return FluxAdapter.from_pretrained(folder, dtype=torch.float32, text_encoders="lazy", max_sequence_length=MAX_SEQ,
                                       height=IMAGE, width=IMAGE, guidance_scale=GUIDANCE, prompt_cache_dir=cache_dir)


CASE = FamilyCase(
    name="flux",
    components=lambda seed: tiny_components(guidance=True, seed=seed),  # FLUX.1-dev embeds its guidance
    adapter=make_adapter,
    pipeline=flux_pipeline,
    call=dict(height=IMAGE, width=IMAGE, guidance_scale=GUIDANCE, max_sequence_length=MAX_SEQ),
    pipeline_embeds=pipeline_embeds,
    output_shape=(3, IMAGE, IMAGE),
    prompts=tuple(PROMPTS),
    guidance_off={"guidance_scale": 1.0},  # another guidance embedding: another sample
    load=load_adapter,
)
globals().update(conformance_tests(CASE))


@pytest.fixture(scope="module")
def components():
    return tiny_components(guidance=False)


# -- schedule and guidance ------------------------------------------------------------------------


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


def test_ode_rollout_reproduces_flux_pipeline_without_guidance_embedding():
    """The conformance oracle on a transformer without a guidance embedding (FLUX.1-schnell style)."""
    plain = dataclasses.replace(CASE, components=lambda seed: tiny_components(guidance=False, seed=seed),
                                guidance_off=None)
    check_oracle(plain, micro_batch=1)


def test_guidance_scale_reaches_the_transformer():
    adapter = make_adapter(tiny_components(guidance=True, seed=2))
    conditioning = adapter.encode_prompts(PROMPTS[:1])
    x = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(3))
    sigma = torch.full((1,), 0.7)
    low = adapter.velocity_model(guidance_scale=1.0)(x, sigma, conditioning)
    high = adapter.velocity_model(guidance_scale=5.0)(x, sigma, conditioning)
    assert not torch.allclose(low, high)


# -- sizes, the prompt-cache identity -------------------------------------------------------------


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


def test_cache_identity_follows_the_text_encoder_configs(components):
    source = "black-forest-labs/FLUX.1-dev"
    base = make_adapter(components, source=source)
    assert base.encoder_identity.startswith("black-forest-labs_FLUX.1-dev--")
    deeper_t5 = make_adapter({**components, "text_encoder_2": tiny_components(t5_layers=2)["text_encoder_2"]},
                             source=source)
    assert deeper_t5.encoder_identity != base.encoder_identity


# -- loading ----------------------------------------------------------------------------------


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
