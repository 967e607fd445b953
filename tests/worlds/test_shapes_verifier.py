"""The shapes world's prompt parser, renderer and exact verifier (docs/shapes-world.md).

Partial-credit expectations are worked out by hand from the documented formula, not by calling it.
"""

import pytest
import torch

from branchgrpo.worlds.shapes.prompts import (
    Group, SceneSpec, all_specs, make_prompt, parse_prompt, split_prompts,
)
from branchgrpo.worlds.shapes.scenes import BOX, CELL, IMAGE_SIZE, PALETTE, render, shape_mask
from branchgrpo.worlds.shapes.verifier import classify_shape, detect_objects, verify


def scene(*objects):
    """Black 32×32 image with ``(colour, shape, row, col)`` objects drawn in grid cells."""
    image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    for colour, shape, row, col in objects:
        y0, x0 = row * CELL + 1, col * CELL + 1
        mask = shape_mask(shape)
        for c, value in enumerate(PALETTE[colour]):
            image[c, y0 : y0 + BOX, x0 : x0 + BOX][mask] = value
    return image


def score(image, prompt):
    return float(verify(image[None], [prompt])[0])


# ---- parser ----

def test_parser_round_trips_every_spec():
    for spec in all_specs():
        assert parse_prompt(make_prompt(spec)) == spec


def test_parser_reads_issue_examples():
    assert parse_prompt("two red circles left of a blue square") == SceneSpec(
        (Group(2, "red", "circle"), Group(1, "blue", "square")), "left of")
    assert parse_prompt("A  Green triangle") == SceneSpec((Group(1, "green", "triangle"),))
    assert parse_prompt("three yellow squares").num_objects == 3


@pytest.mark.parametrize("prompt, words", [
    ("a purple circle", "not a shapes-world prompt"),
    ("two red circle", "disagree"),
    ("a red circles", "disagree"),
    ("three red circles above two blue squares", "5 objects"),
    ("a red circle left of two red circles", "same colour and shape"),
    ("", "not a shapes-world prompt"),
])
def test_parser_errors_name_the_prompt(prompt, words):
    with pytest.raises(ValueError, match=words) as err:
        parse_prompt(prompt)
    assert repr(prompt) in str(err.value)


def test_heldout_prompts_are_new_combinations():
    train, heldout = split_prompts()
    assert len(heldout) == 24 and len(set(heldout)) == 24
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) == len(all_specs())
    assert sum(" of " in p or " above " in p or " below " in p for p in heldout) == 16


# ---- rendering ----

def test_render_is_deterministic_and_seed_dependent():
    spec = parse_prompt("two red circles left of a blue square")
    assert torch.equal(render(spec, 7), render(spec, 7))
    assert any(not torch.equal(render(spec, 0), render(spec, s)) for s in range(1, 5))
    image = render(spec, 3)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    # only palette colours and black
    colours = {tuple(v.tolist()) for v in image.reshape(3, -1).T}
    assert colours <= {(0.0, 0.0, 0.0), *PALETTE.values()}


def test_shape_masks_have_documented_pixel_counts():
    assert [int(shape_mask(s).sum()) for s in ("square", "circle", "triangle")] == [36, 24, 18]
    for s in ("square", "circle", "triangle"):
        assert classify_shape(shape_mask(s).numpy()) == s


# ---- verifier ----

def test_ground_truth_scores_one_on_heldout_and_train_prompts():
    train, heldout = split_prompts()
    prompts = [p for p in heldout for _ in range(10)] + train[::25]
    seeds = list(range(len(prompts)))
    images = torch.stack([render(parse_prompt(p), s) for p, s in zip(prompts, seeds)])
    assert torch.equal(verify(images, prompts), torch.ones(len(prompts)))


def test_blank_image_scores_zero():
    assert score(torch.zeros(3, 32, 32), "a red circle") == 0.0
    assert score(torch.zeros(3, 32, 32), "two red circles left of a blue square") == 0.0


@pytest.mark.parametrize("objects, prompt, expected", [
    # count: m = k = h = 1 of 2 → obj = 0.5, total = 0.5 → 0.8·0.5 + 0.2·0.5
    ([("red", "circle", 0, 0)], "two red circles", 0.5),
    # extra: 3 red circles for 2 → ratios 2/3 → 0.8·(2/3) + 0.2·(2/3)
    ([("red", "circle", 0, 0), ("red", "circle", 2, 2), ("red", "circle", 3, 0)], "two red circles", 2 / 3),
    # colour wrong: m = 0, k = 0, h = 1 → obj = 0.2, total = 1 → 0.16 + 0.2
    ([("blue", "circle", 1, 1)], "a red circle", 0.36),
    # shape wrong: m = 0, k = 1, h = 0 → obj = 0.2 → 0.36
    ([("red", "square", 1, 1)], "a red circle", 0.36),
    # one unrelated extra object: obj = 1, total = 1/2 → 0.8 + 0.1
    ([("red", "circle", 0, 0), ("green", "triangle", 3, 3)], "a red circle", 0.9),
    # relation right, everything present → 1
    ([("red", "circle", 0, 0), ("blue", "square", 0, 3)], "a red circle left of a blue square", 1.0),
    # relation wrong: obj = 1, total = 1, pos = 0 → 0.6 + 0.15
    ([("red", "circle", 0, 3), ("blue", "square", 0, 0)], "a red circle left of a blue square", 0.75),
    # vertical relation wrong
    ([("red", "circle", 3, 1), ("blue", "square", 0, 1)], "a red circle above a blue square", 0.75),
    # group 1 missing: group 0 = 1; group 1: m = 0, k = 0 (the red circle is group 0's kind), h = 0 → 0;
    # obj = 0.5, total = 1/2, pos = 0 → 0.3 + 0.075
    ([("red", "circle", 0, 0)], "a red circle left of a blue square", 0.375),
    # group 1 has the wrong shape: blue triangle for blue square: g1 m = 0, k = 1, h = 0 → 0.2;
    # obj = (1 + 0.2) / 2 = 0.6, total = 1, pos = 0 (no matching blue square) → 0.36 + 0.15
    ([("red", "circle", 0, 0), ("blue", "triangle", 0, 3)], "a red circle left of a blue square", 0.51),
])
def test_partial_credit(objects, prompt, expected):
    assert score(scene(*objects), prompt) == pytest.approx(expected, abs=1e-6)


def test_noise_robustness():
    """Gaussian pixel noise (σ = 0.15) and isolated speckles of palette colours do not change scores."""
    gen = torch.Generator().manual_seed(0)
    _, heldout = split_prompts()
    images = torch.stack([render(parse_prompt(p), i) for i, p in enumerate(heldout)])
    noisy = (images + 0.15 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
    assert torch.equal(verify(noisy, heldout), torch.ones(len(heldout)))
    blank = torch.zeros(1, 3, 32, 32)
    for _ in range(6):  # single-pixel speckles (< MIN_PIXELS) are not objects
        y, x = torch.randint(0, 32, (2,), generator=gen).tolist()
        blank[0, 0, y, x] = 1.0
    assert detect_objects(blank[0]) == []
    assert float(verify(blank, ["a red square"])[0]) == 0.0


def test_verify_errors():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        verify(torch.zeros(1, 1, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match="one prompt per image"):
        verify(torch.zeros(2, 3, 32, 32), ["a red circle"])
    with pytest.raises(ValueError, match="'a red cat'"):
        verify(torch.zeros(1, 3, 32, 32), ["a red cat"])
