"""Z-Image / Z-Image-Turbo: the adapter conformance suite (tests/models/conformance.py) on tiny random
models of the real classes (ZImageTransformer2DModel with refiners, RMS q/k norm and 3-axis RoPE; a
Qwen3Model text encoder behind a byte-level Qwen2Tokenizer with a Qwen-style chat template; an
AutoencoderKL with Z-Image's 16 latent channels, 8× factor and scaling/shift factors), plus what is
Z-Image's own: the timestep ``1 − σ`` and the negated output, its guidance formula (on for g > 0,
``cfg_normalization``, ``cfg_truncation``), captions of different lengths, LoRA targets, ``branchgrpo
preprocess``, the folder layout's errors and the shipped config.

The oracle: at η = 0 (pure ODE) our frontier rollout of the Z-Image velocity model reproduces
``ZImagePipeline`` on the same σ and noise — final latents and decoded images — with guidance (the
suite's case), without (Turbo) and with ``cfg_normalization`` + ``cfg_truncation`` (variants below).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.families import get_family
from branchgrpo.families.zimage import ZImageOptions
from branchgrpo.models.loading import ModelFilesNotFoundError
from branchgrpo.models.zimage import (
    ZImageAdapter,
    ZImageFilesNotFoundError,
    pad_captions,
    unpad_captions,
    zimage_encoder_config,
)
from branchgrpo.train.config import load_train_config

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conformance import FamilyCase, check_oracle, conformance_tests, make_trainer, save_layout  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ("a photo of a cat", "red car", "blue tree on the street")  # 35, 26 and 42 tokens with the template
NEGATIVE = "ugly blurry"
HEIGHT, WIDTH = 32, 48  # VAE 8× → latent [16, 4, 6]; patch 2 → 6 image tokens
MAX_SEQ = 48
GUIDANCE = 3.0
CHAT_TEMPLATE = (  # Qwen3's template, reduced to what ZImagePipeline uses (user turn, generation prompt, thinking)
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer(template: str = CHAT_TEMPLATE):
    """A byte-level BPE Qwen2Tokenizer (one token per byte) with the chat-template special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = template
    return tokenizer


def tiny_components(seed: int = 0, text_layers: int = 2) -> dict:
    """Random Z-Image transformer, AutoencoderKL (Z-Image's factors) and Qwen3 text encoder."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
    )).eval()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
        latent_channels=16, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def make_adapter(components: dict, **kwargs) -> ZImageAdapter:
    kwargs = {"max_sequence_length": MAX_SEQ, "height": HEIGHT, "width": WIDTH, "guidance_scale": GUIDANCE,
              "negative_prompt": NEGATIVE, "decode_batch_size": 4, **kwargs}
    return ZImageAdapter(**components, **kwargs)


def zimage_pipeline(components: dict, shift: float = 3.0):
    """``ZImagePipeline`` with Z-Image's static-shift Euler scheduler (the suite passes docs/method.md §2's sigmas=)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False),
                          **components)


class FreshLists(Mapping):
    """Pipeline kwargs whose list values are copied on every read: ZImagePipeline (diffusers 0.42) writes
    the chat-templated text back into the prompt lists it is given, so a reused list is templated twice."""

    def __init__(self, **values):
        self._values = values

    def __getitem__(self, key):
        value = self._values[key]
        return list(value) if isinstance(value, list) else value

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)


def padded(captions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's caption list as [P, MAX_SEQ, D] zeros-after-the-caption + a 1/0 mask (written out here)."""
    embeds = torch.zeros(len(captions), MAX_SEQ, captions[0].shape[-1])
    mask = torch.zeros(len(captions), MAX_SEQ)
    for row, caption in enumerate(captions):
        embeds[row, : len(caption)] = caption
        mask[row, : len(caption)] = 1.0
    return embeds, mask


def pipeline_embeds(pipe, prompts: list[str]) -> dict:
    captions, negative = pipe.encode_prompt(list(prompts), negative_prompt=[NEGATIVE] * len(prompts),
                                            max_sequence_length=MAX_SEQ, device=torch.device("cpu"))
    (embeds, mask), (negative_embeds, negative_mask) = padded(captions), padded(negative)
    return {"prompt_embeds": embeds, "prompt_mask": mask, "negative_prompt_embeds": negative_embeds,
            "negative_prompt_mask": negative_mask}


def load_adapter(folder, cache_dir) -> ZImageAdapter:
    return ZImageAdapter.from_pretrained(
        folder, dtype=torch.float32, text_encoders="lazy", max_sequence_length=MAX_SEQ, height=HEIGHT, width=WIDTH,
        guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, prompt_cache_dir=cache_dir,
    )


CASE = FamilyCase(
    name="zimage",
    components=lambda seed: tiny_components(seed=seed),
    adapter=make_adapter,
    pipeline=zimage_pipeline,
    call=FreshLists(negative_prompt=[NEGATIVE] * 2, height=HEIGHT, width=WIDTH, guidance_scale=GUIDANCE,
                    max_sequence_length=MAX_SEQ),
    pipeline_embeds=pipeline_embeds,
    output_shape=(3, HEIGHT, WIDTH),
    prompts=PROMPTS,
    guidance_off={"guidance_scale": 0.0},  # guidance matters: the unguided sample is elsewhere
    adapter_guidance_off={"guidance_scale": 0.0},  # Z-Image: 0 is off (1 is not)
    load=load_adapter,
    decode_atol=5e-6,  # the VAE picks other conv kernels per batch size: float32 rounding (measured 1.25e-6)
)
globals().update(conformance_tests(CASE))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def components():
    return tiny_components()


def random_latents(adapter: ZImageAdapter, count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, *adapter.latent_shape(), generator=torch.Generator().manual_seed(seed))


# -- oracle variants: Turbo (no guidance), normalised + truncated guidance ---------------------------


def test_ode_rollout_reproduces_the_pipeline_without_guidance():
    turbo = dataclasses.replace(
        CASE, adapter=lambda comps, **kw: make_adapter(comps, **{"guidance_scale": 0.0, **kw}),
        call=FreshLists(**{**CASE.call, "guidance_scale": 0.0}), guidance_off=None,
    )
    check_oracle(turbo, micro_batch=2)


def test_ode_rollout_reproduces_the_pipeline_with_cfg_normalization_and_truncation():
    # 1 − σ on the 4-step grid: 0, .1, .25, .5 → truncation 0.2 leaves the last two steps unguided
    options = {"cfg_normalization": 1.0, "cfg_truncation": 0.2}
    variant = dataclasses.replace(
        CASE, adapter=lambda comps, **kw: make_adapter(comps, **{**options, **kw}),
        call=FreshLists(**{**CASE.call, **options}), guidance_off={"cfg_normalization": 0.0, "cfg_truncation": 1.0},
    )
    check_oracle(variant, micro_batch=1)  # guidance_off here: both options must move the sample


# -- the velocity conventions ---------------------------------------------------------------------


def transformer_calls(transformer):
    """Record (timesteps, per-row caption lengths, outputs) of every transformer call."""
    calls = []
    hook = transformer.register_forward_hook(
        lambda _m, args, _kw, out: calls.append((args[1].clone(), [len(c) for c in args[2]], out[0])),
        with_kwargs=True,
    )
    return calls, hook


def test_timestep_is_one_minus_sigma_and_the_output_is_negated(components):
    adapter = make_adapter(components, guidance_scale=0.0)
    cond = adapter.encode_prompts(PROMPTS[:2])
    x = random_latents(adapter, 2, seed=1)
    calls, hook = transformer_calls(adapter.transformer)
    try:
        v = adapter.velocity_model()(x, torch.tensor([0.25, 0.9]), cond)
    finally:
        hook.remove()
    (timesteps, lengths, out), = calls
    assert timesteps.dtype == torch.float32
    torch.testing.assert_close(timesteps, torch.tensor([0.75, 0.1]), rtol=0, atol=1e-6)  # clean = 1, noise = 0
    assert lengths == [35, 26]  # each caption at its own length: no padding reaches the transformer
    torch.testing.assert_close(v, -torch.stack(out).squeeze(2), rtol=0, atol=0)


def test_guidance_is_zimage_formula_in_one_call_positive_rows_first(components):
    adapter = make_adapter(components)
    cond = adapter.encode_prompts(PROMPTS[:2])
    x, sigma = random_latents(adapter, 2, seed=2), torch.tensor([0.8, 0.3])
    calls, hook = transformer_calls(adapter.transformer)
    try:
        guided = adapter.velocity_model()(x, sigma, cond)
    finally:
        hook.remove()
    (_, lengths, _), = calls
    negative_length = int(cond["negative_prompt_mask"][0].sum())
    assert lengths == [35, 26, negative_length, negative_length]  # one call, [positive; negative]
    plain = adapter.velocity_model(guidance_scale=0.0)
    v_c = plain(x, sigma, cond)
    v_u = plain(x, sigma, {"prompt_embeds": cond["negative_prompt_embeds"], "prompt_mask": cond["negative_prompt_mask"]})
    torch.testing.assert_close(guided, v_c + GUIDANCE * (v_c - v_u), rtol=1e-5, atol=1e-5)
    # g = 1 is guidance (2·v_c − v_u), not "off" as in SD3's convention
    torch.testing.assert_close(adapter.velocity_model(guidance_scale=1.0)(x, sigma, cond), 2 * v_c - v_u,
                               rtol=1e-5, atol=1e-5)
    assert (v_c - v_u).abs().max() > 1e-3
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        adapter.velocity_model()(x, sigma, {k: cond[k] for k in ("prompt_embeds", "prompt_mask")})


def test_cfg_truncation_and_normalization_per_row(components):
    adapter = make_adapter(components)
    cond = adapter.encode_prompts(PROMPTS[:2])
    x, sigma = random_latents(adapter, 2, seed=3), torch.tensor([0.8, 0.3])  # 1 − σ = 0.2, 0.7
    plain = adapter.velocity_model(guidance_scale=0.0)
    negative = {"prompt_embeds": cond["negative_prompt_embeds"], "prompt_mask": cond["negative_prompt_mask"]}
    v_c, v_u = plain(x, sigma, cond), plain(x, sigma, negative)
    calls, hook = transformer_calls(adapter.transformer)
    try:
        truncated = adapter.velocity_model(cfg_truncation=0.5)(x, sigma, cond)
    finally:
        hook.remove()
    assert len(calls[0][1]) == 3  # row 1 (1 − σ = 0.7 > 0.5) runs without its negative
    torch.testing.assert_close(truncated[0], (v_c + GUIDANCE * (v_c - v_u))[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(truncated[1], v_c[1], rtol=1e-5, atol=1e-5)
    # normalisation: the guided velocity's norm is capped at c·‖v_c‖ per image (ZImagePipeline's renorm)
    for c in (0.5, 1.0, 100.0):
        normalized = adapter.velocity_model(cfg_normalization=c)(x, sigma, cond)
        mixed = v_c + GUIDANCE * (v_c - v_u)
        for row in range(2):
            cap = c * v_c[row].norm()
            expected = mixed[row] * (cap / mixed[row].norm()) if mixed[row].norm() > cap else mixed[row]
            torch.testing.assert_close(normalized[row], expected, rtol=1e-5, atol=1e-5)
    assert (adapter.velocity_model(cfg_normalization=1.0)(x, sigma, cond)[0].norm() - v_c[0].norm()).abs() < 1e-4


def test_padding_never_reaches_the_transformer(components):
    adapter = make_adapter(components, guidance_scale=0.0)
    cond = adapter.encode_prompts(PROMPTS[:2])
    x, sigma = random_latents(adapter, 2, seed=4), torch.tensor([0.6, 0.6])
    v = adapter.velocity_model()(x, sigma, cond)
    garbage = cond["prompt_embeds"].clone()
    garbage[cond["prompt_mask"] == 0] = 7.0
    torch.testing.assert_close(adapter.velocity_model()(x, sigma, {**cond, "prompt_embeds": garbage}), v,
                               rtol=0, atol=0)
    longer = make_adapter(components, guidance_scale=0.0, max_sequence_length=MAX_SEQ + 16).encode_prompts(PROMPTS[:2])
    torch.testing.assert_close(adapter.velocity_model()(x, sigma, longer), v, rtol=0, atol=1e-6)
    # a batch of one row is the same as that row of a batch of two (per-row captions, masked attention)
    torch.testing.assert_close(adapter.velocity_model()(x[1:], sigma[1:], {k: t[1:] for k, t in cond.items()}),
                               v[1:], rtol=0, atol=1e-5)


def test_pad_and_unpad_captions_round_trip():
    captions = [torch.randn(3, 4), torch.randn(1, 4)]
    embeds, mask = pad_captions(captions, 5)
    assert embeds.shape == (2, 5, 4) and mask.dtype == torch.float32
    assert mask.tolist() == [[1.0] * 3 + [0.0] * 2, [1.0] + [0.0] * 4]
    assert embeds[0, 3:].abs().max() == 0 and embeds[1, 1:].abs().max() == 0
    for got, want in zip(unpad_captions(embeds, mask), captions):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="more than max_sequence_length=2"):
        pad_captions(captions, 2)
    for cast in (torch.bool, torch.bfloat16):  # any dtype the conditioning may be cast to reads the same
        for got, want in zip(unpad_captions(embeds, mask.to(cast)), captions):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="all zeros"):
        unpad_captions(embeds, torch.zeros(2, 5))


# -- sizes, decoding ------------------------------------------------------------------------------


def test_latent_shape_and_size_checks(components):
    adapter = make_adapter(components)
    assert adapter.latent_shape() == (16, 4, 6)
    assert adapter.latent_shape(64, 32) == (16, 8, 4)
    assert ZImageAdapter().latent_shape() == (16, 128, 128)  # 1024², without modules
    with pytest.raises(ValueError, match="multiple of 16 pixels"):
        adapter.velocity_model(40, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        ZImageAdapter(height=1000)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        ZImageAdapter(guidance_scale=-1.0)
    with pytest.raises(ValueError, match=r"Z-Image latents are \[B, C, H, W\]"):
        adapter.velocity_model()(torch.zeros(1, 16, 1, 4, 6), torch.tensor([0.5]), {})
    assert adapter.velocity_model().compute_dtype is None  # float32 on CPU


def test_decode_is_zimage_vae_arithmetic(components):
    adapter = make_adapter(components)
    z = random_latents(adapter, 2, seed=5)
    images = adapter.decode(z)
    vae = components["vae"]  # written out: (z / 0.3611 + 0.1159) → VAE → [-1, 1] → [0, 1]
    with torch.no_grad():
        raw = vae.decode(z / 0.3611 + 0.1159, return_dict=False)[0]
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        adapter.decode(z, height=64, width=64)
    with pytest.raises(ValueError, match=r"Z-Image latents are \[B, C, H, W\]"):
        adapter.decode(z[:, None])


# -- prompt encoding and the cache ----------------------------------------------------------------


def test_captions_keep_their_lengths_through_the_chat_template(components):
    adapter = make_adapter(components)
    ours = adapter.encode_prompts(list(PROMPTS))
    with torch.no_grad():
        captions, _ = zimage_pipeline(components).encode_prompt(list(PROMPTS), do_classifier_free_guidance=False,
                                                                 max_sequence_length=MAX_SEQ)
    assert ours["prompt_embeds"].shape == (3, MAX_SEQ, 32)
    assert [len(c) for c in captions] == ours["prompt_mask"].sum(dim=1).tolist() == [35, 26, 42]
    for row, caption in enumerate(unpad_captions(ours["prompt_embeds"], ours["prompt_mask"])):
        torch.testing.assert_close(caption, captions[row], rtol=0, atol=0)
    assert ours["prompt_embeds"][1, 26:].abs().max() == 0 and ours["prompt_mask"][1, 26:].abs().max() == 0
    # the chat template reaches the encoder (enable_thinking=True: no empty <think> block)
    tokenizer = components["tokenizer"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "red car"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\nred car<|im_end|>\n<|im_start|>assistant\n"
    assert len(tokenizer(text).input_ids) == 26
    # a prompt longer than max_sequence_length is truncated to it, as the pipeline does
    long = adapter.encode_prompts(["a very long prompt " * 4], with_negative=False)
    assert long["prompt_mask"].sum().item() == MAX_SEQ


def test_cache_identity_follows_the_text_encoder_and_the_chat_template(components):
    encoder = make_adapter(components)
    assert encoder.encoder_config == zimage_encoder_config(
        components["text_encoder"].config, components["tokenizer"], MAX_SEQ, torch.float32)
    other = make_adapter({**components, "text_encoder": tiny_components(text_layers=3)["text_encoder"]})
    assert other.encoder_identity != encoder.encoder_identity
    template = make_adapter({**components, "tokenizer": qwen_tokenizer(CHAT_TEMPLATE.replace("assistant", "bot"))})
    assert template.encoder_identity != encoder.encoder_identity  # the template changes the embeddings
    changed = template.encode_prompts(["red car"], with_negative=False)["prompt_mask"].sum().item()
    assert changed != encoder.encode_prompts(["red car"], with_negative=False)["prompt_mask"].sum().item()


# -- loading --------------------------------------------------------------------------------------


def test_missing_folder_raises_a_download_hint(tmp_path):
    with pytest.raises(ModelFilesNotFoundError) as info:
        ZImageAdapter.from_pretrained(tmp_path / "zimage", dtype=torch.float32)
    assert isinstance(info.value, ZImageFilesNotFoundError)
    message = str(info.value)
    assert "Z-Image weights not found" in message and str(tmp_path / "zimage") in message
    assert f"hf download Tongyi-MAI/Z-Image-Turbo --local-dir {tmp_path / 'zimage'}" in message
    assert "text_encoder/" in message and "FLUX" not in message and "gated" not in message


def test_missing_subfolder_and_shard_are_named(components, tmp_path):
    save_layout(components, tmp_path)
    for path in (tmp_path / "vae").glob("*.safetensors"):
        path.unlink()
    (tmp_path / "text_encoder" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00003.safetensors"}}'
    )
    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(ZImageFilesNotFoundError) as info:
        ZImageAdapter.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(info.value)
    assert "tokenizer/" in message and "vae/*.safetensors" in message
    assert "model-00001-of-00003.safetensors" in message and "Traceback" not in message


# -- the family: options, config, preprocess ------------------------------------------------------


def test_options_are_validated_with_the_field_named():
    assert ZImageOptions().guidance_scale == 0.0 and ZImageOptions().height == 1024
    for field, value, message in (("height", 1000, "multiple of 16"), ("guidance_scale", -1.0, ">= 0"),
                                  ("cfg_normalization", float("nan"), "finite"), ("max_sequence_length", 0, ">= 1")):
        with pytest.raises(ConfigError, match=f"model.options.{field}.*{message}"):
            load_train_config(None, "branchgrpo", ["model.family=zimage", f"model.options.{field}={value}"])


def test_shipped_config_resolves():
    config = load_train_config(str(REPO / "configs" / "zimage-branchgrpo.yaml"))
    family = get_family(config.model.family)
    assert family.name == "zimage" and family.modality == "image"
    options = family.options(config)
    assert (options.height, options.width, options.guidance_scale) == (1024, 1024, 0.0)
    assert config.method.tree.steps == 20 and config.method.tree.shift == 3.0
    assert config.method.tree.split_plan == {0: 2, 3: 2, 6: 2, 9: 2}


def test_branchgrpo_preprocess_fills_the_cache_the_trainer_reads(components, tmp_path, capsys):
    from branchgrpo.cli import main

    save_layout(components, tmp_path / "model")
    (tmp_path / "train.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    (tmp_path / "test.txt").write_text(PROMPTS[2] + "\n")
    overrides = [
        "model.family=zimage", f"model.path={tmp_path / 'model'}", f"model.prompt_cache_dir={tmp_path / 'cache'}",
        f"data.train_prompts={tmp_path / 'train.txt'}", f"data.heldout_prompts={tmp_path / 'test.txt'}",
        f"model.options.max_sequence_length={MAX_SEQ}", f"model.options.guidance_scale={GUIDANCE}",
        f"model.options.negative_prompt={NEGATIVE}", "model.dtype=float32", "run.device=cpu",
    ]
    assert main(["preprocess", *overrides]) == 0
    assert "zimage prompt embeddings" in capsys.readouterr().out
    config = load_train_config(None, "branchgrpo", overrides)
    encoder = get_family("zimage").prompt_encoder(config, torch.device("cpu"), torch.float32)
    trainer_side = ZImageAdapter.from_pretrained(tmp_path / "model", dtype=torch.float32, text_encoders="none",
                                                 max_sequence_length=MAX_SEQ, guidance_scale=GUIDANCE,
                                                 negative_prompt=NEGATIVE, prompt_cache_dir=tmp_path / "cache")
    cached = trainer_side.encode_prompts(list(PROMPTS))  # every prompt and the negative prompt, no encoders
    direct = encoder.encode_prompts_uncached(list(PROMPTS))
    negative = encoder.encode_prompts_uncached([NEGATIVE])
    for name in direct:
        torch.testing.assert_close(cached[name], direct[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(cached[f"negative_{name}"], negative[name].expand_as(direct[name]),
                                   rtol=0, atol=1e-6)


# -- LoRA and export -----------------------------------------------------------------------------


def test_lora_on_zimage_trains_only_the_attention_lora_tensors(tmp_path):
    from branchgrpo.models.lora import lora_named_parameters
    from branchgrpo.train.config import LoraConfig

    adapter = make_adapter(tiny_components(seed=2), guidance_scale=0.0)  # Turbo: one call per row
    trainer = make_trainer(CASE, tmp_path, adapter, lora=LoraConfig(rank=4, alpha=8.0))
    lora = dict(lora_named_parameters(adapter.transformer))
    assert len(lora) == 2 * 4 * 4  # (A, B) × q, k, v, out × (2 layers + noise and context refiner)
    assert all(".attention." in name for name in lora)
    before = {k: v.detach().clone() for k, v in adapter.transformer.state_dict().items()}
    metrics = trainer.step()
    assert metrics["optimizer_steps"] == 1 and metrics["ratio_max_deviation_first_step"] < 1e-4
    after = adapter.transformer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:5]


def test_full_export_writes_a_zimage_pipeline_folder(components, tmp_path):
    from diffusers import ZImagePipeline

    from conformance import bundle_for

    zimage_pipeline(components).save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    adapter = make_adapter(tiny_components(seed=8))
    config = load_train_config(None, "branchgrpo", ["model.family=zimage", f"model.path={tmp_path / 'base'}"])
    line = get_family("zimage").export(bundle_for(CASE, adapter), config, tmp_path / "out", "copy")
    assert "ZImagePipeline.from_pretrained" in line
    reloaded = ZImagePipeline.from_pretrained(str(tmp_path / "out")).transformer.state_dict()
    for key, value in adapter.transformer.state_dict().items():
        torch.testing.assert_close(reloaded[key], value, rtol=0, atol=0)
