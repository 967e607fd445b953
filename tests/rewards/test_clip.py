"""PickScore, CLIP score and the aesthetic predictor vs the upstream transformers code paths.

References run the upstream recipes on PIL images: ``AutoProcessor`` + ``AutoModel`` +
``get_image_features`` / ``get_text_features`` (PickScore repo's ``calc_probs``), ``100 * cos``
(torchmetrics' CLIPScore), and the improved-aesthetic-predictor's ``normalized(encode_image)`` →
MLP. Images are 32x32 = the tiny model's input size, so no resize happens on either side and the
comparison is exact up to float32 rounding; the resize path is covered by
tests/test_rewards_preprocess.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from branchgrpo.rewards import CheckpointError, RewardError, build_reward
from branchgrpo.rewards.tiny import tiny_reward_spec

PROMPTS = ["a photo of a cat", "a red car", "a photo of a cat", "the blue dog on the car", "an xyzzy!"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("clip")
    return {name: tiny_reward_spec(name, root) for name in ("pickscore", "clip", "aesthetic")}


def _images(n=5, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    from PIL import Image

    return u8.float() / 255.0, [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in u8]


def _features(out):
    # transformers 5 returns a model output with pooler_output = projected features; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _upstream_clip(folder):
    from transformers import AutoModel, AutoProcessor

    return AutoProcessor.from_pretrained(str(folder)), AutoModel.from_pretrained(str(folder)).eval()


def _upstream_embeddings(folder, pil_images, prompts):
    processor, model = _upstream_clip(folder)
    image_inputs = processor(images=pil_images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = _features(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = _features(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
    return model, image_embs, text_embs


def test_pickscore_matches_upstream(specs):
    images, pil = _images()
    folder = specs["pickscore"].checkpoint
    model, image_embs, text_embs = _upstream_embeddings(folder, pil, PROMPTS)
    # PickScore repo: scores = model.logit_scale.exp() * (text_embs @ image_embs.T); image i ↔ prompt i
    expected = (model.logit_scale.exp() * (text_embs @ image_embs.T)).diagonal()
    got = specs["pickscore"].build()(images, PROMPTS)
    diff = (got - expected).abs().max().item()
    print(f"pickscore max |ours - upstream| = {diff:.3g}")
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_clip_score_matches_upstream(specs):
    images, pil = _images(seed=1)
    _, image_embs, text_embs = _upstream_embeddings(specs["clip"].checkpoint, pil, PROMPTS)
    expected = 100.0 * (image_embs * text_embs).sum(-1)  # torchmetrics CLIPScore without its clamp at 0
    reward = specs["clip"].build()
    got = reward(images, PROMPTS)
    diff = (got - expected).abs().max().item()
    print(f"clip max |ours - upstream| = {diff:.3g}")
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-5)
    clamped = build_reward("clip", specs["clip"].checkpoint, clamp=True)(images, PROMPTS)
    torch.testing.assert_close(clamped, expected.clamp_min(0), atol=1e-3, rtol=1e-5)


def test_aesthetic_matches_upstream(specs):
    """improved-aesthetic-predictor simple_inference.py: MLP(normalized(encode_image(x)))."""
    images, pil = _images(seed=2)
    spec = specs["aesthetic"]
    processor, model = _upstream_clip(spec.options["clip_model"])
    with torch.no_grad():
        features = _features(model.get_image_features(**processor(images=pil, return_tensors="pt"))).numpy()
    norm = np.linalg.norm(features, 2, axis=-1, keepdims=True)
    normalized = features / np.where(norm == 0, 1, norm)  # upstream normalized()
    mlp = torch.nn.Sequential(  # upstream MLP(768), here with the tiny CLIP's width
        torch.nn.Linear(normalized.shape[1], 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )
    state = torch.load(spec.checkpoint, weights_only=True)
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    with torch.no_grad():
        expected = mlp.eval()(torch.from_numpy(normalized).float()).squeeze(-1)
    got = spec.build()(images, ["ignored"] * 5)
    diff = (got - expected).abs().max().item()
    print(f"aesthetic max |ours - upstream| = {diff:.3g}")
    assert expected.std() > 1e-4
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_batching_cache_and_devices(specs):
    images, _ = _images(seed=3)
    reward = specs["pickscore"].build()
    full = reward(images, PROMPTS)
    singles = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(full, singles, atol=1e-5, rtol=0)
    again = reward(images, PROMPTS)  # text features now come from the prompt cache
    assert torch.equal(full, again)
    assert reward(images[:0], []).shape == (0,)
    # bf16 reward: same interface, float32 scores close to the float32 ones
    bf16 = build_reward("pickscore", specs["pickscore"].checkpoint, dtype="bfloat16")
    scores = bf16(images, PROMPTS)
    assert scores.dtype == torch.float32 and (scores - full).abs().max() < 0.5


def test_input_errors(specs):
    reward = specs["clip"].build()
    images, _ = _images()
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        reward(images, PROMPTS[:4])
    with pytest.raises(ValueError, match=r"3-channel"):
        reward(images[:, :1], PROMPTS)
    with pytest.raises(ValueError, match="list of strings"):
        reward(images[:1], "a cat")


def test_missing_and_wrong_checkpoints(specs, tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere.*does not exist"):
        build_reward("pickscore", str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no checkpoint given"):
        build_reward("clip")
    # a folder without weights
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"empty/model\.safetensors.*is missing"):
        build_reward("clip", str(tmp_path / "empty"))
    # the weights file itself is accepted in place of its folder
    weights = f"{specs['clip'].checkpoint}/model.safetensors"
    assert build_reward("clip", weights)(_images()[0], PROMPTS).shape == (5,)
    # aesthetic: missing CLIP model, and a head that is not the aesthetic head
    with pytest.raises(CheckpointError, match="clip_model"):
        build_reward("aesthetic", specs["aesthetic"].checkpoint)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "not_a_head.pth")
    with pytest.raises(CheckpointError, match=r"not_a_head\.pth.*not the aesthetic MLP head"):
        build_reward("aesthetic", str(tmp_path / "not_a_head.pth"), **specs["aesthetic"].options)
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pth.*could not be read"):
        build_reward("aesthetic", str(tmp_path / "garbage.pth"), **specs["aesthetic"].options)
    with pytest.raises(RewardError, match="no option 'procesor'"):
        build_reward("pickscore", specs["pickscore"].checkpoint, procesor="x")


@pytest.mark.parametrize("name", ["pickscore", "clip"])
def test_embedding_is_the_upstream_image_feature(specs, name):
    """``embed`` (advantage.diversity_space=reward) is the normalised CLIP image feature the score uses."""
    images, pil = _images(seed=2)
    _, image_embs, _ = _upstream_embeddings(specs[name].checkpoint, pil, PROMPTS)
    reward = specs[name].build()
    assert reward.embeds
    got = reward.embed(images, PROMPTS)
    assert got.shape == image_embs.shape
    torch.testing.assert_close(got, image_embs, atol=1e-5, rtol=1e-5)
