"""The ``edit`` reward on a tiny random CLIP: each term against transformers' own CLIPModel features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from branchgrpo.rewards.base import RewardError
from branchgrpo.rewards.edit import EditReward, directional_similarity, read_source
from branchgrpo.rewards.registry import build_reward, reward_info
from branchgrpo.rewards.tiny import write_tiny_clip

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit")
    write_tiny_clip(folder / "clip", seed=0)
    generator = torch.Generator().manual_seed(0)
    sources = []
    for index in range(2):
        pixels = (torch.rand(24, 20, 3, generator=generator) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"source{index}.png")
        sources.append(torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1))
    rows = [json.dumps({"prompt": "a red cat", "image": "source0.png", "source_caption": "a cat",
                        "target_caption": "a red cat"}),
            json.dumps({"prompt": "the blue car", "image": str(folder / "source1.png"), "source_caption": "a car",
                        "target_caption": "the blue car"})]
    edits = torch.rand(2, 3, 24, 20, generator=generator)
    return folder, sources, rows, edits


def reference_features(folder, images, texts):
    """transformers' CLIPModel.get_image_features / get_text_features, normalised (independent of our code)."""
    from transformers import CLIPModel, CLIPTokenizer

    from branchgrpo.rewards.preprocess import ImagePreprocess

    model = CLIPModel.from_pretrained(str(folder / "clip")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "clip"))
    pixels = ImagePreprocess.from_hf_config(folder / "clip" / "preprocessor_config.json")(images)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        text = model.get_text_features(**tokens)
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def test_terms_and_weights_match_an_independent_clip_computation(setup):
    folder, sources, rows, edits = setup
    reward = EditReward(folder / "clip", instruction_weight=0.7, consistency_weight=0.3, image_root=folder)
    with torch.no_grad():
        terms = reward.terms(edits, rows)
    edit_f, text_f = reference_features(folder, edits, ["a red cat", "the blue car"])
    source_f, _ = reference_features(folder, torch.stack(sources), ["a"])
    torch.testing.assert_close(terms["instruction"], (edit_f * text_f).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(terms["consistency"], (edit_f * source_f).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(reward(edits, rows), 0.7 * terms["instruction"] + 0.3 * terms["consistency"],
                               atol=1e-6, rtol=0)


def test_an_unchanged_source_is_fully_consistent(setup):
    folder, sources, rows, _ = setup
    reward = EditReward(folder / "clip", instruction_weight=0.0, consistency_weight=1.0, image_root=folder)
    torch.testing.assert_close(reward(torch.stack(sources), rows), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(read_source(folder / "source0.png"), sources[0])


def test_directional_similarity_closed_form_and_in_the_reward(setup):
    # closed form on known vectors: image direction (1, 0), text direction (1, 1) → cos 45° = 1/√2
    value = directional_similarity(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]]),
                                   torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(value, torch.tensor([2 ** -0.5]))
    folder, sources, rows, edits = setup
    reward = EditReward(folder / "clip", instruction="directional", image_root=folder)
    with torch.no_grad():
        terms = reward.terms(edits, rows)
    edit_f, target_f = reference_features(folder, edits, ["a red cat", "the blue car"])
    source_f, caption_f = reference_features(folder, torch.stack(sources), ["a cat", "a car"])
    expected = torch.nn.functional.cosine_similarity(edit_f - source_f, target_f - caption_f, dim=-1)
    torch.testing.assert_close(terms["instruction"], expected, atol=1e-5, rtol=0)


def test_bad_rows_and_options_name_the_field(setup):
    folder, _, rows, edits = setup
    reward = EditReward(folder / "clip", image_root=folder)
    with pytest.raises(RewardError, match="no 'image' field"):
        reward(edits[:1], [json.dumps({"prompt": "make it red"})])
    with pytest.raises(RewardError, match="scores edit rows"):
        reward(edits[:1], ["a plain text prompt"])
    with pytest.raises(RewardError, match="does not exist"):
        reward(edits[:1], [json.dumps({"prompt": "x", "image": "missing.png"})])
    directional = EditReward(folder / "clip", instruction="directional", image_root=folder)
    with pytest.raises(RewardError, match="no 'source_caption' field"):
        directional(edits[:1], [json.dumps({"prompt": "x", "image": "source0.png"})])
    with pytest.raises(ValueError, match="reward.options.instruction must be one of clip, directional"):
        EditReward(folder / "clip", instruction="vqa")
    with pytest.raises(ValueError, match="reward.options.consistency_weight"):
        EditReward(folder / "clip", consistency_weight=float("nan"))


def test_registered_with_its_declarations(setup):
    folder, _, rows, edits = setup
    info = reward_info("edit")
    assert (info.modality, info.needs_checkpoint) == ("image", True)
    assert {"instruction_weight", "consistency_weight", "instruction", "image_root"} <= set(info.options)
    assert "clip-vit-large-patch14" in info.fetch_hint("data/clip")
    reward = build_reward("edit", checkpoint=str(folder / "clip"), image_root=str(folder))
    assert reward(edits, rows).shape == (2,)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):  # modality: a video batch is refused
        reward(edits[:, None], rows)
