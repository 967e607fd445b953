"""Wan2.1: the adapter conformance suite (tests/models/conformance.py) on tiny random models of the
real architectures (WanTransformer3DModel with RMS q/k norm and 3-D RoPE, AutoencoderKLWan with the
real 8×/4× spatial and temporal factors and latent mean/std, a UMT5 encoder), plus what is Wan's own:
classifier-free guidance as one doubled call, the timestep convention, the video latent and frame
layout, prompt cleaning and padding, the folder layout's errors, the video rewards, and LoRA on
Wan's attention names through the Trainer.

The oracle: at η = 0 (pure ODE) our frontier rollout of the Wan velocity model with classifier-free
guidance reproduces ``WanPipeline`` driven by an Euler scheduler on the same σ (same noise) — final
latents and decoded videos — which pins the timestep (1000·σ), CFG order/mixing, the video latent
layout and the VAE's latent normalisation to the library's.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys

import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.models.base import spec_sigmas_for_pipeline
from branchgrpo.models.loading import ModelFilesNotFoundError
from branchgrpo.models.lora import lora_named_parameters
from branchgrpo.models.prompt_cache import PromptNotCachedError
from branchgrpo.models.wan import WanAdapter, WanFilesNotFoundError, WanVelocity
from branchgrpo.rewards import RewardError, build_reward
from branchgrpo.rewards.video import FrameAveragedReward, frame_indices
from branchgrpo.train.components import check_reward_config
from branchgrpo.train.config import LoraConfig, load_train_config
from branchgrpo.train.trainer import Trainer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from conformance import (  # noqa: E402
    FamilyCase,
    brightness,
    check_trainer_iteration,
    conformance_tests,
    make_trainer,
    save_layout,
)

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street", "tree", "ugly", "blurry"]
PROMPTS = ["a photo of a cat", "red car on the street", "blue tree"]
NEGATIVE = "ugly blurry"
HEIGHT, WIDTH, FRAMES = 32, 48, 5  # VAE 8× / 4× → latent [16, 2, 4, 6]; patch (1, 2, 2) → 12 tokens per frame
MAX_SEQ = 10
GUIDANCE = 5.0


def umt5_tokenizer():
    """A sentencepiece-unigram tokenizer (the UMT5 kind) whose pieces are the words of WORDS."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_components(seed: int = 0, t5_layers: int = 1) -> dict:
    """Random Wan transformer, Wan VAE (real compression factors, default latent mean/std) and UMT5."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
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
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def make_adapter(components: dict, **kwargs) -> WanAdapter:
    kwargs = {"max_sequence_length": MAX_SEQ, "height": HEIGHT, "width": WIDTH, "num_frames": FRAMES,
              "guidance_scale": GUIDANCE, "negative_prompt": NEGATIVE, "decode_batch_size": 4, **kwargs}
    return WanAdapter(**components, **kwargs)


def wan_pipeline(components: dict):
    """``WanPipeline`` with an Euler scheduler on docs/method.md §2's σ grid (the pipeline passes no ``sigmas=``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock = scheduler.set_timesteps
    scheduler.set_timesteps = lambda steps, device=None: stock(sigmas=spec_sigmas_for_pipeline(steps), device=device)
    return WanPipeline(scheduler=scheduler, **components)


def pipeline_embeds(pipe, prompts: list[str]) -> dict:
    embeds, negative = pipe.encode_prompt(prompts, negative_prompt=NEGATIVE, max_sequence_length=MAX_SEQ,
                                          device=torch.device("cpu"))
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}


def load_adapter(folder, cache_dir) -> WanAdapter:
    return WanAdapter.from_pretrained(
        folder, dtype=torch.float32, text_encoders="lazy", max_sequence_length=MAX_SEQ, height=HEIGHT, width=WIDTH,
        num_frames=FRAMES, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, prompt_cache_dir=cache_dir,
    )


CASE = FamilyCase(
    name="wan",
    components=lambda seed: tiny_components(seed=seed),
    adapter=make_adapter,
    pipeline=wan_pipeline,
    call=dict(negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES, guidance_scale=GUIDANCE,
              max_sequence_length=MAX_SEQ),
    pipeline_embeds=pipeline_embeds,
    output_shape=(FRAMES, 3, HEIGHT, WIDTH),
    prompts=tuple(PROMPTS),
    pass_sigmas=False,  # WanPipeline takes no sigmas=: wan_pipeline's scheduler sets them
    output_attr="frames",
    guidance_off={"guidance_scale": 1.0},  # CFG matters: the unguided sample is elsewhere
    adapter_guidance_off={"guidance_scale": 1.0},
    decode_atol=1e-5,  # batch size picks other conv kernels: float32 rounding (measured 1.6e-6 on [0, 1] pixels)
    trainer=False,  # run below with a frame-counting reward: test_one_branchgrpo_iteration_with_frame_averaged_reward
    load=load_adapter,
)
globals().update(conformance_tests(CASE))


@pytest.fixture(scope="module")
def components():
    return tiny_components()


# -- guidance and the timestep --------------------------------------------------------------------


def test_cfg_is_one_doubled_call_equal_to_two_calls(components):
    adapter = make_adapter(components)
    cond = adapter.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    calls: list[tuple[int, list[float]]] = []
    hook = adapter.transformer.register_forward_hook(
        lambda _m, _a, kw, _o: calls.append((kw["hidden_states"].shape[0], kw["timestep"].tolist())), with_kwargs=True
    )
    try:
        guided = adapter.velocity_model()(x, sigma, cond)
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0][0] == 4  # one call on the doubled batch [x; x]
    torch.testing.assert_close(torch.tensor(calls[0][1]), torch.tensor([900.0, 400.0, 900.0, 400.0]))
    plain = adapter.velocity_model(guidance_scale=1.0)
    v_cond = plain(x, sigma, cond)
    v_uncond = plain(x, sigma, {"prompt_embeds": cond["negative_prompt_embeds"]})
    torch.testing.assert_close(guided, v_uncond + GUIDANCE * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        adapter.velocity_model()(x, sigma, {"prompt_embeds": cond["prompt_embeds"]})


def test_timestep_is_1000_sigma(components):
    seen = []
    transformer = components["transformer"]
    hook = transformer.register_forward_hook(lambda _m, _a, kw, _o: seen.append(kw["timestep"]), with_kwargs=True)
    try:
        cond = make_adapter(components).encode_prompts(PROMPTS[:1], with_negative=False)
        WanVelocity(transformer, guidance_scale=1.0)(torch.zeros(1, 16, 2, 4, 6), torch.tensor([0.25]), cond)
    finally:
        hook.remove()
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [250.0]


# -- sizes, decoding ------------------------------------------------------------------------------


def test_latent_shape_and_size_checks(components):
    adapter = make_adapter(components)
    assert adapter.latent_shape() == (16, 2, 4, 6)
    assert adapter.latent_shape(64, 32, 33) == (16, 9, 8, 4)
    assert WanAdapter().latent_shape(480, 832, 33) == (16, 9, 60, 104)  # the preset's video, without modules
    with pytest.raises(ValueError, match="num_frames must be 4k \\+ 1"):
        adapter.latent_shape(num_frames=6)
    with pytest.raises(ValueError, match="multiple of 16x16"):
        adapter.velocity_model(40, 48)
    with pytest.raises(ValueError, match="num_frames"):
        WanAdapter(num_frames=32)
    assert adapter.velocity_model().compute_dtype is None  # float32 on CPU


def test_decode_refuses_image_latents(components):
    adapter = make_adapter(components)
    z = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="Wan latents are"):
        adapter.decode(z[:, :, 0])


# -- prompts and the cache ------------------------------------------------------------------------


def test_prompts_are_cleaned_and_padded_with_zeros_as_the_pipeline_does(components):
    adapter = make_adapter(components)
    ours = adapter.encode_prompts(PROMPTS, with_negative=False)["prompt_embeds"]
    assert ours.shape == (3, MAX_SEQ, 32)
    # zeros beyond each prompt's tokens ("blue tree" = 2 words + </s>), as WanPipeline pads
    assert ours[2, 3:].abs().max() == 0 and ours[2, :3].abs().min() > 0
    cleaned = adapter.encode_prompts(["  red   car on\tthe street "], with_negative=False)["prompt_embeds"]
    torch.testing.assert_close(cleaned[0], ours[1], rtol=0, atol=1e-6)  # prompt_clean


def test_a_cache_miss_names_the_negative_prompt_and_the_identity_follows_the_encoder(components, tmp_path):
    encoder = make_adapter(components)
    encoder.preprocess_prompts(PROMPTS[:1], tmp_path)
    trainer_side = make_adapter({**components, "text_encoder": None}, prompt_cache_dir=tmp_path,
                                encoder_config=encoder.encoder_config)
    with pytest.raises(PromptNotCachedError, match="and the negative prompt"):
        trainer_side.encode_prompts(["a dog"])
    other = make_adapter({**components, "text_encoder": tiny_components(t5_layers=2)["text_encoder"]})
    assert other.encoder_identity != encoder.encoder_identity


# -- loading --------------------------------------------------------------------------------------


def test_missing_folder_raises_a_download_hint(tmp_path):
    with pytest.raises(ModelFilesNotFoundError) as info:
        WanAdapter.from_pretrained(tmp_path / "wan", dtype=torch.float32)
    assert isinstance(info.value, WanFilesNotFoundError)
    message = str(info.value)
    assert "Wan2.1 weights not found" in message and str(tmp_path / "wan") in message
    assert f"hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir {tmp_path / 'wan'}" in message
    assert "text_encoder/" in message and "FLUX" not in message and "gated" not in message


def test_missing_subfolder_and_shard_are_named(components, tmp_path):
    save_layout(components, tmp_path)
    for path in (tmp_path / "vae").glob("*.safetensors"):
        path.unlink()
    (tmp_path / "text_encoder" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00005.safetensors"}}'
    )
    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(WanFilesNotFoundError) as info:
        WanAdapter.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(info.value)
    assert "tokenizer/" in message and "vae/*.safetensors" in message
    assert "model-00001-of-00005.safetensors" in message and "Traceback" not in message


def test_hub_id_offline_without_a_download_raises(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WanFilesNotFoundError, match="/path/to/Wan2.1-T2V-1.3B-Diffusers"):
        WanAdapter.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", local_files_only=True)


# -- video rewards --------------------------------------------------------------------------------


def test_frame_indices_are_evenly_spaced_segment_centres():
    assert frame_indices(33, 4).tolist() == [4, 12, 20, 28]
    assert frame_indices(33, 1).tolist() == [16]
    assert frame_indices(5, 8).tolist() == [0, 1, 2, 3, 4]


def test_frame_averaged_reward_is_one_batched_image_reward_call():
    calls = []

    def image_reward(images, prompts):
        calls.append((tuple(images.shape), list(prompts)))
        return brightness(images, prompts)

    videos = torch.rand(2, 9, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    reward = FrameAveragedReward(image_reward=image_reward, num_frames=3)
    scores = reward(videos, ["p", "q"])
    assert calls == [((6, 3, 4, 4), ["p", "p", "p", "q", "q", "q"])]
    torch.testing.assert_close(scores, videos[:, [1, 4, 7]].flatten(2).mean(dim=(1, 2)))
    with pytest.raises(ValueError, match=r"videos \[B, F, C, H, W\]"):
        reward(videos[:, 0], ["p", "q"])
    with pytest.raises(RewardError, match="image_reward"):
        build_reward("frames")
    with pytest.raises(RewardError, match="unknown reward 'no_such_reward'"):
        build_reward("frames", image_reward="no_such_reward")
    with pytest.raises(RewardError, match="must score images"):
        build_reward("frames", image_reward="videoalign")


def motion_scorer_factory(checkpoint=None, device=None, dtype=None, scale=1.0):
    """An entry point for the videoalign hook: mean absolute frame difference ("motion")."""
    def scorer(videos, prompts):
        return scale * (videos[:, 1:] - videos[:, :-1]).abs().flatten(1).mean(dim=1)
    return scorer


def test_videoalign_hook_loads_an_entry_point_and_explains_what_is_missing():
    videos = torch.rand(3, 5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    module = __name__ if __name__ in sys.modules else "test_wan"
    reward = build_reward("videoalign", "ckpt", entry_point=f"{module}:motion_scorer_factory",
                          entry_options={"scale": 2.0})
    torch.testing.assert_close(reward(videos, ["a"] * 3), motion_scorer_factory(scale=2.0)(videos, None))
    with pytest.raises(RewardError, match="neither url nor entry_point"):
        build_reward("videoalign")
    with pytest.raises(RewardError, match="'package.module:function'"):
        build_reward("videoalign", entry_point="no_colon")
    with pytest.raises(RewardError, match="cannot import"):
        build_reward("videoalign", entry_point="no_such_module_xyz:f")


def test_reward_config_matches_videos_to_video_rewards():
    def config(*overrides):
        return load_train_config(None, "branchgrpo", ["model.family=wan", *overrides])

    with pytest.raises(ConfigError, match="frames"):
        check_reward_config(config("reward.name=hps", "reward.checkpoint=x"))
    with pytest.raises(ConfigError, match="reward.options"):
        check_reward_config(config("reward.name=videoalign"))
    with pytest.raises(ConfigError, match="reward.options.image_reward"):
        check_reward_config(config("reward.name=frames"))
    configured = config("reward.name=videoalign")
    configured.reward.options = {"entry_point": "my_rewards:load"}  # no checkpoint needed: the hook's own business
    check_reward_config(configured)
    with pytest.raises(ConfigError, match="model.options.num_frames"):
        config("model.options.num_frames=32")


# -- BranchGRPO iterations for Wan through the Trainer --------------------------------------------


def wan_trainer(tmp_path, adapter: WanAdapter, reward, lora: LoraConfig | None = None) -> Trainer:
    """The conformance suite's trainer for Wan (2 prompts, 4 steps, a 2×2 tree, one update)."""
    return make_trainer(CASE, tmp_path, adapter, reward, lora=lora)


def test_one_branchgrpo_iteration_with_frame_averaged_reward(tmp_path):
    """The suite's trainer check, with a reward that records what it is given."""
    seen = []

    def image_reward(images, prompts):
        seen.append(tuple(images.shape))
        return brightness(images, prompts)

    case = dataclasses.replace(CASE, reward=lambda: FrameAveragedReward(image_reward=image_reward, num_frames=3))
    check_trainer_iteration(case, tmp_path)
    assert (8 * 3, 3, HEIGHT, WIDTH) in seen  # 2 trees × 4 leaves, 3 frames each, in one reward call


def test_lora_on_wan_trains_only_lora_tensors(tmp_path):
    adapter = make_adapter(tiny_components(seed=2))
    trainer = wan_trainer(tmp_path, adapter, FrameAveragedReward(image_reward=brightness, num_frames=2),
                          lora=LoraConfig(rank=4, alpha=8.0))
    lora = dict(lora_named_parameters(adapter.transformer))
    assert len(lora) == 2 * 8 * 2  # (A, B) × attn1/attn2 q, k, v, out × 2 blocks: Wan's names, not SD3's
    before = {k: v.detach().clone() for k, v in adapter.transformer.state_dict().items()}
    metrics = trainer.step()
    assert metrics["optimizer_steps"] == 1
    after = adapter.transformer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:5]
    assert any(".lora_B." in k for k in changed)  # B moves first (A's gradient is B·… = 0 at init)
