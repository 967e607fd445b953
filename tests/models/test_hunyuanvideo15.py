"""HunyuanVideo 1.5 (family ``hunyuanvideo15``): the conformance suite (tests/models/conformance.py) on
tiny random models of the real classes — ``HunyuanVideo15Transformer3DModel`` (dual-stream blocks,
token refiner, ByT5 and image projections), ``AutoencoderKLHunyuanVideo15`` (16×/4× causal video VAE),
a 3-layer ``Qwen2_5_VLTextModel`` with a byte-level Qwen2 tokenizer whose chat-template prefix is
108 tokens as with the real vocabulary, and a ByT5 encoder — plus what is the family's own: glyph
(quoted) text through ByT5, the text-to-video inputs (zero condition latents and image embeddings),
shorter text lengths, LoRA export for the transformer's ``load_lora_adapter``, CFG through the pipeline's guider.

The oracle: at η = 0 our frontier rollout reproduces ``HunyuanVideo15Pipeline`` (diffusers 0.42) on the
same noise and σ — final latents and decoded videos. The pipeline runs with shorter text lengths
(``tokenizer_max_length`` 64 instead of 1000, ``tokenizer_2_max_length`` 16 instead of 256) so that
the tiny models run in seconds; ``test_shorter_text_lengths_give_the_same_velocity`` shows that this
changes nothing for prompts that fit.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil

import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.families import get_family
from branchgrpo.models.hunyuanvideo15 import (
    VISION_TOKENS,
    HunyuanVideo15Adapter,
    HunyuanVideo15FilesNotFoundError,
    export_hunyuanvideo15_lora,
    load_hunyuanvideo15_lora,
)
from branchgrpo.models.lora import LoraSpec, add_lora, trainable_parameters

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conformance import FamilyCase, check_oracle, conformance_tests, save_layout  # noqa: E402

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street", "tree", "sign", "that",
         "says", "open", "shop"]
PROMPTS = ("a photo of a cat", "red car on the street", 'a sign that says "open"')  # the third quotes a glyph text
NEGATIVE = 'a sign that says "shop"'  # with a glyph text, so the negative ByT5 rows are not all zero
SPECIAL = ("<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen2.5's turns
HEIGHT, WIDTH, FRAMES = 32, 48, 5  # VAE 16×/4× → latent [8, 2, 2, 3]
MAX_SEQ, GLYPH = 64, 16  # text lengths of the tiny runs (the pipeline's are 1000 and 256)
GUIDANCE = 6.0
SHIFT = 5.0  # the authors' flow_shift at 480p


def system_message() -> str:
    from diffusers import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


def qwen_tokenizer():
    """A byte-level BPE ``Qwen2Tokenizer`` (Qwen's pre-tokeniser) whose merges spell every piece of the
    pipeline's system message and of WORDS as one token, with Qwen2.5's chat turns: the template prefix
    before the prompt is then 108 tokens, the pipeline's ``prompt_template_encode_start_idx``."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    texts = [f"system\n{system_message()}", "\n", "user\n", "assistant\n", *WORDS, *(" " + w for w in WORDS)]
    vocab = {"<|endoftext|>": 0}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for piece in dict.fromkeys(p for text in texts for p, _ in pre.pre_tokenize_str(text)):
        for sub in sorted({piece[i:j] for i in range(len(piece)) for j in range(i + 2, len(piece) + 1)}, key=len):
            vocab.setdefault(sub, len(vocab))
    tokens = sorted((t for t in vocab if len(t) > 1 and t != "<|endoftext|>"), key=len)
    merges = [(token[:k], token[k:]) for token in tokens for k in range(1, len(token))]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(SPECIAL))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_components(seed: int = 0, text_layers: int = 3) -> dict:
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = qwen_tokenizer(), ByT5Tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, bos_token_id=None,
        eos_token_id=0, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
    )).eval()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2, relative_attention_num_buckets=8)).eval()
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 8 + 1, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=16,
        image_embed_dim=24, rope_axes_dim=(4, 6, 6), target_size=64, task_type="t2v",
    ).eval()
    vae = AutoencoderKLHunyuanVideo15(latent_channels=8, block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1,
                                      scaling_factor=1.03682).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def make_adapter(components: dict, **kwargs) -> HunyuanVideo15Adapter:
    kwargs = {"max_sequence_length": MAX_SEQ, "glyph_max_length": GLYPH, "height": HEIGHT, "width": WIDTH,
              "num_frames": FRAMES, "guidance_scale": GUIDANCE, "negative_prompt": NEGATIVE, **kwargs}
    return HunyuanVideo15Adapter(**components, **kwargs)


def hv15_pipeline(components: dict, guidance_scale: float = GUIDANCE, lengths: tuple[int, int] = (MAX_SEQ, GLYPH)):
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline

    pipe = HunyuanVideo15Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
                                  guider=ClassifierFreeGuidance(guidance_scale=guidance_scale), **components)
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = lengths
    pipe.vae.enable_slicing()  # its VAE decodes one video at a time (batches break its mid-block attention)
    return pipe


def pipeline_embeds(pipe, prompts: list[str]) -> dict:
    device = torch.device("cpu")
    embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(prompts, device=device, batch_size=len(prompts))
    # what __call__ does for CFG; a str negative_prompt breaks its reshape for batches: one per prompt
    negative = pipe.encode_prompt([NEGATIVE] * len(prompts), device=device, batch_size=len(prompts))
    names = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
    return {**dict(zip(names, (embeds, mask, embeds_2, mask_2))),
            **{f"negative_{name}": value for name, value in zip(names, negative)}}


def load_adapter(folder, cache_dir) -> HunyuanVideo15Adapter:
    return HunyuanVideo15Adapter.from_pretrained(
        folder, dtype=torch.float32, text_encoders="lazy", max_sequence_length=MAX_SEQ, glyph_max_length=GLYPH,
        height=HEIGHT, width=WIDTH, num_frames=FRAMES, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE,
        prompt_cache_dir=cache_dir)


CASE = FamilyCase(
    name="hunyuanvideo15",
    components=lambda seed: tiny_components(seed=seed),
    adapter=make_adapter,
    pipeline=hv15_pipeline,
    call=dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, negative_prompt=[NEGATIVE] * 2),
    pipeline_embeds=pipeline_embeds,
    output_shape=(FRAMES, 3, HEIGHT, WIDTH),
    prompts=PROMPTS,
    shift=SHIFT,
    output_attr="frames",
    adapter_guidance_off={"guidance_scale": 1.0},
    lora=False,  # HunyuanVideo15Pipeline has no load_lora_weights: the transformer's load_lora_adapter, below
    trainer=False,  # the iteration runs through the family's own build (folder, LoRA, CLI export), below
    load=load_adapter,
)
globals().update(conformance_tests(CASE))


@pytest.fixture(scope="module")
def components():
    return tiny_components(seed=3)


# -- conventions ------------------------------------------------------------------------------------


def test_template_prefix_is_cropped_where_the_prompt_starts(components):
    """The tiny tokenizer's chat-template prefix is the real one's 108 tokens, so the pipeline's crop keeps
    exactly the user turn: the mask counts the prompt's tokens + ``<|im_end|>\\n<|im_start|>assistant\\n``."""
    from diffusers import HunyuanVideo15Pipeline

    tokenizer = components["tokenizer"]
    assert make_adapter(components).encoding_pipeline().prompt_template_encode_start_idx == 108
    turns = tokenizer.apply_chat_template([[{"role": "system", "content": system_message()},
                                            {"role": "user", "content": "red car"}]], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"][0]
    assert tokenizer.decode(turns[108:]).startswith("red car<|im_end|>")
    ours = make_adapter(components).encode_prompts(["red car", "a photo of a cat"], with_negative=False)
    assert ours["prompt_embeds_mask"].sum(dim=1).tolist() == [2 + 5, 5 + 5]  # words + 5 closing tokens
    assert ours["prompt_embeds"].shape == (2, MAX_SEQ, 32)
    assert HunyuanVideo15Pipeline(vae=components["vae"], text_encoder=None, tokenizer=None, transformer=None,
                                  scheduler=None, text_encoder_2=None, tokenizer_2=None,
                                  guider=None).vision_num_semantic_tokens == VISION_TOKENS


def test_glyph_text_goes_through_byt5_and_the_rest_is_zero(components):
    adapter = make_adapter(components)
    encoded = adapter.encode_prompts(list(PROMPTS), with_negative=False)
    mask, embeds = encoded["prompt_embeds_mask_2"], encoded["prompt_embeds_2"]
    # 'Text "open". ' (the pipeline's glyph format) in bytes + </s>: 14 tokens; the plain prompts get none
    assert mask.sum(dim=1).tolist() == [0, 0, 14]
    assert embeds[:2].abs().max() == 0 and embeds[2, :14].abs().min() > 0


def test_ode_rollout_with_a_glyph_prompt_reproduces_the_pipeline():
    glyph_first = dataclasses.replace(CASE, prompts=(PROMPTS[2], PROMPTS[0], PROMPTS[1]))
    check_oracle(glyph_first, micro_batch=2)


def test_transformer_inputs_are_the_pipelines_text_to_video_inputs(components):
    adapter = make_adapter(components)
    seen = []
    hook = components["transformer"].register_forward_hook(lambda _m, _a, kw, _o: seen.append(kw), with_kwargs=True)
    try:
        cond = adapter.encode_prompts(list(PROMPTS[:2]))
        x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
        adapter.velocity_model()(x, torch.tensor([0.9, 0.4]), cond)
    finally:
        hook.remove()
    [call] = seen  # one doubled CFG call
    hidden = call["hidden_states"]
    assert hidden.shape == (4, 17, 2, 2, 3) and torch.equal(hidden[:2, :8], x) and torch.equal(hidden[2:, :8], x)
    assert hidden[:, 8:].abs().max() == 0  # zero condition latents and mask channel
    assert call["image_embeds"].shape == (4, VISION_TOKENS, 24) and call["image_embeds"].abs().max() == 0
    assert call["timestep"].dtype == torch.float32 and call["timestep"].tolist() == [900.0, 400.0, 900.0, 400.0]
    torch.testing.assert_close(call["encoder_hidden_states"][:2], cond["negative_prompt_embeds"])  # [uncond; cond]


def test_cfg_is_one_doubled_call_equal_to_the_guider(components):
    """Our one-call CFG equals the pipeline's guider (two calls, ``ClassifierFreeGuidance``); guidance matters."""
    from diffusers import ClassifierFreeGuidance

    adapter = make_adapter(components)
    cond = adapter.encode_prompts(list(PROMPTS[:2]))
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.7, 0.7])
    plain = adapter.velocity_model(guidance_scale=1.0)
    with torch.no_grad():
        guided = adapter.velocity_model()(x, sigma, cond)
        v_cond = plain(x, sigma, cond)
        v_uncond = plain(x, sigma, {key[len("negative_"):]: value for key, value in cond.items()
                                    if key.startswith("negative_")})
    guider = ClassifierFreeGuidance(guidance_scale=GUIDANCE)
    guider.set_state(step=0, num_inference_steps=1, timestep=700)
    torch.testing.assert_close(guided, guider.forward(v_cond, v_uncond).pred, rtol=0, atol=1e-5)
    assert (guided - v_cond).abs().max() > 1e-2
    assert set(make_adapter(components, guidance_scale=1.0).encode_prompts(PROMPTS[:1])) == {
        "prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2"}
    # the default negative prompt "" is what the pipeline encodes for negative_prompt=None
    default = make_adapter(components, negative_prompt="").encode_prompts(list(PROMPTS[:2]))
    with torch.no_grad():
        none = hv15_pipeline(components).encode_prompt(None, device=torch.device("cpu"), batch_size=2)
    for key, value in zip(("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2"), none):
        torch.testing.assert_close(default[f"negative_{key}"], value, rtol=0, atol=1e-6)


def test_shorter_text_lengths_give_the_same_velocity(components):
    """1000/256 tokens (the pipeline's) vs 64/16: padding is masked out, so prompts that fit get the same
    velocity; the shorter encodings are the longer ones' first tokens."""
    long, short = make_adapter(components, max_sequence_length=1000, glyph_max_length=256), make_adapter(components)
    prompts = list(PROMPTS)
    full, cut = long.encode_prompts(prompts), short.encode_prompts(prompts)
    for key in cut:
        torch.testing.assert_close(full[key][:, : cut[key].shape[1]], cut[key], rtol=0, atol=1e-6)
        if "mask" in key:
            assert full[key][:, cut[key].shape[1]:].abs().max() == 0  # nothing but padding was cut
    with torch.no_grad():
        theirs = long.encoding_pipeline().encode_prompt(prompts, device=torch.device("cpu"), batch_size=3)
    torch.testing.assert_close(full["prompt_embeds"], theirs[0], rtol=0, atol=0)  # the pipeline's own lengths
    x = torch.randn(3, *short.latent_shape(), generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        a, b = long.velocity_model()(x, sigma, full), short.velocity_model()(x, sigma, cut)
    diff = (a - b).abs().max().item()
    print(f"velocity at 1000/256 vs 64/16 text tokens: max|Δ|={diff:.2e} (scale {a.abs().max():.2f})")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_sizes_and_options():
    adapter = HunyuanVideo15Adapter()
    assert adapter.latent_shape(480, 848, 121) == (32, 31, 30, 53)  # the pipeline's 480p 16:9 bucket, 121 frames
    assert adapter.latent_shape(480, 848, 33) == (32, 9, 30, 53)
    with pytest.raises(ValueError, match="multiple of 16"):
        adapter.latent_shape(488, 848)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        adapter.latent_shape(num_frames=32)
    options = get_family("hunyuanvideo15").options_class
    defaults = options()
    assert (defaults.height, defaults.width, defaults.guidance_scale, defaults.max_sequence_length) == (
        480, 848, 6.0, 1000)
    for values, field in [(dict(height=472), "height"), (dict(num_frames=34), "num_frames"),
                          (dict(guidance_scale=0.5), "guidance_scale"), (dict(glyph_max_length=0), "glyph_max_length")]:
        with pytest.raises(ConfigError) as info:
            options(**values)
        assert info.value.field == f"model.options.{field}"


def test_config_resolves():
    from branchgrpo.train.config import load_train_config

    config = load_train_config("configs/hunyuanvideo15-480p-branchgrpo.yaml")
    options = get_family("hunyuanvideo15").options(config)
    assert config.model.family == "hunyuanvideo15" and (options.height, options.width) == (480, 848)
    assert config.method.tree.steps == 20 and config.method.tree.shift == SHIFT


# -- LoRA and export ------------------------------------------------------------------------------


def test_exported_lora_loads_with_the_files_lora_config(tmp_path):
    from safetensors import safe_open

    trained, fresh = tiny_components(seed=5), tiny_components(seed=5)
    adapter = make_adapter(trained)
    targets = get_family("hunyuanvideo15").lora_target_modules(None)
    add_lora(trained["transformer"], LoraSpec(rank=4, alpha=12.0, target_modules=targets))
    names = {name.rsplit(".lora_", 1)[0] for name, _ in trained["transformer"].named_parameters() if ".lora_" in name}
    assert "transformer_blocks.0.attn.add_q_proj" in names and "transformer_blocks.1.attn.to_out.0" in names
    assert "context_embedder.token_refiner.refiner_blocks.0.attn.to_q" in names
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in trainable_parameters(trained["transformer"]):
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    path = export_hunyuanvideo15_lora(trained["transformer"], tmp_path / "lora.safetensors")
    with safe_open(str(path), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == 12.0
    pipe = hv15_pipeline(fresh)
    assert not hasattr(pipe, "load_lora_weights")  # diffusers 0.42: no LoRA loader on this pipeline
    load_hunyuanvideo15_lora(pipe.transformer, path)
    naive = tiny_components(seed=5)["transformer"]
    naive.load_lora_adapter(str(path), prefix="transformer")  # without the file's LoraConfig: alpha = rank
    cond = adapter.encode_prompts(list(PROMPTS[:2]))
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        ours = adapter.velocity_model()(x, sigma, cond)
        loaded = make_adapter({**fresh, "transformer": pipe.transformer}).velocity_model()(x, sigma, cond)
        unscaled = make_adapter({**fresh, "transformer": naive}).velocity_model()(x, sigma, cond)
        base = make_adapter(tiny_components(seed=5)).velocity_model()(x, sigma, cond)
    torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-6)
    assert (ours - base).abs().max() > 1e-2 and (unscaled - ours).abs().max() > 1e-2


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Tiny HunyuanVideo 1.5 saved with ``save_pretrained``, built by ``model.family=hunyuanvideo15``
    (LoRA rank 4), one BranchGRPO iteration through the Trainer."""
    from branchgrpo.rewards.base import as_reward
    from branchgrpo.train.config import load_train_config
    from branchgrpo.train.trainer import Trainer
    from conformance import brightness

    root = tmp_path_factory.mktemp("hv15_run")
    hv15_pipeline(tiny_components(seed=7)).save_pretrained(str(root / "model"), safe_serialization=True)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = load_train_config(None, "branchgrpo", [
        f"run.output_dir={root / 'run'}", "run.iterations=1", "run.progress=false", "run.tensorboard=false",
        "run.dump_tree_every=0", "run.checkpoint_every=0", "run.device=cpu", "model.family=hunyuanvideo15",
        f"model.path={root / 'model'}", "model.dtype=float32", f"model.options.height={HEIGHT}",
        f"model.options.width={WIDTH}", f"model.options.num_frames={FRAMES}",
        f"model.options.max_sequence_length={MAX_SEQ}", f"model.options.glyph_max_length={GLYPH}",
        "model.lora.rank=4", "model.lora.alpha=8", f"data.train_prompts={root / 'prompts.txt'}",
        f"data.heldout_prompts={root / 'prompts.txt'}", "data.prompts_per_iteration=2", "eval.samples_per_prompt=1",
        "eval.max_prompts=1", "tree.steps=4", f"tree.shift={SHIFT}", "split_plan=0:2,2:2",
        "update.updates_per_iteration=1", "update.learning_rate=1e-3",
    ])
    torch.manual_seed(0)
    trainer = Trainer(config, reward=as_reward(brightness, modality="video"))
    before = {k: v.detach().clone() for k, v in trainer.model.adapter.transformer.state_dict().items()}
    trainer.run()
    return dict(root=root, config=config, trainer=trainer, before=before)


def test_family_build_trains_lora_and_exports_both_ways(lora_run, tmp_path, capsys):
    from diffusers import HunyuanVideo15Pipeline

    from branchgrpo.cli import main

    trainer, config = lora_run["trainer"], lora_run["config"]
    bundle = trainer.model
    after = bundle.adapter.transformer.state_dict()
    changed = {k for k in lora_run["before"] if not torch.equal(lora_run["before"][k], after[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:5]
    rows = [json.loads(line) for line in (lora_run["root"] / "run" / "metrics.jsonl").read_text().splitlines()]
    train = next(row for row in rows if "reward_mean" in row)
    numbers = [v for v in train.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert "nonfinite_keys" not in train and all(math.isfinite(v) for v in numbers)
    assert train["optimizer_steps"] == 1 and train["nfe/trained_edges"] > 0
    assert 0 < train["reward_mean"] < 1 and train["reward_std"] > 0
    assert train["ratio_max_deviation_first_step"] < 1e-4  # the rollout policy is the trained one (docs/method.md §8)

    x = torch.randn(2, *bundle.latent_shape, generator=torch.Generator().manual_seed(8))
    sigma = torch.tensor([0.8, 0.3])
    cond = bundle.encode_prompts(list(PROMPTS[:2]))
    with torch.no_grad():
        ours = bundle.policy(x, sigma, cond)
    assert main(["export", str(lora_run["root"] / "run"), str(tmp_path / "lora.safetensors")]) == 0  # the CLI path
    assert "load_hunyuanvideo15_lora" in capsys.readouterr().out
    pipe = HunyuanVideo15Pipeline.from_pretrained(str(config.model.path))
    load_hunyuanvideo15_lora(pipe.transformer, tmp_path / "lora.safetensors")
    get_family("hunyuanvideo15").export(bundle, config, tmp_path / "full", "symlink")
    merged = HunyuanVideo15Pipeline.from_pretrained(str(tmp_path / "full"))
    for name, transformer in (("lora", pipe.transformer), ("full", merged.transformer)):
        adapter = make_adapter({"transformer": transformer, "vae": None, "text_encoder": None, "tokenizer": None,
                                "text_encoder_2": None, "tokenizer_2": None})
        with torch.no_grad():
            diff = (adapter.velocity_model()(x, sigma, cond) - ours).abs().max().item()
        print(f"export {name}: max|Δv|={diff:.2e}")
        assert diff < 1e-5, name


def test_missing_files_are_named(components, tmp_path):
    with pytest.raises(HunyuanVideo15FilesNotFoundError) as info:
        HunyuanVideo15Adapter.from_pretrained(tmp_path / "hv", dtype=torch.float32)
    assert "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v" in str(info.value)
    save_layout(components, tmp_path)
    shutil.rmtree(tmp_path / "tokenizer_2")
    for path in (tmp_path / "vae").glob("*.safetensors"):
        path.unlink()
    with pytest.raises(HunyuanVideo15FilesNotFoundError) as info:
        HunyuanVideo15Adapter.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(info.value)
    assert "HunyuanVideo 1.5 weights not found" in message and "tokenizer_2/" in message
    assert "vae/*.safetensors" in message and "Traceback" not in message
