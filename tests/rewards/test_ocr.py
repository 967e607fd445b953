"""The ``ocr`` reward: Flow-GRPO's scoring against brute force, and RapidOCR end to end on text
rendered with Pillow's built-in scalable font."""

from __future__ import annotations

import functools
import random
import sys

import numpy as np
import pytest
import rapidocr_onnxruntime  # noqa: F401  CI installs the ocr extra; a missing engine must fail here
import torch
from PIL import Image, ImageDraw, ImageFont

from branchgrpo.rewards.base import RewardError
from branchgrpo.rewards.ocr import OCRReward, levenshtein, normalize_text, ocr_score, quoted_text
from branchgrpo.rewards.registry import available_rewards, build_reward

PROMPT = 'a shop sign that says "Hello World", photo'


def brute_levenshtein(a: str, b: str) -> int:
    """The recursive definition, memoised."""

    @functools.lru_cache(maxsize=None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def flow_grpo_value(recognized: str, target: str) -> float:
    """The score written out from Flow-GRPO's rules with the brute-force distance."""
    r, t = recognized.replace(" ", "").lower(), target.replace(" ", "").lower()
    d = 0 if t in r else brute_levenshtein(r, t)
    return 1 - min(d, len(t)) / len(t)


def render(lines: list[str], size: int = 512, font_size: int = 48) -> torch.Tensor:
    """Black text on white, one line per entry, as [3, H, W] in [0, 1]."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    for row, text in enumerate(lines):
        draw.text((32, size // 3 + row * 2 * font_size), text, fill="black", font=font)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def reward() -> OCRReward:
    return build_reward("ocr", num_threads=1)


# --- the scoring, without the engine ---------------------------------------------------------


def test_levenshtein_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert levenshtein(a, b) == brute_levenshtein(a, b), (a, b)
    assert levenshtein("kitten", "sitting") == 3


def test_score_matches_flow_grpo_rules():
    rng = random.Random(1)
    for _ in range(300):
        target = "".join(rng.choice("aB c") for _ in range(rng.randint(1, 6)))
        if not target.replace(" ", ""):
            continue
        recognized = "".join(rng.choice("Ab C") for _ in range(rng.randint(0, 9)))
        assert ocr_score(recognized, target) == pytest.approx(flow_grpo_value(recognized, target), abs=1e-12)
    # hand-checked cases
    assert ocr_score("Helo Wrld", "Hello World") == pytest.approx(0.8)  # 2 deletions of 10 letters
    assert ocr_score("HELLOWORLD", "hello world") == 1.0  # case and spaces ignored
    assert ocr_score("openHelloWorld24/7", "Hello World") == 1.0  # target inside the text: distance 0
    assert ocr_score("", "Hello World") == 0.0
    assert ocr_score("x" * 40, "abc") == 0.0  # the distance is capped at len(target)
    assert ocr_score("Hello\tWorld", "Hello World") == pytest.approx(0.9)  # only " " is removed
    with pytest.raises(ValueError):
        ocr_score("abc", "   ")


def test_quoted_text_follows_split_on_double_quote():
    assert quoted_text(PROMPT) == "Hello World"
    assert quoted_text('say "one" and "two"') == "one"
    assert quoted_text('an unclosed "quote here') == "quote here"
    assert quoted_text("no quotes at all") is None
    assert quoted_text("curly “quotes” only") is None
    assert normalize_text(" A b C ") == "abc"


def test_recognized_lines_are_joined_in_engine_order_and_zero_confidence_dropped(reward, monkeypatch):
    seen = []

    def fake_engine(array):
        seen.append(array)
        return [[None, "Hel", 0.9], [None, "junk", 0.0], [None, "lo World", 0.7]], [0.0]

    monkeypatch.setattr(reward, "engine", fake_engine)
    images = torch.rand(2, 3, 5, 7)
    images[0, 0, 0, 0] = 1.2  # decoded images can overshoot; clamped like upstream's PIL path
    scores = reward(images, [PROMPT, 'x "Hello"'])
    assert scores.tolist() == [1.0, 1.0]
    expected = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # RGB HWC
    assert [a.dtype for a in seen] == [np.uint8, np.uint8]
    np.testing.assert_array_equal(np.stack(seen), expected)

    monkeypatch.setattr(reward, "engine", lambda array: (None, None))  # what RapidOCR returns for no text
    assert reward(images[:1], [PROMPT]).tolist() == [0.0]


# --- the engine, end to end --------------------------------------------------------------------


def test_exact_misspelt_partial_blank(reward):
    texts = {"exact": ["Hello World"], "misspelt": ["Helo Wrld"], "partial": ["Hello"], "blank": [],
             "two lines": ["Hello", "World"], "longer": ["Hello World 24/7"]}
    images = torch.stack([render(lines) for lines in texts.values()])
    scores = dict(zip(texts, reward(images, [PROMPT] * len(texts)).tolist()))
    assert scores["exact"] >= 0.9
    assert scores["exact"] > scores["misspelt"] > scores["blank"]
    assert scores["exact"] > scores["partial"] > scores["blank"]
    assert scores["blank"] == 0.0  # nothing recognised: distance = len(target)
    assert scores["two lines"] >= 0.9  # lines are concatenated, spaces do not count
    assert scores["longer"] >= 0.9  # the target inside longer text counts as exact
    # A good read scores what the rendered string itself scores, within one character (1/10).
    for key in ("misspelt", "partial"):
        rendered = " ".join(texts[key])
        assert abs(scores[key] - flow_grpo_value(rendered, "Hello World")) <= 0.1 + 1e-6, (key, scores[key])


def test_contract_and_registry(reward):
    assert "ocr" in available_rewards()
    assert (reward.name, reward.modality, reward.needs_checkpoint) == ("ocr", "image", False)
    scores = reward(render(["Hello World"]).unsqueeze(0).double(), [PROMPT])
    assert scores.dtype == torch.float32 and scores.shape == (1,)
    out = reward.score(render(["Hello World"]).unsqueeze(0), [PROMPT])
    assert set(out.components) == {"ocr"} and out.total.shape == (1,)


def test_prompts_without_quotes(reward):
    image = render(["HELLO"]).unsqueeze(0)
    with pytest.raises(RewardError, match="double quotes"):
        reward(image, ["a sign that says hello"])
    with pytest.raises(RewardError, match="no text"):
        reward(image, ['a sign that says " "'])
    whole_prompt = OCRReward(num_threads=1, unquoted="prompt")
    assert whole_prompt(image, ["hello"]).item() >= 0.9
    assert whole_prompt(image, ['say "Hello"']).item() >= 0.9


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, match",
    [
        ({"min_confidence": 1.5}, "min_confidence"),
        ({"num_threads": 0}, "num_threads"),
        ({"unquoted": "skip"}, "unquoted"),
        ({"engine_options": {"text_score": 0.1}}, "min_confidence"),
        ({"engine_options": {"det_limit_sidelen": 10}}, "unknown engine option 'det_limit_sidelen'"),
        ({"checkpoint": "ocr.onnx"}, "takes no checkpoint"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(RewardError, match=match):
        OCRReward(**options)


def test_engine_options_reach_the_engine():
    reward = OCRReward(num_threads=1, min_confidence=0.7, engine_options={"det_limit_side_len": 640})
    assert reward.engine.text_score == 0.7
    assert (reward.engine.text_det.limit_side_len, reward.engine.text_det.limit_type) == (640, "max")
    assert reward.engine.use_cls is False  # Flow-GRPO ran without the angle classifier


def test_missing_engine_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # import now raises ImportError
    with pytest.raises(RewardError, match=r"branchgrpo\[ocr\]"):
        OCRReward()
