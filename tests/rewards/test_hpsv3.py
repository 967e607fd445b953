"""HPSv3 on a tiny random Qwen2-VL, against an independent forward built from the authors' source.

The authors' package (``hpsv3`` 1.0.0 on PyPI) cannot run here: its ``Qwen2VLRewardModelBT.forward``
calls ``self.model.embed_tokens`` / ``self.visual`` of the transformers 4.x class layout, gone in the
installed transformers 5, and its inference downloads from the hub. So the reference below is built
from its source as read (``hpsv3/inference.py``, ``model/qwen2vl_trainer.py``,
``dataset/data_collator_qwen.py``), with transformers' own pieces where the authors used them:
``Qwen2VLProcessor`` (image processor + the Qwen2-VL chat template, which expands ``<|image_pad|>``),
``Qwen2VLModel`` (multimodal merge) run with plain positions (the authors' forward passes
``position_ids=None`` to the text model), ``rm_head`` over all hidden states then the
``<|Reward|>`` rows, and ``mu = logits[:, 0]``.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from branchgrpo.rewards import CheckpointError, build_reward  # noqa: E402
from branchgrpo.rewards.hpsv3 import INSTRUCTION, PROMPT_SUFFIX, REWARD_TOKEN  # noqa: E402
from branchgrpo.rewards.registry import reward_info  # noqa: E402
from branchgrpo.rewards.tiny import QWEN2VL_CHAT_TEMPLATE, write_tiny_qwen_reward  # noqa: E402

torch.set_num_threads(1)

SIZE = 56  # one 2x2 merge window of 14-pixel patches per side: 4 image tokens
PROMPTS = ["a photo of a cat", "a red car on the road, in the rain"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("hpsv3")
    state = write_tiny_qwen_reward(folder, (REWARD_TOKEN,), "ranknet", seed=0)
    path = folder / "HPSv3.safetensors"
    save_file(state, str(path))
    return folder, path, state


def reference_mu_sigma(folder, state, images, prompts):
    """The authors' pipeline, rebuilt from transformers' processor/model and their forward's pooling."""
    from transformers import (AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)
    import json

    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    image_processor = Qwen2VLImageProcessor(min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE, do_rescale=False)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=QWEN2VL_CHAT_TEMPLATE)
    messages = [[{"role": "user", "content": [{"type": "image", "image": "x"},
                                              {"type": "text", "text": INSTRUCTION.format(text_prompt=p) + PROMPT_SUFFIX}]}]
                for p in prompts]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=text, images=[img.permute(1, 2, 0).numpy() for img in images], padding=True,
                      return_tensors="pt")
    config = Qwen2VLConfig(**json.loads((folder / "config.json").read_text()))
    model = Qwen2VLForConditionalGeneration(config).eval()
    new_layout = {}
    for k, v in state.items():
        if k.startswith("model."):
            new_layout["model.language_model." + k[6:]] = v
        elif k.startswith("visual."):
            new_layout["model." + k] = v
        elif k.startswith("lm_head."):
            new_layout[k] = v
    model.load_state_dict(new_layout, strict=True)
    head = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(24, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    head.load_state_dict({k[len("rm_head."):]: v for k, v in state.items() if k.startswith("rm_head.")})
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=positions,
                             pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).last_hidden_state
        logits = head(hidden)
    reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    return logits[ids == reward_id].view(ids.shape[0], -1), batch


def test_hpsv3_matches_the_authors_pipeline_rebuilt(tiny):
    folder, path, state = tiny
    torch.manual_seed(1)
    images = torch.rand(2, 3, SIZE, SIZE)
    reward = build_reward("hpsv3", str(path), pixels=SIZE * SIZE)
    expected, batch = reference_mu_sigma(folder, state, images, PROMPTS)
    pixel_values, grid = reward.preprocess(images[:, None])
    torch.testing.assert_close(pixel_values, batch["pixel_values"], atol=1e-5, rtol=0)
    assert grid.tolist() == batch["image_grid_thw"].tolist()
    mu_sigma = reward.mu_sigma(images, PROMPTS)
    torch.testing.assert_close(mu_sigma, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward(images, PROMPTS), expected[:, 0], atol=1e-5, rtol=0)
    assert (expected[0] - expected[1]).abs().max() > 1e-4  # the two images/prompts are told apart


def test_hpsv3_scores_do_not_depend_on_the_batch(tiny):
    _, path, _ = tiny
    torch.manual_seed(2)
    images = torch.rand(2, 3, SIZE, SIZE)
    reward = build_reward("hpsv3", str(path), pixels=SIZE * SIZE)
    together = reward(images, PROMPTS)  # prompts of different lengths: right padding
    alone = torch.cat([reward(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_hpsv3_pickle_and_safetensors_checkpoints_score_the_same(tiny, tmp_path):
    folder, path, state = tiny
    pickled = folder / "HPSv3.pt"
    torch.save({"model": state}, str(pickled))  # the authors' loader unwraps "model"
    torch.manual_seed(3)
    images = torch.rand(2, 3, 40, 64)  # resized to the pixel budget
    a = build_reward("hpsv3", str(path), pixels=SIZE * SIZE)(images, PROMPTS)
    b = build_reward("hpsv3", str(pickled), pixels=SIZE * SIZE)(images, PROMPTS)
    assert torch.equal(a, b)


def test_hpsv3_missing_files_are_one_line_naming_the_file_and_fetch(tiny, tmp_path):
    _, path, _ = tiny
    missing = tmp_path / "HPSv3.safetensors"
    with pytest.raises(CheckpointError, match=r"HPSv3\.safetensors: does not exist.*hf download MizzenAI/HPSv3") as err:
        build_reward("hpsv3", str(missing))
    assert "\n" not in str(err.value)
    hint = reward_info("hpsv3").fetch_hint(str(missing))
    assert hint.startswith(f"hf download MizzenAI/HPSv3 HPSv3.safetensors --local-dir {tmp_path}")
    lonely = tmp_path / "alone" / "HPSv3.safetensors"
    lonely.parent.mkdir()
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"alone/config\.json: does not exist.*base_model"):
        build_reward("hpsv3", str(lonely))


def test_hpsv3_config_preflight_prints_the_fetch_command(tmp_path, monkeypatch):
    from branchgrpo.train.components import reward_problems
    from branchgrpo.train.config import load_train_config

    monkeypatch.chdir(tmp_path)
    config = load_train_config(None, "branchgrpo", ["reward.name=hpsv3", "reward.checkpoint=models/HPSv3.safetensors"])
    [problem] = map(str, reward_problems(config, "image"))
    assert problem.startswith("reward.checkpoint: checkpoint models/HPSv3.safetensors for reward 'hpsv3' does not exist")
    assert "`hf download MizzenAI/HPSv3 HPSv3.safetensors --local-dir models;" in problem
    assert "hf download Qwen/Qwen2-VL-7B-Instruct --local-dir models" in problem
