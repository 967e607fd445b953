"""FLUX.2 [dev] and [klein]: the adapter conformance suite (tests/models/conformance.py) on tiny random
models of the real architectures (Flux2Transformer2DModel, AutoencoderKLFlux2 with non-trivial
batch-norm latent statistics, a 30-layer Mistral3ForConditionalGeneration with a PixtralProcessor for
[dev], a 27-layer Qwen3ForCausalLM with a Qwen2Tokenizer for [klein], so the pipelines' own hidden
layers (10, 20, 30) / (9, 18, 27) are stacked), plus what is FLUX.2's own: the step- and
resolution-dependent shift, packing and 4-axis ids against the pipeline's helpers, the guidance
embedding, [klein]'s true CFG in one doubled call, the folder checks, options and config.

The oracles run the real pipelines with the real scheduler configuration (dynamic shifting,
exponential time shift) from the same noise: the σ grid the pipeline derives from
``compute_empirical_mu`` must be ours at ``shift = flux2_dynamic_shift(...)``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.models.flux2 import (
    Flux2Adapter,
    Flux2FilesNotFoundError,
    Flux2KleinFilesNotFoundError,
    flux2_dynamic_shift,
    latent_image_ids,
    pack_latents,
    patchify_latents,
    text_ids,
    unpack_latents,
    unpatchify_latents,
)
from branchgrpo.models.loading import ModelFilesNotFoundError
from branchgrpo.sde import sigma_schedule

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conformance import FamilyCase, bundle_for, check_oracle, conformance_tests, save_layout  # noqa: E402

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street", "tree", "ugly", "blurry"]
PROMPTS = ("a photo of a cat", "red car on the street", "blue tree")
IMAGE = 16  # pixels; tiny VAE factor 2 → 8×8 latent → 4×4 patches = 16 tokens of 4·4 channels
GRID = IMAGE // 4
DEV_SEQ, KLEIN_SEQ = 48, 64  # [dev]: word tokens after a ~30-token system prompt; [klein]: byte tokens
GUIDANCE = 4.0
STEPS = 4
# The real scheduler_config.json of FLUX.2 (diffusers/FLUX.2-dev-bnb-4bit, scheduler/): the pipelines
# override base/max shift with μ = compute_empirical_mu(tokens, steps).
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                 time_shift_type="exponential", use_dynamic_shifting=True)
BN_MEAN = torch.linspace(-0.3, 0.4, 16)  # the VAE's batch-norm latent statistics (identity in a fresh model)
BN_VAR = torch.linspace(0.5, 2.0, 16)


# -- tiny components ---------------------------------------------------------------------------------


def mistral_processor():
    """A PixtralProcessor around a word-level tokenizer, with a Mistral-style chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                "{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}[/INST]"
                "{% endif %}{% endfor %}")
    return PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tokenizer, chat_template=template,
                            patch_size=16)


def qwen_tokenizer():
    """A byte-level Qwen2Tokenizer (one token per byte) with a Qwen3-style chat template."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
                "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=template)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    return tokenizer


def tiny_components(seed: int = 0, variant: str = "dev", text_layers: int | None = None) -> dict:
    """Random FLUX.2 transformer and VAE, and the variant's text encoder deep enough for its stacked layers."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    if variant == "dev":
        tokenizer = mistral_processor()
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=dict(model_type="mistral", vocab_size=len(tokenizer.tokenizer), hidden_size=16,
                             intermediate_size=32, num_hidden_layers=text_layers or 30, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=3),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, head_dim=8, image_size=32, patch_size=16),
            image_token_index=8,
        )).eval()
    else:
        tokenizer = qwen_tokenizer()
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=text_layers or 27,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
        )).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 16, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=variant == "dev",
    ).eval()
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=IMAGE,
    ).eval()
    vae.bn.running_mean.copy_(BN_MEAN)
    vae.bn.running_var.copy_(BN_VAR)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def make_adapter(components: dict, **kwargs) -> Flux2Adapter:
    kwargs = {"max_sequence_length": DEV_SEQ, "height": IMAGE, "width": IMAGE, "guidance_scale": GUIDANCE, **kwargs}
    return Flux2Adapter(**components, variant="dev", **kwargs)


def make_klein_adapter(components: dict, **kwargs) -> Flux2Adapter:
    kwargs = {"max_sequence_length": KLEIN_SEQ, "height": IMAGE, "width": IMAGE, "guidance_scale": GUIDANCE, **kwargs}
    return Flux2Adapter(**components, variant="klein", **kwargs)


def flux2_pipeline(components: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), **components)


def klein_pipeline(components: dict, is_distilled: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), is_distilled=is_distilled,
                              **components)


def dev_embeds(pipe, prompts: list[str]) -> dict:
    embeds, _ids = pipe.encode_prompt(prompts, max_sequence_length=DEV_SEQ)
    return {"prompt_embeds": embeds}


def klein_embeds(pipe, prompts: list[str]) -> dict:
    embeds, _ids = pipe.encode_prompt(prompts, max_sequence_length=KLEIN_SEQ)
    negative, _ids = pipe.encode_prompt([""] * len(prompts), max_sequence_length=KLEIN_SEQ)  # the pipeline's
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}


def load_dev(folder, cache_dir) -> Flux2Adapter:
    return Flux2Adapter.from_pretrained(folder, dtype=torch.float32, variant="dev", text_encoders="lazy",
                                        max_sequence_length=DEV_SEQ, height=IMAGE, width=IMAGE,
                                        guidance_scale=GUIDANCE, prompt_cache_dir=cache_dir)


def load_klein(folder, cache_dir) -> Flux2Adapter:
    return Flux2Adapter.from_pretrained(folder, dtype=torch.float32, variant="klein", text_encoders="lazy",
                                        max_sequence_length=KLEIN_SEQ, height=IMAGE, width=IMAGE,
                                        guidance_scale=GUIDANCE, prompt_cache_dir=cache_dir)


def from_klein_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux2KleinPipeline's ``output_type="latent"`` (VAE latents, statistics applied) → our packed latents."""
    std = torch.sqrt(BN_VAR + 1e-4).view(1, -1, 1, 1)  # AutoencoderKLFlux2's batch_norm_eps
    return pack_latents((patchify_latents(latents) - BN_MEAN.view(1, -1, 1, 1)) / std)


SHIFT = flux2_dynamic_shift(IMAGE, IMAGE, STEPS, vae_scale_factor=2)  # what the pipelines' μ amounts to here

CASE = FamilyCase(
    name="flux2",
    components=lambda seed: tiny_components(seed, "dev"),
    adapter=make_adapter,
    pipeline=flux2_pipeline,
    call=dict(height=IMAGE, width=IMAGE, guidance_scale=GUIDANCE, max_sequence_length=DEV_SEQ),
    pipeline_embeds=dev_embeds,
    output_shape=(3, IMAGE, IMAGE),
    prompts=PROMPTS,
    steps=STEPS,
    shift=SHIFT,
    guidance_off={"guidance_scale": 1.0},  # another guidance embedding: another sample
    load=load_dev,
    to_pipeline_latents=lambda packed: unpack_latents(packed, GRID, GRID),  # the pipeline packs [B, C', h, w]
)
KLEIN = FamilyCase(
    name="flux2-klein",
    components=lambda seed: tiny_components(seed, "klein"),
    adapter=make_klein_adapter,
    pipeline=klein_pipeline,
    call=dict(height=IMAGE, width=IMAGE, guidance_scale=GUIDANCE, max_sequence_length=KLEIN_SEQ),
    pipeline_embeds=klein_embeds,
    output_shape=(3, IMAGE, IMAGE),
    prompts=PROMPTS,
    steps=STEPS,
    shift=SHIFT,
    guidance_off={"guidance_scale": 1.0},  # no CFG: another sample
    adapter_guidance_off={"guidance_scale": 1.0},
    load=load_klein,
    to_pipeline_latents=lambda packed: unpack_latents(packed, GRID, GRID),
    from_pipeline_latents=from_klein_latents,
)
globals().update(conformance_tests(CASE))
globals().update({name.replace("test_", "test_klein_", 1): test for name, test in conformance_tests(KLEIN).items()})


@pytest.fixture(scope="module")
def components():
    return tiny_components(0, "dev")


@pytest.fixture(scope="module")
def klein_components():
    return tiny_components(0, "klein")


# -- schedule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution, steps", [(512, 20), (1024, 20), (1024, 50), (1536, 28)])
def test_dynamic_shift_reproduces_the_pipelines_default_schedule(resolution, steps):
    """The scheduler's own exponential time shift at the pipelines' μ is docs/method.md §2 at e^μ."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    tokens = (resolution // 16) ** 2  # FLUX.2 VAE 8× and 2×2 patches
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    shift = flux2_dynamic_shift(resolution, resolution, steps)
    ours = sigma_schedule(steps, shift).float()
    torch.testing.assert_close(scheduler.sigmas, ours, rtol=0, atol=float(torch.finfo(torch.float32).eps))
    assert shift > 3.0  # far more shifted than FLUX.1's (2.2–3.2): 9.01 at 1024² and 20 steps
    if (resolution, steps) == (1024, 20):
        assert shift == pytest.approx(9.0072, abs=1e-4)  # BFL's fit by hand: e^(20a + b)


# -- layout, ids, guidance -----------------------------------------------------------------------------


def test_packing_and_position_ids_match_the_pipeline_helpers():
    from diffusers import Flux2Pipeline

    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))  # VAE latents [B, C, H, W]
    patches = patchify_latents(z)
    torch.testing.assert_close(patches, Flux2Pipeline._patchify_latents(z), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify_latents(patches), z, rtol=0, atol=0)
    packed = pack_latents(patches)
    torch.testing.assert_close(packed, Flux2Pipeline._pack_latents(patches), rtol=0, atol=0)
    ids = Flux2Pipeline._prepare_latent_ids(patches)
    assert torch.equal(latent_image_ids(4, 6), ids[0])
    torch.testing.assert_close(unpack_latents(packed, 4, 6), Flux2Pipeline._unpack_latents_with_ids(packed, ids),
                               rtol=0, atol=0)
    assert torch.equal(text_ids(7), Flux2Pipeline._prepare_text_ids(torch.zeros(1, 7, 3))[0])
    assert torch.equal(latent_image_ids(4, 6)[7], torch.tensor([0, 1, 1, 0]))  # (t, h, w, l), row-major


def _transformer_calls(transformer: torch.nn.Module, calls: list[dict]):
    def hook(_module, args, kwargs):
        calls.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_dev_guidance_is_an_embedding_in_one_call_with_timestep_sigma(components):
    adapter = make_adapter(components)
    cond = adapter.encode_prompts(list(PROMPTS[:2]))
    assert set(cond) == {"prompt_embeds"}  # no negative prompt: FLUX.2 [dev] has no CFG
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8, 0.3])
    calls: list[dict] = []
    hook = _transformer_calls(adapter.transformer, calls)
    try:
        with torch.no_grad():
            high = adapter.velocity_model(guidance_scale=5.0)(x, sigma, cond)
            low = adapter.velocity_model(guidance_scale=1.0)(x, sigma, cond)
    finally:
        hook.remove()
    assert len(calls) == 2 and calls[0]["hidden_states"].shape[0] == 2  # one call per evaluation, no doubling
    torch.testing.assert_close(calls[0]["timestep"], sigma, rtol=0, atol=0)  # σ; the model multiplies by 1000
    torch.testing.assert_close(calls[0]["guidance"], torch.full((2,), 5.0), rtol=0, atol=0)
    assert (high - low).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no negative prompt"):
        make_adapter(components, negative_prompt="ugly")


def test_klein_cfg_is_one_doubled_call_equal_to_two_calls(klein_components):
    adapter = make_klein_adapter(klein_components, negative_prompt="ugly blurry")
    cond = adapter.encode_prompts(list(PROMPTS[:2]))
    assert set(cond) == {"prompt_embeds", "negative_prompt_embeds"}
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.9, 0.4])
    calls: list[dict] = []
    hook = _transformer_calls(adapter.transformer, calls)
    try:
        with torch.no_grad():
            guided = adapter.velocity_model()(x, sigma, cond)
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0]["hidden_states"].shape[0] == 4 and "guidance" not in calls[0]

    def direct(embeds):  # the transformer called as Flux2KleinPipeline calls it, once per branch
        return adapter.transformer(
            hidden_states=x, encoder_hidden_states=embeds, timestep=sigma, guidance=None,
            img_ids=latent_image_ids(GRID, GRID), txt_ids=text_ids(embeds.shape[1]), return_dict=False)[0]

    with torch.no_grad():
        cond_v, uncond_v = direct(cond["prompt_embeds"]), direct(cond["negative_prompt_embeds"])
    torch.testing.assert_close(guided, uncond_v + GUIDANCE * (cond_v - uncond_v), rtol=0, atol=1e-5)
    assert (cond_v - uncond_v).abs().max() > 1e-3  # the negative prompt matters

    distilled = make_klein_adapter(klein_components, is_distilled=True)  # step-distilled [klein]: no CFG
    assert distilled.negative_prompt is None and set(distilled.encode_prompts(list(PROMPTS[:1]))) == {"prompt_embeds"}
    assert not distilled.velocity_model().uses_cfg


def test_klein_oracle_without_guidance_and_for_a_distilled_model():
    """The [klein] oracle with CFG off (guidance_scale 1) and for a step-distilled pipeline (CFG ignored)."""
    plain = dataclasses.replace(
        KLEIN, guidance_off=None,
        adapter=lambda components, **kw: make_klein_adapter(components, **{"guidance_scale": 1.0, **kw}),
        call={**KLEIN.call, "guidance_scale": 1.0})
    check_oracle(plain, micro_batch=2)
    distilled = dataclasses.replace(
        KLEIN, guidance_off=None, pipeline=lambda components: klein_pipeline(components, is_distilled=True),
        adapter=lambda components, **kw: make_klein_adapter(components, **{"is_distilled": True, **kw}))
    check_oracle(distilled, micro_batch=2)


# -- sizes, LoRA targets ------------------------------------------------------------------------------


def test_latent_shape_and_size_checks(components):
    adapter = make_adapter(components)
    assert adapter.vae_scale_factor == 2
    assert adapter.latent_size(16, 32) == (4, 8)
    assert adapter.latent_shape(16, 32) == (32, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        adapter.latent_shape(18, 16)
    velocity = adapter.velocity_model(16, 32)
    assert (velocity.latent_height, velocity.latent_width) == (4, 8)
    assert velocity.compute_dtype is None  # float32 on CPU
    assert Flux2Adapter(variant="dev").latent_shape() == (4096, 128)  # FLUX.2 at 1024²: 64×64 patches of 4×32


def test_lora_targets_cover_every_attention_projection(components):
    from branchgrpo.families import get_family

    transformer = components["transformer"]
    targets = get_family("flux2").lora_target_modules(bundle_for(CASE, make_adapter(components)))
    names = {name: module for name, module in transformer.named_modules()}
    matched = {n for n in names for t in targets if n == t or n.endswith("." + t)}
    assert all(isinstance(names[n], torch.nn.Linear) for n in matched)  # no ModuleList (double blocks' to_out)
    expected = {f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                          "add_k_proj", "add_v_proj", "to_add_out")}
    expected |= {f"single_transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_qkv_mlp_proj", "to_out")}
    assert matched == expected


# -- the families: options, config, loading, preprocess -----------------------------------------------


def test_options_are_validated_with_the_field_named():
    from branchgrpo.train.config import load_train_config

    dev = load_train_config(None, "branchgrpo", ["model.family=flux2"]).model.options
    assert dev == {"height": 1024, "width": 1024, "embedded_guidance": 4.0, "max_sequence_length": 512}
    klein = load_train_config(None, "branchgrpo", ["model.family=flux2-klein"]).model.options
    assert (klein["guidance_scale"], klein["negative_prompt"]) == (4.0, "")
    for family, field, value in (("flux2", "height", 1000), ("flux2", "embedded_guidance", -1),
                                 ("flux2", "max_sequence_length", 0), ("flux2-klein", "guidance_scale", 0),
                                 ("flux2-klein", "width", 8)):
        with pytest.raises(ConfigError, match=rf"model\.options\.{field}"):
            load_train_config(None, "branchgrpo", [f"model.family={family}", f"model.options.{field}={value}"])


def test_the_config_file_resolves():
    from branchgrpo.train.config import load_train_config

    root = Path(__file__).resolve().parents[2]
    config = load_train_config(root / "configs" / "flux2-dev-branchgrpo.yaml", None, [])
    assert config.model.family == "flux2" and config.preset == "branchgrpo"
    opts = config.model.options
    assert (opts["height"], opts["width"], opts["embedded_guidance"]) == (1024, 1024, 4.0)
    assert config.method.tree.steps == 20
    assert config.method.tree.shift == pytest.approx(flux2_dynamic_shift(1024, 1024, 20), abs=1e-3)
    assert config.model.lora is not None and config.model.lora.rank == 32


def test_missing_folder_raises_a_download_hint(tmp_path):
    with pytest.raises(ModelFilesNotFoundError) as info:
        Flux2Adapter.from_pretrained(tmp_path / "flux2", dtype=torch.float32, variant="dev")
    assert isinstance(info.value, Flux2FilesNotFoundError)
    message = str(info.value)
    assert "FLUX.2 [dev] weights not found" in message and str(tmp_path / "flux2") in message
    assert f"hf download black-forest-labs/FLUX.2-dev --local-dir {tmp_path / 'flux2'}" in message
    assert "gated" in message and "text_encoder/" in message
    with pytest.raises(Flux2KleinFilesNotFoundError, match="FLUX.2-klein-base-4B") as info:
        Flux2Adapter.from_pretrained(tmp_path / "klein", dtype=torch.float32, variant="klein")
    assert "gated" not in str(info.value)  # Apache-2.0


def test_missing_subfolder_and_shard_are_named(components, tmp_path):
    save_layout(components, tmp_path)
    for path in (tmp_path / "vae").glob("*.safetensors"):
        path.unlink()
    (tmp_path / "text_encoder" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00010.safetensors"}}')
    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(Flux2FilesNotFoundError) as info:
        Flux2Adapter.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(info.value)
    assert "tokenizer/" in message and "vae/*.safetensors" in message
    assert "model-00001-of-00010.safetensors" in message and "Traceback" not in message


def test_model_index_decides_the_variant(klein_components, tmp_path):
    save_layout(klein_components, tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    loaded = Flux2Adapter.from_pretrained(tmp_path, dtype=torch.float32, text_encoders="none", height=IMAGE,
                                          width=IMAGE, max_sequence_length=KLEIN_SEQ)
    assert (loaded.variant, loaded.is_distilled, loaded.negative_prompt) == ("klein", True, None)
    assert loaded.text_encoder_out_layers == (9, 18, 27)
    with pytest.raises(ValueError, match="Flux2KleinPipeline.*model.family=flux2-klein"):
        Flux2Adapter.from_pretrained(tmp_path, dtype=torch.float32, variant="dev")


def test_preprocess_fills_the_cache_that_training_reads(klein_components, tmp_path, capsys):
    """`branchgrpo preprocess` on a tiny [klein] folder; the generator training builds from the same config
    serves every prompt and the negative prompt from the cache without loading the text encoder."""
    from branchgrpo.cli import main
    from branchgrpo.train.components import build_policy
    from branchgrpo.train.config import load_train_config

    folder = tmp_path / "klein"
    save_layout(klein_components, folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": False}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    config_file = tmp_path / "klein.yaml"
    config_file.write_text(f"""\
model:
  family: flux2-klein
  path: {folder}
  options: {{height: {IMAGE}, width: {IMAGE}, guidance_scale: {GUIDANCE}, negative_prompt: 'ugly blurry',
             max_sequence_length: {KLEIN_SEQ}}}
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
    assert "unique_prompts=4" in printed and "encoded=4" in printed
    bundle = build_policy(load_train_config(config_file, None, []), torch.device("cpu"))
    adapter = bundle.adapter
    assert adapter.text_encoder is None and adapter.negative_prompt == "ugly blurry"
    cached = bundle.encode_prompts(list(PROMPTS))
    assert adapter.text_encoder is None, "a cache miss loaded the text encoder"
    direct = make_klein_adapter(klein_components, negative_prompt="ugly blurry").encode_prompts(list(PROMPTS))
    assert set(cached) == set(direct) == {"prompt_embeds", "negative_prompt_embeds"}
    for key in direct:
        torch.testing.assert_close(cached[key], direct[key], rtol=0, atol=1e-6)
