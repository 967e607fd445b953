"""Sample grids (branchgrpo.train.evaluation.save_image_grid): every image appears unchanged (nearest
upscaling) in row-major order, each row's prompt is written above it and each cell's reward under it —
read back with an OCR engine (RapidOCR, the ``ocr`` reward's), so "legible" is tested, not assumed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from branchgrpo.train.evaluation import _fit, _font, save_image_grid

PROMPTS = ["a handwritten seven", "the number three"]


def upscaled(image: torch.Tensor, scale: int) -> np.ndarray:
    """[C, H, W] in [0, 1] → uint8 [H·s, W·s] (grey) by pixel repetition: nearest upscaling, written out."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.repeat_interleave(scale, -2).repeat_interleave(scale, -1)[0].numpy()


def find(canvas: np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where ``patch`` occurs exactly in ``canvas``."""
    h, w = patch.shape
    windows = np.lib.stride_tricks.sliding_window_view(canvas, (h, w))
    hits = np.argwhere((windows == patch).all(axis=(-2, -1)))
    return [tuple(map(int, hit)) for hit in hits]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([0.9512, 0.0031, 0.5, 0.25, 0.7775, 0.125, 0.0625, 1.0])
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    path = save_image_grid(images, tmp_path_factory.mktemp("grid") / "iter_000010.png", columns=4,
                           prompts=prompts, rewards=rewards)
    return dict(images=images, rewards=rewards, canvas=np.asarray(Image.open(path)))


def cell_positions(labelled) -> list[tuple[int, int]]:
    positions = []
    for image in labelled["images"]:
        (where,) = find(labelled["canvas"], upscaled(image, 4))  # 16 px → 64 px cells, exactly once
        positions.append(where)
    return positions


def test_every_image_appears_once_in_row_major_order(labelled):
    positions = cell_positions(labelled)
    tops = sorted({top for top, _ in positions})
    assert len(tops) == 2 and [top for top, _ in positions] == [tops[0]] * 4 + [tops[1]] * 4
    lefts = [left for _, left in positions]
    assert lefts[:4] == lefts[4:] and lefts[:4] == sorted(lefts[:4])
    assert tops[0] > 10 and tops[1] - tops[0] > 64 + 10  # a text line above each row and under its cells


def test_prompts_and_rewards_are_legible_where_they_belong(labelled):
    pytest.importorskip("rapidocr_onnxruntime")
    from rapidocr_onnxruntime import RapidOCR

    found, _ = RapidOCR()(np.stack([labelled["canvas"]] * 3, axis=-1))
    read = {text: np.asarray(box) for box, text, _score in found}
    positions = cell_positions(labelled)
    for row, prompt in enumerate(PROMPTS):
        box = read[prompt.replace(" ", "")]  # RapidOCR drops spaces
        top_of_row = positions[4 * row][0]
        assert box[:, 1].max() <= top_of_row + 1 and (row == 0 or box[:, 1].min() >= positions[0][0] + 64)
    for (top, left), reward in zip(positions, labelled["rewards"].tolist()):
        box = read[f"{reward:.3f}"]
        centre_x, centre_y = box[:, 0].mean(), box[:, 1].mean()
        assert left <= centre_x <= left + 64 and top + 64 <= centre_y <= top + 64 + 20


def test_unlabelled_grid_is_the_plain_layout(tmp_path):
    images = torch.rand(5, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    canvas = np.asarray(Image.open(save_image_grid(images, tmp_path / "g.png", columns=3, min_cell=24)))
    expected = np.full((2 * (16 + 2) + 2, 3 * (24 + 2) + 2, 3), 255, dtype=np.uint8)  # scale 24 // 12 = 2
    for i, image in enumerate(images):
        r, c = divmod(i, 3)
        cell = (image.clamp(0, 1) * 255).round().to(torch.uint8).repeat_interleave(2, 1).repeat_interleave(2, 2)
        expected[2 + r * 18: 2 + r * 18 + 16, 2 + c * 26: 2 + c * 26 + 24] = cell.permute(1, 2, 0).numpy()
    assert np.array_equal(canvas, expected)


def test_long_prompts_are_shortened_to_the_row_and_label_counts_are_checked(tmp_path):
    draw, font = ImageDraw.Draw(Image.new("L", (1, 1))), _font(64)
    text = "a photograph of an astronaut riding a horse on the moon, highly detailed " * 3
    short = _fit(draw, text, font, 200)
    assert short.endswith("…") and text.startswith(short[:-1]) and draw.textlength(short, font=font) <= 200
    assert draw.textlength(text[: len(short)] + "…", font=font) > 200  # one more character would not fit
    assert _fit(draw, "the digit 4", font, 200) == "the digit 4"
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        save_image_grid(torch.rand(2, 1, 4, 4), tmp_path / "x.png", columns=2, prompts=["a", "b", "c"])
