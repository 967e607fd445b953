"""Qwen-Image: the adapter conformance suite (tests/models/conformance.py) on tiny random models of the
real architectures (QwenImageTransformer2DModel, AutoencoderKLQwenImage, a Qwen2.5-VL text encoder
with a byte-level BPE tokenizer that splits Qwen-Image's prompt template exactly as Qwen's does),
plus what is Qwen-Image's own: the prompt template and the drop of its first 34 tokens, prompts of
different lengths with attention masks, true CFG with its norm-preserving mix, the
resolution-dependent shift, packing, sizes, options, the config file, loading errors and
`branchgrpo preprocess`.

The oracle: at η = 0 our frontier rollout reproduces ``QwenImagePipeline`` (same noise; its own
dynamic-shift scheduler, whose σ equal ``sigma_schedule(T, qwenimage_dynamic_shift(h, w))``) — final
latents and decoded images — with two prompts of different lengths and a negative prompt of a third.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.models.loading import ModelFilesNotFoundError
from branchgrpo.models.qwenimage import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QwenImageAdapter,
    QwenImageFilesNotFoundError,
    QwenImageVelocity,
    diffusers_qwenimage_sigmas,
    pack_latents,
    qwenimage_dynamic_shift,
    unpack_latents,
)
from branchgrpo.sde import sigma_schedule

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conformance import FamilyCase, check_oracle, conformance_tests, save_layout  # noqa: E402

TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")  # QwenImagePipeline.prompt_template_encode
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street", "tree", "ugly", "blurry"]
PROMPTS = ("a photo of a cat on the street", "red car", "blue tree on the street")  # 8, 2 and 5 tokens
NEGATIVE = " "  # the model card's negative prompt: one token
HEIGHT, WIDTH = 32, 48  # VAE 8× → latent 4×6 → 2×3 = 6 packed tokens of 64 channels
MAX_SEQ = 12  # tokens kept after the template: the longest prompt (8 + 5) loses its last one
GUIDANCE = 4.0
SHIFT = qwenimage_dynamic_shift(HEIGHT, WIDTH)  # what the pipeline's own scheduler resolves at this size


SPECIAL = ("<|im_start|>", "<|im_end|>")
VISION_SPECIAL = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


def qwen_tokenizer(template: str = TEMPLATE, special: tuple[str, ...] = SPECIAL):
    """A byte-level BPE ``Qwen2Tokenizer`` (Qwen's pre-tokeniser) whose merges spell every word of the
    template and of WORDS as one token, with ``special`` as special tokens: the template's system turn +
    ``<|im_start|>user\\n`` is 34 tokens, as with Qwen2.5-VL's real vocabulary (64 for the edit template)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for token in special:
        template = template.replace(token, "{}")
    texts = template.split("{}")
    texts += WORDS + [" " + word for word in WORDS]
    vocab = {"<|endoftext|>": 0}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for piece in dict.fromkeys(p for text in texts for p, _ in pre.pre_tokenize_str(text)):
        for sub in sorted({piece[i:j] for i in range(len(piece)) for j in range(i + 2, len(piece) + 1)}, key=len):
            vocab.setdefault(sub, len(vocab))
    # every split of every multi-character token, shorter results first: any merge order ends in whole pieces
    tokens = sorted((t for t in vocab if len(t) > 1 and t != "<|endoftext|>"), key=len)
    merges = [(token[:k], token[k:]) for token in tokens for k in range(1, len(token))]
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(special))


def tiny_components(seed: int = 0, text_layers: int = 2, tokenizer=None) -> dict:
    """Random Qwen-Image transformer (2 blocks), Qwen-Image VAE (real 8× factor, default latent
    mean/std) and a Qwen2.5-VL text encoder with a tiny vision tower (14-pixel patches, 2×2 merge),
    whose image/vision token ids are the tokenizer's when it has them."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tokenizer if tokenizer is not None else qwen_tokenizer()
    vocab = len(tokenizer)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_SPECIAL if token in tokenizer.get_vocab()}
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0], window_size=28),
        image_token_id=ids.get("<|image_pad|>", vocab + 1), video_token_id=ids.get("<|video_pad|>", vocab + 2),
        vision_start_token_id=ids.get("<|vision_start|>", vocab + 3),
        vision_end_token_id=ids.get("<|vision_end|>", vocab + 4),
    )).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def make_adapter(components: dict, **kwargs) -> QwenImageAdapter:
    kwargs = {"max_sequence_length": MAX_SEQ, "height": HEIGHT, "width": WIDTH, "guidance_scale": GUIDANCE,
              "negative_prompt": NEGATIVE, **kwargs}
    return QwenImageAdapter(**components, **kwargs)


def pipeline_scheduler(shift_terminal: float | None = None):
    """Qwen-Image's scheduler_config.json; ``shift_terminal=None`` leaves docs/method.md §2's grid unstretched."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**{**QWEN_IMAGE_SCHEDULER_CONFIG, "shift_terminal": shift_terminal})


def qwen_pipeline(components: dict):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=pipeline_scheduler(), **components)


def pipeline_embeds(pipe, prompts: list[str]) -> dict:
    """``encode_prompt`` of the prompts and (P copies of) the negative prompt, as our keys: both padded
    with zeros to one length, masks as float 1/0 (the pipeline's ``None`` = no padding = ones)."""
    out = {}
    for prefix, texts in (("", prompts), ("negative_", [NEGATIVE] * len(prompts))):
        embeds, mask = pipe.encode_prompt(texts, max_sequence_length=MAX_SEQ)
        out[f"{prefix}prompt_embeds"] = embeds
        out[f"{prefix}prompt_embeds_mask"] = (torch.ones(embeds.shape[:2]) if mask is None else mask).float()
    length = max(value.shape[1] for value in out.values())
    for key, value in out.items():
        pad = [0, 0] * (value.ndim - 2) + [0, length - value.shape[1]]
        out[key] = torch.nn.functional.pad(value, pad)
    return out


def load_adapter(folder, cache_dir) -> QwenImageAdapter:
    return QwenImageAdapter.from_pretrained(
        folder, dtype=torch.float32, text_encoders="lazy", max_sequence_length=MAX_SEQ, height=HEIGHT, width=WIDTH,
        guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, prompt_cache_dir=cache_dir)


CASE = FamilyCase(
    name="qwenimage",
    components=lambda seed: tiny_components(seed=seed),
    adapter=make_adapter,
    pipeline=qwen_pipeline,
    call=dict(negative_prompt=NEGATIVE, true_cfg_scale=GUIDANCE, height=HEIGHT, width=WIDTH,
              max_sequence_length=MAX_SEQ),
    pipeline_embeds=pipeline_embeds,
    output_shape=(3, HEIGHT, WIDTH),
    prompts=PROMPTS,
    shift=SHIFT,
    guidance_off={"true_cfg_scale": 1.0},
    decode_atol=2e-6,  # the causal 3-D conv VAE picks other kernels per batch size: measured 1.1e-6 on [0, 1] pixels
    adapter_guidance_off={"guidance_scale": 1.0},
    load=load_adapter,
)
globals().update(conformance_tests(CASE))


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=3)


# -- prompts: the template, its dropped prefix, lengths and masks -----------------------------------


def test_tokenizer_splits_the_template_prefix_into_34_tokens():
    tokenizer = qwen_tokenizer()
    prefix = TEMPLATE.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == 34  # QwenImagePipeline.prompt_template_encode_start_idx
    assert [len(tokenizer(p).input_ids) for p in PROMPTS] == [8, 2, 5] and len(tokenizer(NEGATIVE).input_ids) == 1


def test_prompt_rows_are_the_encoders_states_after_the_template_prefix(components):
    """Each row = Qwen2.5-VL's last hidden states of the whole template at positions 34.. of that prompt
    alone (an independent computation), cut to max_sequence_length; zeros and mask 0 beyond."""
    adapter = make_adapter(components)
    ours = adapter.encode_prompts(list(PROMPTS))
    lengths = [min(n + 5, MAX_SEQ) for n in (8, 2, 5)]  # + "<|im_end|>\n<|im_start|>assistant\n"
    assert ours["prompt_embeds"].shape == (3, MAX_SEQ, 32)
    assert ours["prompt_embeds_mask"].sum(dim=1).tolist() == lengths
    assert ours["negative_prompt_embeds_mask"].sum(dim=1).tolist() == [6] * 3  # " " + 5, padded to 12
    tokenizer, encoder = components["tokenizer"], components["text_encoder"]
    for row, (prompt, length) in enumerate(zip(PROMPTS, lengths)):
        ids = tokenizer(TEMPLATE.format(prompt), return_tensors="pt").input_ids
        with torch.no_grad():
            states = encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, 34:34 + length]
        torch.testing.assert_close(ours["prompt_embeds"][row, :length], states, rtol=0, atol=1e-6)
        assert ours["prompt_embeds_mask"][row, :length].min() == 1
        assert ours["prompt_embeds"][row, length:].abs().sum() == ours["prompt_embeds_mask"][row, length:].sum() == 0


def test_batching_prompts_of_different_lengths_changes_no_row(components):
    """Every row of a batch of three prompts (padded to the longest, masked) has the velocity it has alone
    (unpadded) — with and without CFG; the mask is what makes this so."""
    adapter = make_adapter(components)
    x = torch.randn(3, *adapter.latent_shape(), generator=torch.Generator().manual_seed(7))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    for guidance in (GUIDANCE, 1.0):
        velocity = adapter.velocity_model(guidance_scale=guidance)
        batch = adapter.encode_prompts(list(PROMPTS), with_negative=guidance > 1)
        together = velocity(x, sigma, batch)
        for row, prompt in enumerate(PROMPTS):
            alone_cond = adapter.encode_prompts([prompt], with_negative=guidance > 1)
            alone = velocity(x[row : row + 1], sigma[row : row + 1], alone_cond)
            torch.testing.assert_close(together[row : row + 1], alone, rtol=0, atol=1e-5)
    unmasked = {**batch, "prompt_embeds_mask": torch.ones_like(batch["prompt_embeds_mask"])}
    assert (adapter.velocity_model(guidance_scale=1.0)(x, sigma, unmasked) - together).abs()[1:].max() > 1e-3


# -- guidance and the timestep ----------------------------------------------------------------------


def test_true_cfg_is_one_doubled_call_with_the_norm_preserving_mix(components):
    adapter = make_adapter(components)
    cond = adapter.encode_prompts(list(PROMPTS[:2]))
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    calls: list[tuple[int, list[float]]] = []
    hook = adapter.transformer.register_forward_hook(
        lambda _m, _a, kw, _o: calls.append((kw["hidden_states"].shape[0], kw["timestep"].tolist())), with_kwargs=True)
    try:
        guided = adapter.velocity_model()(x, sigma, cond)
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0][0] == 4  # one call on [x; x]
    torch.testing.assert_close(torch.tensor(calls[0][1]), torch.tensor([0.9, 0.4, 0.9, 0.4]))  # σ, not 1000σ
    plain = adapter.velocity_model(guidance_scale=1.0)
    v_cond = plain(x, sigma, cond)
    negative = adapter.encode_prompts([NEGATIVE], with_negative=False)  # its own length, as the pipeline runs it
    v_uncond = plain(x, sigma, {key: value.expand(2, *value.shape[1:]) for key, value in negative.items()})
    mixed = v_uncond + GUIDANCE * (v_cond - v_uncond)
    expected = mixed * (v_cond.norm(dim=-1, keepdim=True) / mixed.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-5)
    assert (guided - mixed).abs().max() > 1e-2  # the rescale is not a no-op here
    torch.testing.assert_close(guided.norm(dim=-1), v_cond.norm(dim=-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        adapter.velocity_model()(x, sigma, {k: v for k, v in cond.items() if not k.startswith("negative_")})


def test_guidance_distilled_transformers_are_refused(components):
    from diffusers import QwenImageTransformer2DModel

    distilled = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            axes_dims_rope=(4, 6, 6), guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance_embeds"):
        QwenImageVelocity(distilled, 4, 6)


# -- schedule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(512, 512), (1024, 1024), (1328, 1328), (928, 1664)])
def test_dynamic_shift_reproduces_the_scheduler_without_its_terminal_stretch(height, width):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    steps = 20
    tokens = (height // 16) * (width // 16)
    mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)  # Qwen/Qwen-Image's scheduler anchors
    shift = qwenimage_dynamic_shift(height, width)
    assert shift == pytest.approx(np.exp(mu), rel=1e-12)
    scheduler = pipeline_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(scheduler.sigmas, sigma_schedule(steps, shift).float(), rtol=0,
                               atol=float(torch.finfo(torch.float32).eps))


def test_stock_schedule_is_ours_stretched_to_a_terminal_sigma_of_0_02():
    steps, size = 20, 1328
    stock = diffusers_qwenimage_sigmas(steps, size, size)
    ours = sigma_schedule(steps, qwenimage_dynamic_shift(size, size))
    stretched = 1 - (1 - ours[:-1]) * (1 - 0.02) / (1 - ours[-2])  # the terminal stretch, written out
    torch.testing.assert_close(stock[:-1], stretched, rtol=0, atol=1e-6)
    assert stock[-1] == 0 and stock[-2] == pytest.approx(0.02, abs=1e-6) and stock[0] == 1
    assert (stock[1:-1] - ours[1:-1]).abs().max() > 0.05  # not the same grid: our trees use sigma_schedule
    assert qwenimage_dynamic_shift(1328, 1328) == pytest.approx(2.3033, abs=1e-4)
    assert qwenimage_dynamic_shift(1024, 1024) == pytest.approx(2.0008, abs=1e-4)


# -- layout, sizes, decoding ------------------------------------------------------------------------


def test_packing_is_the_pipelines():
    from diffusers import QwenImagePipeline

    z = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(2))
    packed = QwenImagePipeline._pack_latents(z, 2, 16, 4, 6)
    assert torch.equal(pack_latents(z), packed)
    assert torch.equal(unpack_latents(packed, 4, 6).unsqueeze(2), QwenImagePipeline._unpack_latents(packed, 32, 48, 8))


def test_latent_shape_and_size_checks(components):
    adapter = make_adapter(components)
    assert adapter.vae_scale_factor == 8 and adapter.latent_shape() == (6, 64)
    assert adapter.latent_shape(64, 32) == (8, 64)
    assert QwenImageAdapter().latent_shape() == (83 * 83, 64)  # 1328², without modules
    assert QwenImageAdapter().recommended_shift() == pytest.approx(qwenimage_dynamic_shift(1328, 1328))
    with pytest.raises(ValueError, match="multiple of 16"):
        adapter.velocity_model(40, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        QwenImageAdapter(height=1000)
    with pytest.raises(ValueError, match="max_sequence_length"):
        QwenImageAdapter(max_sequence_length=1025)
    with pytest.raises(ValueError, match="packed"):
        adapter.decode(torch.zeros(1, 16, 4, 6))
    velocity = adapter.velocity_model()
    assert (velocity.latent_height, velocity.latent_width) == (4, 6) and velocity.compute_dtype is None


# -- the family: options, LoRA targets, config, loading, preprocess -----------------------------------


def test_options_are_validated_with_the_field_named():
    from branchgrpo.families import get_family
    from branchgrpo.train.config import load_train_config

    base = ["model.family=qwenimage"]
    options = get_family("qwenimage").options(load_train_config(None, "branchgrpo", base))
    assert (options.height, options.width, options.guidance_scale, options.negative_prompt,
            options.max_sequence_length) == (1328, 1328, 4.0, " ", 512)
    for override, field in (("model.options.height=1000", "model.options.height"),
                            ("model.options.max_sequence_length=2048", "model.options.max_sequence_length"),
                            ("model.options.guidance_scale=0", "model.options.guidance_scale")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_train_config(None, "branchgrpo", [*base, override])


def test_lora_targets_cover_both_streams_of_every_block(components):
    from branchgrpo.families import get_family

    from conformance import bundle_for

    targets = get_family("qwenimage").lora_target_modules(bundle_for(CASE, make_adapter(components)))
    names = [name for name, _ in components["transformer"].named_modules()]
    for target in targets:
        matched = [n for n in names if n.endswith("." + target)]
        assert len(matched) == 2, (target, matched)  # one per block
    assert {"attn.add_q_proj", "attn.to_add_out", "attn.to_q", "attn.to_out.0"} <= set(targets)


def test_the_config_file_resolves():
    from branchgrpo.families import get_family
    from branchgrpo.train.config import load_train_config

    root = Path(__file__).resolve().parents[2]
    config = load_train_config(root / "configs" / "qwenimage-branchgrpo.yaml", None, [])
    assert config.model.family == "qwenimage" and config.preset == "branchgrpo"
    opts = get_family("qwenimage").options(config)
    assert (opts.height, opts.width, opts.guidance_scale, opts.negative_prompt) == (1328, 1328, 4.0, " ")
    assert config.method.tree.steps == 20
    assert config.method.tree.shift == pytest.approx(qwenimage_dynamic_shift(1328, 1328), abs=1e-3)


def test_missing_folder_raises_a_download_hint(tmp_path):
    with pytest.raises(ModelFilesNotFoundError) as info:
        QwenImageAdapter.from_pretrained(tmp_path / "qwen", dtype=torch.float32)
    assert isinstance(info.value, QwenImageFilesNotFoundError)
    message = str(info.value)
    assert "Qwen-Image weights not found" in message and str(tmp_path / "qwen") in message
    assert f"hf download Qwen/Qwen-Image --local-dir {tmp_path / 'qwen'}" in message
    assert "text_encoder/" in message and "gated" not in message and "FLUX" not in message


def test_missing_subfolder_and_shard_are_named(components, tmp_path):
    save_layout(components, tmp_path)
    for path in (tmp_path / "vae").glob("*.safetensors"):
        path.unlink()
    (tmp_path / "text_encoder" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00004.safetensors"}}')
    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(QwenImageFilesNotFoundError) as info:
        QwenImageAdapter.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(info.value)
    assert "tokenizer/" in message and "vae/*.safetensors" in message
    assert "model-00001-of-00004.safetensors" in message and "Traceback" not in message


def test_preprocess_fills_the_cache_that_training_reads(components, tmp_path, capsys):
    """`branchgrpo preprocess` on a tiny folder; the generator training builds from the same config
    serves every prompt and the negative prompt from the cache without loading the text encoder."""
    from branchgrpo.cli import main
    from branchgrpo.train.components import build_policy
    from branchgrpo.train.config import load_train_config

    folder = tmp_path / "qwen"
    save_layout(components, folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    config_file = tmp_path / "qwen.yaml"
    config_file.write_text(f"""\
model:
  family: qwenimage
  path: {folder}
  options: {{height: {HEIGHT}, width: {WIDTH}, guidance_scale: {GUIDANCE}, negative_prompt: '{NEGATIVE}',
             max_sequence_length: {MAX_SEQ}}}
  prompt_cache_dir: {tmp_path / 'cache'}
data:
  train_prompts: {prompts}
  heldout_prompts: {prompts}
run:
  device: cpu
  output_dir: {tmp_path / 'run'}
""")
    assert main(["preprocess", "--config", str(config_file)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "unique_prompts=4" in printed and "encoded=4" in printed and "float32" in printed
    bundle = build_policy(load_train_config(config_file, None, []), torch.device("cpu"))
    adapter = bundle.adapter
    assert adapter.text_encoder is None  # lazy: nothing loaded
    cached = bundle.encode_prompts(list(PROMPTS))
    assert adapter.text_encoder is None, "a cache miss loaded the text encoder"
    direct = make_adapter(components).encode_prompts(list(PROMPTS))
    assert set(cached) == set(direct)
    for key in direct:
        torch.testing.assert_close(cached[key], direct[key], rtol=0, atol=1e-6)


def test_ode_rollout_reproduces_the_pipeline_without_guidance():
    """The conformance oracle with true CFG off (one call per row, no negative prompt)."""
    plain = dataclasses.replace(
        CASE, call={**CASE.call, "true_cfg_scale": 1.0}, guidance_off=None,
        adapter=lambda components, **kw: make_adapter(components, **{"guidance_scale": 1.0, **kw}))
    check_oracle(plain, micro_batch=1)
