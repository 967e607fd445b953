"""VideoAlign's VideoReward on a tiny random Qwen2-VL, against an independent forward built from the
authors' source.

The authors' code (github KwaiVGI/VideoAlign) is not on PyPI and cannot run here (its model class
uses the transformers 4.x layout, ``qwen_vl_utils`` decodes video files, checkpoints come from the
hub). The reference below is built from its source as read (``inference.py``, ``prompt_template.py``
``detailed_special``, the ``Qwen2VLRewardModelBT`` forward): ``Qwen2VLProcessor`` with the Qwen2-VL
chat template and video processor, ``Qwen2VLModel`` with plain positions, a bias-free
``Linear(hidden, 1)`` at ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>`` → (VQ, MQ, TA),
then ``(x - mean) / std`` per dimension and ``Overall`` = their sum.
"""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from branchgrpo.rewards import CheckpointError, RewardError, build_reward  # noqa: E402
from branchgrpo.rewards.registry import reward_info  # noqa: E402
from branchgrpo.rewards.tiny import QWEN2VL_CHAT_TEMPLATE, write_tiny_qwen_reward  # noqa: E402
from branchgrpo.rewards.videoalign import DETAILED_PROMPT_WITH_SPECIAL_TOKEN, SPECIAL_TOKENS  # noqa: E402

torch.set_num_threads(1)

SIZE = 56
NORM = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811, "TA_mean": 2.8105, "TA_std": 2.5121}
PROMPTS = ["a cat walks on the grass", "the camera follows a red car through the rain at night"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("VideoReward")
    state = write_tiny_qwen_reward(folder, SPECIAL_TOKENS, "linear", seed=0)
    (folder / "checkpoint-1").mkdir()
    path = folder / "checkpoint-1" / "model.pth"
    torch.save(state, str(path))
    (folder / "model_config.json").write_text(json.dumps({"inference_config": NORM}))
    return folder, path, state


def reference_raw(folder, state, videos, prompts):
    from transformers import (AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    video_processor = Qwen2VLVideoProcessor(min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE, do_rescale=False,
                                            do_sample_frames=False)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=QWEN2VL_CHAT_TEMPLATE)
    messages = [[{"role": "user", "content": [
        {"type": "video", "video": "x"},
        {"type": "text", "text": DETAILED_PROMPT_WITH_SPECIAL_TOKEN.format(text_prompt=p)}]}] for p in prompts]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=text, videos=[v for v in videos], padding=True, return_tensors="pt",
                      videos_kwargs={"do_rescale": False})
    config = Qwen2VLConfig(**json.loads((folder / "config.json").read_text()))
    model = Qwen2VLForConditionalGeneration(config).eval()
    layout = {}
    for k, v in state.items():
        if k.startswith("model."):
            layout["model.language_model." + k[6:]] = v
        elif k.startswith("visual."):
            layout["model." + k] = v
        elif k.startswith("lm_head."):
            layout[k] = v
    model.load_state_dict(layout, strict=True)
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=positions,
                             pixel_values_videos=batch["pixel_values_videos"],
                             video_grid_thw=batch["video_grid_thw"]).last_hidden_state
    logits = hidden @ state["rm_head.weight"].T  # [B, L, 1]
    special = torch.zeros_like(ids, dtype=torch.bool)
    for token in tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)):
        special |= ids == token
    return logits[special].view(ids.shape[0], -1), batch


def test_videoalign_matches_the_authors_pipeline_rebuilt(tiny):
    folder, path, state = tiny
    torch.manual_seed(1)
    videos = torch.rand(2, 4, 3, SIZE, SIZE)
    reward = build_reward("videoalign", str(path), min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE)
    raw, batch = reference_raw(folder, state, videos, PROMPTS)
    pixel_values, grid = reward.preprocess(videos)
    torch.testing.assert_close(pixel_values, batch["pixel_values_videos"], atol=1e-5, rtol=0)
    assert grid.tolist() == batch["video_grid_thw"].tolist() == [[2, 4, 4]] * 2
    torch.testing.assert_close(reward.raw_scores(videos, PROMPTS), raw, atol=1e-5, rtol=0)
    assert (raw[0] - raw[1]).abs().max() > 1e-4
    mean = torch.tensor([NORM["VQ_mean"], NORM["MQ_mean"], NORM["TA_mean"]])
    std = torch.tensor([NORM["VQ_std"], NORM["MQ_std"], NORM["TA_std"]])
    normed = (raw - mean) / std
    torch.testing.assert_close(reward(videos, PROMPTS), normed[:, 1], atol=1e-5, rtol=0)  # MQ by default
    reward.dimension = "Overall"  # the options' effect, without loading the model again
    torch.testing.assert_close(reward(videos, PROMPTS), normed.sum(1), atol=1e-5, rtol=0)
    reward.dimension, reward.norm = "TA", None  # use_norm=False
    torch.testing.assert_close(reward(videos, PROMPTS), raw[:, 2], atol=1e-5, rtol=0)


def test_videoalign_frames_batch_and_saved_copy(tiny, tmp_path):
    _, path, state = tiny
    torch.manual_seed(2)
    videos = torch.rand(2, 6, 3, 40, 60)  # resized; 6 frames, 3 of them scored
    reward = build_reward("videoalign", str(path), num_frames=3, min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE)
    scores = reward(videos, PROMPTS)
    picked = videos[:, [1, 3, 5]]  # frame_indices(6, 3): segment centres
    alone = torch.cat([reward(videos[i:i + 1], PROMPTS[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(alone, scores, atol=1e-5, rtol=0)
    reward.num_frames = None  # every frame given
    torch.testing.assert_close(reward(picked, PROMPTS), scores, atol=1e-6, rtol=0)
    from safetensors.torch import save_file

    copy = tmp_path / "copy.safetensors"
    save_file(state, str(copy))
    again = build_reward("videoalign", str(copy), base_model=str(path.parent.parent), normalization=NORM,
                         num_frames=3, min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE)
    assert torch.equal(again(videos, PROMPTS), scores)


def test_videoalign_errors_name_the_file_and_the_fetch(tiny, tmp_path):
    _, path, _ = tiny
    missing = tmp_path / "VideoReward" / "checkpoint-1" / "model.pth"
    with pytest.raises(CheckpointError, match=r"model\.pth: does not exist.*hf download KwaiVGI/VideoReward") as err:
        build_reward("videoalign", str(missing))
    assert "\n" not in str(err.value)
    assert reward_info("videoalign").fetch_hint(str(missing)).startswith(
        f"hf download KwaiVGI/VideoReward --local-dir {tmp_path / 'VideoReward'}")
    with pytest.raises(RewardError, match="dimension must be one of VQ, MQ, TA, Overall"):
        build_reward("videoalign", str(path), dimension="motion")
    with pytest.raises(RewardError, match="neither url nor entry_point nor a checkpoint"):
        build_reward("videoalign")


def test_videoalign_config_check_asks_for_the_checkpoint_and_prints_the_fetch(tmp_path):
    from branchgrpo.config import ConfigError
    from branchgrpo.train.components import check_reward_config
    from branchgrpo.train.config import load_train_config

    def config(*overrides):
        return load_train_config(None, "branchgrpo", ["model.family=wan", "reward.name=videoalign", *overrides])

    missing = tmp_path / "VideoReward" / "checkpoint-1" / "model.pth"
    with pytest.raises(ConfigError, match="hf download KwaiVGI/VideoReward"):
        check_reward_config(config(f"reward.checkpoint={missing}"))
    with pytest.raises(ConfigError, match="VideoReward checkpoint"):
        check_reward_config(config())
