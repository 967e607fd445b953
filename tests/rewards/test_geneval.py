"""The ``geneval`` reward: GenEval's grammar and rules on synthetic detections (hand-computed
values per tag, GenEval's binary verdict as the special case ``partial == 1``), and the detector
and colour plumbing on a tiny random OWLv2 and a tiny random CLIP against transformers' own
processor, forward and post-processing."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from branchgrpo.rewards import CheckpointError, RewardError, build_reward
from branchgrpo.rewards.geneval import GenEvalReward, crop_box, owlv2_preprocess
from branchgrpo.rewards.geneval_rules import (
    COLORS,
    OBJECT_NAMES,
    Detection,
    GenEvalPrompt,
    box_iou,
    colour_requests,
    flow_grpo_score,
    geneval_correct,
    make_plural,
    parse_prompt,
    partial_credit,
    relative_position,
    select_objects,
)
from branchgrpo.rewards.registry import reward_info

# rows of GenEval's prompts/evaluation_metadata.jsonl (github.com/djghosh13/geneval, MIT), verbatim
GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "single_object", "include": [{"class": "skis", "count": 1}], "prompt": "a photo of a skis"},
    {"tag": "single_object", "include": [{"class": "orange", "count": 1}], "prompt": "a photo of an orange"},
    {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
     "prompt": "a photo of a bench and a sports ball"},
    {"tag": "two_object", "include": [{"class": "scissors", "count": 1}, {"class": "bowl", "count": 1}],
     "prompt": "a photo of a scissors and a bowl"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "counting", "include": [{"class": "orange", "count": 3}], "exclude": [{"class": "orange", "count": 4}],
     "prompt": "a photo of three oranges"},
    {"tag": "counting", "include": [{"class": "sheep", "count": 2}], "exclude": [{"class": "sheep", "count": 3}],
     "prompt": "a photo of two sheeps"},
    {"tag": "counting", "include": [{"class": "handbag", "count": 4}], "exclude": [{"class": "handbag", "count": 5}],
     "prompt": "a photo of four handbags"},
    {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}],
     "prompt": "a photo of a blue fire hydrant"},
    {"tag": "colors", "include": [{"class": "orange", "count": 1, "color": "orange"}],
     "prompt": "a photo of an orange orange"},
    {"tag": "colors", "include": [{"class": "computer mouse", "count": 1, "color": "orange"}],
     "prompt": "a photo of an orange computer mouse"},
    {"tag": "position",
     "include": [{"class": "orange", "count": 1}, {"class": "carrot", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a carrot left of an orange"},
    {"tag": "position",
     "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"},
    {"tag": "position",
     "include": [{"class": "skis", "count": 1}, {"class": "suitcase", "count": 1, "position": ["above", 0]}],
     "prompt": "a photo of a suitcase above a skis"},
    {"tag": "position",
     "include": [{"class": "computer keyboard", "count": 1}, {"class": "pizza", "count": 1, "position": ["below", 0]}],
     "prompt": "a photo of a pizza below a computer keyboard"},
    {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                      {"class": "apple", "count": 1, "color": "black"}],
     "prompt": "a photo of a purple wine glass and a black apple"},
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                      {"class": "potted plant", "count": 1, "color": "orange"}],
     "prompt": "a photo of a red car and an orange potted plant"},
]


# --- the grammar -----------------------------------------------------------------------------


@pytest.mark.parametrize("row", GENEVAL_ROWS, ids=lambda r: r["prompt"])
def test_parser_reproduces_geneval_metadata(row):
    metadata = {k: v for k, v in row.items() if k != "prompt"}
    parsed = parse_prompt(row["prompt"])
    assert parsed.to_metadata() == metadata
    assert GenEvalPrompt.from_metadata(metadata) == parsed


def test_parser_every_tag_is_covered_and_plurals_are_genevals():
    assert {row["tag"] for row in GENEVAL_ROWS} == {"single_object", "two_object", "counting", "colors",
                                                    "position", "color_attr"}
    plurals = [make_plural(n) for n in ("skis", "bus", "sheep", "wine glass")]
    assert plurals == ["skises", "buses", "sheeps", "wine glasses"]
    assert len(OBJECT_NAMES) == 80 and len(set(OBJECT_NAMES)) == 80


def test_parser_normalises_and_extends_the_grammar():
    assert parse_prompt("  A Photo of a   Cat. ") == parse_prompt("a photo of a cat")
    three = parse_prompt("a photo of 3 cats").clauses[0]
    assert (three.name, three.count, three.exact) == ("cat", 3, True)
    assert parse_prompt("a photo of two sheep").clauses[0].name == "sheep"  # the name itself as plural
    assert parse_prompt("two dogs").tag == "counting"  # without the prefix
    many = parse_prompt("a photo of a cat and a red dog and a bench")
    assert many.tag == "color_attr" and [c.name for c in many.clauses] == ["cat", "dog", "bench"]
    counted = parse_prompt("a photo of two red cars")
    assert (counted.tag, counted.clauses[0].colour, counted.clauses[0].count) == ("counting", "red", 2)
    custom = parse_prompt("a photo of a zorb left of a blue gizmo", classes=["zorb", "gizmo"])
    assert custom.to_metadata() == {"tag": "position", "include": [
        {"class": "gizmo", "count": 1, "color": "blue"}, {"class": "zorb", "count": 1, "position": ["left of", 0]}]}


@pytest.mark.parametrize("prompt", ["", "a photo of a unicorn", "a dog riding a bicycle", "a photo of zero cats",
                                    "a photo of a cat and", "a photo of a cat left of"])
def test_parser_rejects_other_prompts(prompt):
    with pytest.raises(ValueError, match="GenEval's grammar"):
        parse_prompt(prompt)


def test_from_metadata_rejects_other_excludes():
    with pytest.raises(ValueError, match="only counting excludes"):
        GenEvalPrompt.from_metadata({"tag": "x", "include": [{"class": "cat", "count": 1}],
                                     "exclude": [{"class": "dog", "count": 1}]})


# --- geometry and selection ------------------------------------------------------------------


def test_relative_position_hand_values():
    # offset (-20, 0); x shrinks by 0.1 * (10 + 10) to -18; -18 / 20 = -0.9
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    # offset (0, -30) -> -28 / 30; y points down, so "above"
    assert relative_position((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}
    assert relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    # offset (-10, -10), sizes 4 per axis: -9.6 / 14.142 = -0.679 on both axes
    assert relative_position((0, 0, 2, 2), (10, 10, 12, 12)) == {"left of", "above"}
    # offset (-10, -5): (-9.6, -4.6) / 11.180 = (-0.859, -0.411): only "left of"
    assert relative_position((0, 5, 2, 7), (10, 10, 12, 12)) == {"left of"}
    # offset -1 < 0.1 * 20: nothing can be said
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()
    # offset -12: shrunk by 2 at threshold 0.1 (-10 / 12 = -0.83), to 0 at threshold 0.6
    assert relative_position((0, 0, 10, 10), (12, 0, 22, 10)) == {"left of"}
    assert relative_position((0, 0, 10, 10), (12, 0, 22, 10), threshold=0.6) == set()
    # offset (-12, 0), shrunk to (-2, 0): -2 / 12 = -0.167, inside (-0.5, 0.5) -> nothing
    assert relative_position((0, 0, 10, 10), (12, 0, 22, 10), threshold=0.5) == set()


def test_box_iou_uses_genevals_inclusive_pixels():
    # areas 10 x 10 = 100 each, overlap 5 x 10 = 50: 50 / 150
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


def test_select_objects_threshold_order_cap_and_nms():
    boxes = [(0, 0, 9, 9), (5, 0, 14, 9), (40, 40, 49, 49), (0, 0, 9, 9), (60, 0, 69, 9), (80, 0, 89, 9)]
    scores = [0.5, 0.9, 0.7, 0.3, 0.95, 0.31]
    labels = [0, 0, 0, 0, 1, 2]
    kept = select_objects(boxes, scores, labels, ["cat", "dog", "car"], threshold=0.3)
    assert [d.score for d in kept["cat"]] == [0.9, 0.7, 0.5]  # 0.3 is not > 0.3; highest first
    assert set(kept) == {"cat", "dog", "car"}
    capped = select_objects(boxes, scores, labels, ["cat", "dog", "car"], threshold=0.3, max_objects=2)
    assert [d.score for d in capped["cat"]] == [0.9, 0.7]
    # box 1 (0.9) and box 0 (0.5) overlap by 1/3: dropped at nms_iou 0.3, kept at 0.34
    suppressed = select_objects(boxes, scores, labels, ["cat"], threshold=0.3, nms_iou=0.3)["cat"]
    assert [d.score for d in suppressed] == [0.9, 0.7]
    assert len(select_objects(boxes, scores, labels, ["cat"], threshold=0.3, nms_iou=0.34)["cat"]) == 3
    assert select_objects(boxes, scores, labels, ["cat", "dog"], threshold=0.96) == {}


# --- scores per tag, by hand -----------------------------------------------------------------


def det(x0, score=0.9, colour=None, y0=0, size=10):
    """A ``size`` × ``size`` box at (x0, y0)."""
    return Detection((x0, y0, x0 + size, y0 + size), score, colour)


def scores(prompt, objects):
    parsed = parse_prompt(prompt)
    return (partial_credit(parsed, objects).total, geneval_correct(parsed, objects), flow_grpo_score(parsed, objects))


@pytest.mark.parametrize("n, expected", [(0, (0, False, 0)), (1, (1, True, 1)), (2, (1, True, 0)), (3, (1, True, -1))])
def test_single_object(n, expected):
    # Flow-GRPO: 1 - |1 - n|; GenEval: at least one
    assert scores("a photo of a cat", {"cat": [det(20 * i) for i in range(n)]} if n else {}) == pytest.approx(expected)


@pytest.mark.parametrize("cats, dogs, expected",
                         [(1, 0, (0.5, False, 0.5)), (1, 1, (1, True, 1)), (2, 1, (1, True, 0.5))])
def test_two_object(cats, dogs, expected):
    objects = {"cat": [det(20 * i) for i in range(cats)], "dog": [det(100 + 20 * i) for i in range(dogs)]}
    assert scores("a photo of a cat and a dog", {k: v for k, v in objects.items() if v}) == pytest.approx(expected)


@pytest.mark.parametrize("n, expected", [
    (0, (0, False, 0)), (1, (1 / 3, False, 1 / 3)), (3, (1, True, 1)),
    (4, (2 / 3, False, 2 / 3)),  # GenEval: the exclude clause (4) fails
    (7, (0, False, -1 / 3)),  # ours clamps 1 - 4/3 at 0, Flow-GRPO does not
])
def test_counting(n, expected):
    objects = {"cat": [det(20 * i) for i in range(n)]} if n else {}
    assert scores("a photo of three cats", objects) == pytest.approx(expected)


@pytest.mark.parametrize("cars, expected", [
    ([], (0, False, 0)),
    (["blue"], (0.5, False, 0.5)),
    (["red"], (1, True, 1)),
    (["red", "blue"], (1, True, 0)),  # GenEval looks at the first car only; Flow-GRPO wants exactly one
    (["blue", "red"], (0.5, False, 0)),
])
def test_colors(cars, expected):
    objects = {"car": [det(20 * i, score=0.9 - 0.1 * i, colour=c) for i, c in enumerate(cars)]} if cars else {}
    assert scores("a photo of a red car", objects) == pytest.approx(expected)


@pytest.mark.parametrize("cat_x, dog_xs, expected", [
    (0, [20], (1, True, 1)),  # cat left of dog: [object, object, position]
    (40, [20], (2 / 3, False, 0.75)),  # cat right of dog: Flow-GRPO appends 0 and then 1
    (0, [], (1 / 3, False, 1 / 3)),  # no dog: ours [0, 1, 0]; Flow-GRPO [0, 1, 0 (no target)]
    (None, [20], (1 / 3, False, 1 / 3)),  # no cat: [1, 0, 0] both
    (0, [20, 40], (1, True, 1 / 3)),  # two dogs: GenEval uses the first; Flow-GRPO: dog count wrong, no target
])
def test_position(cat_x, dog_xs, expected):
    objects = {}
    if cat_x is not None:
        objects["cat"] = [det(cat_x)]
    if dog_xs:
        objects["dog"] = [det(x, score=0.9 - 0.1 * i) for i, x in enumerate(dog_xs)]
    assert scores("a photo of a cat left of a dog", objects) == pytest.approx(expected)


@pytest.mark.parametrize("car, bench, expected", [
    ("red", "blue", (1, True, 1)),
    ("red", "red", (0.75, False, 0.75)),
    ("red", None, (0.5, False, 0.5)),
    ("green", "red", (0.5, False, 0.5)),
])
def test_color_attr(car, bench, expected):
    objects = {"car": [det(0, colour=car)]}
    if bench:
        objects["bench"] = [det(50, colour=bench)]
    assert scores("a photo of a red car and a blue bench", objects) == pytest.approx(expected)


def test_components_by_kind():
    parsed = parse_prompt("a photo of a cat left of a dog")
    credit = partial_credit(parsed, {"cat": [det(40)], "dog": [det(20)]})
    assert credit.items == (("object", 1.0), ("object", 1.0), ("position", 0.0))
    assert (credit.component("object"), credit.component("position"), credit.component("colour")) == (1.0, 0.0, None)
    cars = {"car": [det(0, colour="red"), det(20, colour="blue")]}
    counted = partial_credit(parse_prompt("a photo of two red cars"), cars)
    assert counted.items == (("count", 1.0), ("colour", 0.5))


def test_colour_requests_and_missing_colours():
    parsed = parse_prompt("a photo of a red car and a blue bench")
    objects = {"car": [det(0), det(20)], "dog": [det(40)]}
    assert colour_requests(parsed, objects) == [("car", 0)]  # the first car only; no bench found
    with pytest.raises(ValueError, match="need colours"):
        partial_credit(parsed, objects)


def test_binary_is_partial_credit_equal_to_one():
    """GenEval's verdict is the special case ``partial == 1``, on random detections of every tag."""
    rng = random.Random(0)
    prompts = [row["prompt"] for row in GENEVAL_ROWS]
    prompts += ["a photo of two red cars", "a photo of a cat left of a red dog"]
    agree = 0
    for prompt, _ in itertools.product(prompts, range(40)):
        parsed = parse_prompt(prompt)
        objects = {}
        for clause in parsed.clauses:
            n = rng.choice([0, clause.count - 1, clause.count, clause.count, clause.count + 1])
            corners = [(rng.uniform(0, 90), rng.uniform(0, 90)) for _ in range(n)]
            objects[clause.name] = [Detection((x, y, x + 10, y + 10), 1.0 - 0.01 * i,
                                              rng.choice([clause.colour or "red", "red", "blue"]))
                                    for i, (x, y) in enumerate(corners)]
        objects = {k: v for k, v in objects.items() if v}
        correct = geneval_correct(parsed, objects)
        assert (partial_credit(parsed, objects).total == 1.0) == correct, (prompt, objects)
        agree += correct
    assert 0 < agree < len(prompts) * 40  # both outcomes happened


# --- the tiny detector and CLIP ---------------------------------------------------------------

CLASSES = ["cat", "dog", "car", "bench"]


def write_tiny_owlv2(folder, seed: int = 0):
    """A transformers OWLv2 folder: random Owlv2ForObjectDetection (32 px, 8 px patches), the tiny
    CLIP tokenizer at 16 tokens, an Owlv2ImageProcessor at 32 px. The class head's logit scale is
    damped so scores spread over (0, 1) instead of saturating."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

    from branchgrpo.rewards.tiny import write_clip_tokenizer

    vocab = write_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(str(folder))
    shared = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**shared, "vocab_size": vocab, "max_position_embeddings": 16, "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    vision = {**shared, "image_size": 32, "patch_size": 8}
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)).eval()
    with torch.no_grad():
        model.class_head.logit_scale.weight.mul_(0.05)
        model.class_head.logit_scale.bias.fill_(2.0)
    model.save_pretrained(str(folder))
    Owlv2ImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from branchgrpo.rewards.tiny import write_tiny_clip

    root = tmp_path_factory.mktemp("geneval")
    return {"owl": write_tiny_owlv2(root / "owl"), "clip": write_tiny_clip(root / "clip")}


@pytest.fixture(scope="module")
def reward(folders):
    return build_reward("geneval", folders["owl"], clip_model=folders["clip"], classes=CLASSES,
                        threshold=0.5, counting_threshold=0.6)


def uint8_images(n, height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("height, width", [(40, 48), (24, 20), (64, 64), (32, 32)])
def test_preprocess_matches_owlv2_image_processor(height, width):
    pytest.importorskip("torchvision")  # transformers' Owlv2ImageProcessor runs on torchvision
    from transformers import Owlv2ImageProcessor

    u8 = uint8_images(2, height, width)
    processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    expected = processor(images=list(u8), return_tensors="pt")["pixel_values"]
    got = owlv2_preprocess(u8.float() / 255.0, (32, 32), processor.image_mean, processor.image_std)
    # measured 7e-7: float rounding (blur kernel, fused normalisation)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_detections_match_transformers_forward_and_postprocess(reward, folders):
    pytest.importorskip("torchvision")
    from transformers import CLIPTokenizer, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    owl = folders["owl"]
    processor = Owlv2Processor(Owlv2ImageProcessor.from_pretrained(str(owl)), CLIPTokenizer.from_pretrained(str(owl)))
    model = Owlv2ForObjectDetection.from_pretrained(str(owl)).eval()
    u8 = uint8_images(3, 40, 48, seed=1)
    queries = [f"a photo of a {name}" for name in CLASSES]
    inputs = processor(text=[queries] * 3, images=list(u8), return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    expected = processor.image_processor.post_process_object_detection(
        outputs, threshold=-1.0, target_sizes=[(40, 48)] * 3)
    # the same pixels (the preprocessing is compared on its own above): equal up to float32 rounding
    got = reward.detector.detect(inputs["pixel_values"], 40, 48)
    for mine, ref in zip(got, expected):
        limit = torch.tensor([48.0, 40.0, 48.0, 40.0])
        torch.testing.assert_close(mine.scores, ref["scores"], atol=1e-6, rtol=0)
        assert torch.equal(mine.labels, ref["labels"])
        torch.testing.assert_close(mine.boxes, torch.minimum(ref["boxes"].clamp_min(0), limit), atol=1e-5, rtol=0)
    # from the images themselves: pixels differ by < 1e-6 (above); through the random net boxes moved 1.2e-4 px
    for mine, ref in zip(reward.detector(u8.float() / 255.0), got):
        torch.testing.assert_close(mine.scores, ref.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.boxes, ref.boxes, atol=1e-3, rtol=0)
    spread = torch.cat([g.scores for g in got])
    assert spread.min() < 0.4 and spread.max() > 0.6  # the tiny head gives scores on both sides of the thresholds


def test_crops_and_colours_match_pil_and_transformers_clip(reward, folders):
    pytest.importorskip("torchvision")
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    u8 = uint8_images(1, 40, 48, seed=2)[0]
    image = u8.float() / 255.0
    pil = Image.fromarray(u8.permute(1, 2, 0).numpy())
    boxes = [(3.4, 5.5, 20.6, 30.2), (10.5, 0.0, 47.9, 39.9), (30.2, 12.7, 30.4, 13.1)]
    crops = [crop_box(image, box) for box in boxes]
    for box, crop in zip(boxes[:2], crops[:2]):  # PIL's Image.crop rounds the same way
        reference = torch.from_numpy(np.array(pil.crop(box))).permute(2, 0, 1)
        assert torch.equal((crop * 255).round().to(torch.uint8), reference)
    assert crops[2].shape[1:] == (1, 1)  # a sub-pixel box still gives one pixel
    # GenEval's classifier (clip_benchmark zero_shot_classifier + run_classification) on transformers' CLIP
    processor = AutoProcessor.from_pretrained(str(folders["clip"]))
    model = AutoModel.from_pretrained(str(folders["clip"])).eval()
    with torch.no_grad():
        weights = []
        for colour in COLORS:
            texts = [f"a photo of a {colour} car", f"a photo of a {colour}-colored car",
                     f"a photo of a {colour} object"]
            feats = model.get_text_features(**processor(text=texts, padding=True, return_tensors="pt"))
            feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
            mean = torch.nn.functional.normalize(feats, dim=-1).mean(dim=0)
            weights.append(mean / mean.norm())
        # float crops: the torchvision processor resizes 8-bit input in 8 bits, GenEval's PIL path too
        pixels = processor(images=crops, do_rescale=False, input_data_format="channels_first",
                           return_tensors="pt")["pixel_values"]
        feats = model.get_image_features(pixel_values=pixels)
        feats = torch.nn.functional.normalize(feats if isinstance(feats, torch.Tensor) else feats.pooler_output, dim=-1)
        expected = 100.0 * feats @ torch.stack(weights, dim=1)
    got = 100.0 * reward.colours.logits(crops, "car")
    print(f"colour logits max |ours - transformers| = {(got - expected).abs().max():.3g}")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # measured 1.1e-5 on logits of ~45
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


PROMPTS = ["a photo of a cat", "a photo of two dogs", "a photo of a red car and a blue bench",
           "a photo of a cat left of a dog", "a photo of a blue bench"]


def test_end_to_end_scores_follow_the_rules(reward):
    images = uint8_images(5, 40, 48, seed=3).float() / 255.0
    results = reward.analyse(images, PROMPTS)
    for result, prompt in zip(results, PROMPTS):
        parsed = parse_prompt(prompt, CLASSES)
        assert result.prompt == parsed
        assert result.total == pytest.approx(partial_credit(parsed, result.objects).total)
        assert result.components["correct"] == float(geneval_correct(parsed, result.objects))
        for name, index in colour_requests(parsed, result.objects):
            assert result.objects[name][index].colour in COLORS
    # the kept detections are GenEval's selection of the raw detections (thresholds per tag)
    def boxes(objects):
        return {name: [d.box for d in found] for name, found in objects.items()}

    for raw, result in zip(reward.detector(images), results):
        threshold = 0.6 if result.prompt.tag == "counting" else 0.5
        kept = select_objects(raw.boxes.tolist(), raw.scores.tolist(), raw.labels.tolist(), CLASSES,
                              threshold=threshold, nms_iou=0.5)
        assert boxes(kept) == boxes(result.objects)
    assert any(d.colour for r in results for found in r.objects.values() for d in found)  # colours were classified
    totals = reward(images, PROMPTS)
    assert totals.shape == (5,) and totals.dtype == torch.float32 and totals.device == images.device
    assert totals.tolist() == pytest.approx([r.total for r in results])
    assert len({round(t, 6) for t in totals.tolist()}) > 1  # the tiny model's detections make a difference


def test_components_batching_and_empty_batch(reward):
    images = uint8_images(5, 40, 48, seed=3).float() / 255.0
    parts = reward.components(images, PROMPTS)
    assert set(parts) == {"geneval", "geneval/object", "geneval/count", "geneval/colour", "geneval/position",
                          "geneval/correct"}
    assert all(v.shape == (5,) and v.dtype == torch.float32 for v in parts.values())
    assert parts["geneval/count"][0] == 1.0  # "a cat" asks for no count: vacuously satisfied
    out = reward.score(images, PROMPTS)
    torch.testing.assert_close(out.total, parts["geneval"])
    singles = torch.cat([reward(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(reward(images, PROMPTS), singles, atol=1e-6, rtol=0)
    assert reward(images[:0], []).shape == (0,)


def test_score_modes(folders, reward):
    images = uint8_images(5, 40, 48, seed=3).float() / 255.0
    results = reward.analyse(images, PROMPTS)
    for mode, rule in (("binary", geneval_correct), ("flow_grpo", flow_grpo_score)):
        other = build_reward("geneval", folders["owl"], clip_model=folders["clip"], classes=CLASSES, threshold=0.5,
                             counting_threshold=0.6, score=mode)
        expected = [float(rule(r.prompt, r.objects)) for r in results]
        assert other(images, PROMPTS).tolist() == pytest.approx(expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(folders, reward):
    images = uint8_images(5, 40, 48, seed=3).float() / 255.0
    gpu = build_reward("geneval", folders["owl"], clip_model=folders["clip"], classes=CLASSES, threshold=0.5,
                       counting_threshold=0.6, device="cuda", dtype="float32")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 convolutions, as on the CPU
        on_gpu = gpu.components(images.cuda(), PROMPTS)
        from_cpu = gpu(images, PROMPTS)
        raw = gpu.detector(images.cuda())
    assert all(v.device.type == "cuda" for v in on_gpu.values()) and from_cpu.device.type == "cpu"
    for mine, ref in zip(raw, reward.detector(images)):
        torch.testing.assert_close(mine.scores, ref.scores, atol=1e-4, rtol=0)
    expected = reward.components(images, PROMPTS)
    for name, values in expected.items():
        assert on_gpu[name].cpu().tolist() == pytest.approx(values.tolist()), name
    assert from_cpu.tolist() == pytest.approx(expected["geneval"].tolist())


def test_unparsed_prompts(folders, reward):
    images = uint8_images(2, 32, 32).float() / 255.0
    with pytest.raises(RewardError, match="prompt 1: cannot parse 'a unicorn'.*unparsed='zero'"):
        reward(images, ["a photo of a cat", "a unicorn"])
    lenient = build_reward("geneval", folders["owl"], clip_model=folders["clip"], classes=CLASSES, unparsed="zero")
    parts = lenient.components(images, ["a photo of a cat", "a unicorn"])
    assert all(float(v[1]) == 0.0 for v in parts.values())


def test_registry_and_checkpoint_errors(folders, tmp_path):
    info = reward_info("geneval")
    assert info.needs_checkpoint is True and info.modality == "image"
    assert {"clip_model", "score", "threshold", "counting_threshold", "nms_iou", "classes"} <= set(info.options)
    with pytest.raises(CheckpointError, match="no checkpoint given.*OWLv2"):
        GenEvalReward(None, clip_model=folders["clip"])
    with pytest.raises(CheckpointError, match="does not exist"):
        GenEvalReward(tmp_path / "missing", clip_model=folders["clip"])
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        GenEvalReward(_folder_without(tmp_path, folders["owl"]), clip_model=folders["clip"])
    with pytest.raises(CheckpointError, match="model_type 'clip'"):
        GenEvalReward(folders["clip"], clip_model=folders["clip"])
    with pytest.raises(CheckpointError, match="no CLIP model given.*clip_model=FOLDER"):
        GenEvalReward(folders["owl"], classes=CLASSES)
    for option, value, message in (("score", "strict", "score must be one of partial, binary, flow_grpo"),
                                   ("threshold", 1.5, "threshold must be a number in"),
                                   ("max_objects", 0, "max_objects must be a positive integer"),
                                   ("query_template", "a photo", "query_template must contain"),
                                   ("unparsed", "skip", "unparsed must be one of"),
                                   ("classes", "cat", "classes must be a non-empty list"),
                                   ("classes", ["cat", "cat"], "distinct object names")):
        with pytest.raises(RewardError, match=message):
            build_reward("geneval", folders["owl"], clip_model=folders["clip"], **{option: value})
    with pytest.raises(RewardError, match="has no option 'colour_model'"):
        build_reward("geneval", folders["owl"], colour_model=folders["clip"])


def _folder_without(tmp_path, folder, missing="preprocessor_config.json"):
    import shutil

    copy = tmp_path / "partial"
    shutil.copytree(folder, copy)
    (copy / missing).unlink()
    return copy
