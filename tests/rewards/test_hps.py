"""HPS v2.1 vs the HPSv2 repo's scoring recipe run with open_clip (skipped without open_clip).

Reference (``hpsv2/img_score.py``): ``preprocess_val`` (open_clip ``image_transform(size,
is_train=False, resize_mode='longest')``, HPSv2's ``resize_longest_max=True``) on PIL images,
``tokenizer([prompt])``, ``outputs = model(image, text)``, ``diag(image_features @
text_features.T)``, on a tiny open_clip CLIP whose ``{"state_dict": ...}`` file our reward loads.
"""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from branchgrpo.rewards import CheckpointError, build_reward  # noqa: E402
from branchgrpo.rewards.tiny import TINY_OPEN_CLIP, tiny_reward_spec  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car", "a photo of a cat", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_reward_spec("hps", tmp_path_factory.mktemp("hps"))


def _upstream(spec):
    model = open_clip.CLIP(**TINY_OPEN_CLIP, output_dict=True)  # HPSv2: output_dict=True
    model.load_state_dict(torch.load(spec.checkpoint, weights_only=True)["state_dict"])
    preprocess_val = open_clip.image_transform(
        model.visual.image_size, is_train=False, mean=None, std=None, resize_mode="longest"
    )
    return model.eval(), preprocess_val, open_clip.SimpleTokenizer(context_length=77)


def _upstream_scores(spec, pil_images, prompts):
    model, preprocess_val, tokenizer = _upstream(spec)
    out = []
    with torch.no_grad():
        for image, prompt in zip(pil_images, prompts):
            outputs = model(preprocess_val(image).unsqueeze(0), tokenizer([prompt]))
            image_features, text_features = outputs["image_features"], outputs["text_features"]
            out.append(torch.diagonal(image_features @ text_features.T)[0])
    return torch.stack(out)


def _images(size, seed, n=4):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen)
    u8 = (torch.nn.functional.interpolate(low, size=size, mode="bilinear") * 255).round().to(torch.uint8)
    return u8.float() / 255.0, [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in u8]


@pytest.mark.parametrize("size", [(32, 32), (32, 20)])
def test_hps_matches_upstream_without_resize(spec, size):
    """32x32 (model size) and 32x20 (longest edge already 32: zero padding only): exact."""
    images, pil = _images(size, seed=0)
    expected = _upstream_scores(spec, pil, PROMPTS)
    got = spec.build()(images, PROMPTS)
    diff = (got - expected).abs().max().item()
    print(f"hps {size} max |ours - upstream| = {diff:.3g} (scores {expected.tolist()})")
    assert expected.std() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hps_resize_path_close_to_upstream(spec):
    """64x40 → PIL bicubic vs torch antialiased bicubic (<= ~1/255 per pixel, see the
    preprocessing tests): the cosine moves by < 2e-3 on this model."""
    images, pil = _images((64, 40), seed=1)
    expected = _upstream_scores(spec, pil, PROMPTS)
    got = spec.build()(images, PROMPTS)
    diff = (got - expected).abs().max().item()
    print(f"hps resize path max |ours - upstream| = {diff:.3g}")
    assert diff < 2e-3


def test_hps_checkpoint_errors(spec, tmp_path):
    with pytest.raises(CheckpointError, match=r"HPS_v2\.1_compressed\.pt.*does not exist"):
        build_reward("hps", str(tmp_path / "HPS_v2.1_compressed.pt"), **spec.options)
    state = torch.load(spec.checkpoint, weights_only=True)["state_dict"]
    state.pop("text_projection")
    torch.save({"state_dict": state}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"broken\.pt.*missing keys.*text_projection"):
        build_reward("hps", str(tmp_path / "broken.pt"), **spec.options)


def test_hps_embedding_is_the_upstream_image_feature(spec):
    """``embed`` (advantage.diversity_space=reward) is HPSv2's normalised image feature."""
    images, pil = _images((32, 32), seed=3)
    model, preprocess_val, _ = _upstream(spec)
    with torch.no_grad():
        expected = torch.cat([model.encode_image(preprocess_val(p).unsqueeze(0), normalize=True) for p in pil])
    reward = spec.build()
    assert reward.embeds
    torch.testing.assert_close(reward.embed(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
