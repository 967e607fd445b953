"""Sample diversity (branchgrpo.diversity) against brute force, closed forms, and in the eval log.

Pairwise distances are checked against a plain double loop over sample pairs; the pixel distance of
independent uniform images against its closed form sqrt(E[(a − b)²]) = sqrt(1/6); the random
feature network for determinism, independence from the batch and from the global RNG, grey/RGB
equivalence and the video rule; and the trainer's eval rows for the two diversity columns.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from branchgrpo import diversity as div


def brute_mean_pair_distance(rows: list[torch.Tensor], rms: bool) -> float:
    """Mean over i < j of sqrt(Σ (a − b)²) (or sqrt(mean (a − b)²)), one pair at a time, float64."""
    total, pairs = 0.0, 0
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            a, b = rows[i].double().flatten().tolist(), rows[j].double().flatten().tolist()
            squared = sum((x - y) ** 2 for x, y in zip(a, b))
            total += math.sqrt(squared / len(a) if rms else squared)
            pairs += 1
    return total / pairs


def brute_per_prompt(x: torch.Tensor, prompts: list[str], rms: bool) -> dict[str, float]:
    out = {}
    for prompt in dict.fromkeys(prompts):
        rows = [x[i] for i, p in enumerate(prompts) if p == prompt]
        if len(rows) >= 2:
            out[prompt] = brute_mean_pair_distance(rows, rms)
    return out


@pytest.mark.parametrize("chunk", [7, 1 << 24])  # 7: many chunks, none aligned with a row
@pytest.mark.parametrize("rms", [False, True])
def test_pairwise_distances_match_double_loop(monkeypatch, chunk, rms):
    monkeypatch.setattr(div, "_CHUNK_ELEMENTS", chunk)
    x = torch.rand(6, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    x[4] = x[1]  # an identical pair: distance exactly 0
    distances = div.pairwise_distances(x, rms=rms)
    size = x[0].numel()
    for i in range(6):
        for j in range(6):
            pairs = zip(x[i].double().flatten().tolist(), x[j].double().flatten().tolist())
            squared = sum((a - b) ** 2 for a, b in pairs)
            expected = math.sqrt(squared / size if rms else squared)
            assert float(distances[i, j]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert float(distances[1, 4]) == 0.0
    assert div.mean_pairwise_distance(x, rms) == pytest.approx(brute_mean_pair_distance(list(x), rms), rel=1e-12)


def test_per_prompt_pixel_and_feature_diversity_match_brute_force():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(11, 3, 12, 10, generator=gen)
    prompts = ["a", "b", "c"] * 3 + ["a", "lonely"]  # interleaved; "lonely" has one sample: no pair
    result = div.sample_diversity(images, prompts)
    pixel = brute_per_prompt(images, prompts, rms=True)
    feature = brute_per_prompt(div.random_conv_features(images), prompts, rms=False)
    assert set(result.per_prompt) == {"a", "b", "c"}
    for prompt in pixel:
        assert result.per_prompt[prompt]["pixel"] == pytest.approx(pixel[prompt], rel=1e-10)
        assert result.per_prompt[prompt]["feature"] == pytest.approx(feature[prompt], rel=1e-6)
    assert result.pixel == pytest.approx(sum(pixel.values()) / 3, rel=1e-10)
    assert result.feature == pytest.approx(sum(feature.values()) / 3, rel=1e-6)


def test_pixel_diversity_of_uniform_noise_is_sqrt_one_sixth():
    # a, b ~ U(0, 1) independent: E[(a − b)²] = 1/6, Var[(a − b)²] = 1/15 − 1/36. With D pixels the
    # mean of D squared differences has std sqrt(Var / D); 6 sigma of it, carried through the sqrt.
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    d = images[0].numel()
    tolerance = 6 * math.sqrt((1 / 15 - 1 / 36) / d) / (2 * math.sqrt(1 / 6))
    assert div.sample_diversity(images, ["p", "p"]).pixel == pytest.approx(math.sqrt(1 / 6), abs=tolerance)


def test_identical_samples_have_zero_diversity_and_no_pairs_give_nan():
    image = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    same = div.sample_diversity(image.repeat(4, 1, 1, 1), ["p"] * 4)
    assert same.pixel == 0.0 and same.feature == pytest.approx(0.0, abs=1e-6)
    alone = div.sample_diversity(image.repeat(2, 1, 1, 1), ["p", "q"])
    assert math.isnan(alone.pixel) and math.isnan(alone.feature) and alone.per_prompt == {}


def test_prompt_count_must_match_samples():
    with pytest.raises(ValueError, match="one prompt per sample"):
        div.per_prompt_diversity(torch.zeros(3, 4), ["a", "b"])


def test_random_features_are_fixed_unit_norm_and_per_image():
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(5, 3, 20, 28, generator=gen)
    state = torch.get_rng_state()
    first = div.RandomConvFeatures(seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # building it never touches the global RNG
    second = div.RandomConvFeatures(seed=0)
    other = div.RandomConvFeatures(seed=1)
    assert torch.equal(first(images), second(images))
    assert not torch.allclose(first(images), other(images))
    features = div.random_conv_features(images)
    assert features.shape == (5, 128 * 4 * 4)
    assert torch.allclose(features.norm(dim=1), torch.ones(5), atol=1e-6)
    alone = div.random_conv_features(images[2:3])
    assert torch.allclose(alone[0], features[2], atol=1e-6)  # a sample's vector ignores its batch
    batched = div.random_conv_features(images, batch=2)
    assert torch.allclose(batched, features, atol=1e-6)
    distances = div.pairwise_distances(features)
    assert float(distances.max()) <= 2.0 + 1e-9


def test_grey_images_embed_like_their_rgb_copy():
    grey = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(div.random_conv_features(grey), div.random_conv_features(grey.repeat(1, 3, 1, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="1 or 3"):
        div.random_conv_features(torch.rand(2, 2, 8, 8))


def test_feature_distance_grows_with_the_perturbation():
    gen = torch.Generator().manual_seed(6)
    base = torch.rand(1, 3, 32, 32, generator=gen)
    noise = torch.randn(1, 3, 32, 32, generator=gen)
    distances = [div.mean_pairwise_distance(div.random_conv_features(torch.cat([base, (base + s * noise).clamp(0, 1)])))
                 for s in (0.01, 0.05, 0.2, 0.5)]
    assert distances == sorted(distances) and distances[0] > 0


def test_video_features_are_the_rms_over_frames():
    gen = torch.Generator().manual_seed(7)
    videos = torch.rand(2, 3, 3, 16, 16, generator=gen)  # [N, F, C, H, W]
    features = div.random_conv_features(videos)
    assert torch.allclose(features.norm(dim=1), torch.ones(2), atol=1e-6)
    per_frame = [div.random_conv_features(videos[:, f]) for f in range(3)]
    expected = math.sqrt(sum(float((p[0] - p[1]).norm()) ** 2 for p in per_frame) / 3)
    assert div.mean_pairwise_distance(features) == pytest.approx(expected, rel=1e-5)
    # a still video (every frame the same image) embeds exactly like the image
    still = videos[:, :1].repeat(1, 4, 1, 1, 1)
    assert div.mean_pairwise_distance(div.random_conv_features(still)) == pytest.approx(
        div.mean_pairwise_distance(div.random_conv_features(videos[:, 0])), rel=1e-5)
    pixel = div.sample_diversity(videos, ["p", "p"]).pixel
    assert pixel == pytest.approx(brute_mean_pair_distance(list(videos), rms=True), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# held-out evaluation and the trainer's eval log rows
# ---------------------------------------------------------------------------------------------


def test_eval_rows_carry_the_diversity_of_the_evaluated_samples(tmp_path):
    from branchgrpo.train.evaluation import evaluate
    from test_trainer import make_trainer  # conftest puts tests/ on the path

    trainer = make_trainer(tmp_path, "branchgrpo", "split_plan=0:2,3:2", "run.iterations=1", "eval.every=1",
                           "eval.samples_per_prompt=3")
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval_reward" in row]
    assert [row["iteration"] for row in evals] == [0, 1]
    # the last eval row: the trained weights' samples, recomputed independently here
    prompts = trainer.model.heldout_prompts[: trainer.config.eval.max_prompts or None]
    result = evaluate(trainer.model, trainer.reward, prompts, trainer.config, device="cpu")
    expected = div.sample_diversity(result.images, result.prompts)
    assert evals[-1]["diversity_pixel"] == pytest.approx(expected.pixel, rel=1e-6)
    assert evals[-1]["diversity_feature"] == pytest.approx(expected.feature, rel=1e-6)
    assert evals[-1]["diversity_pixel"] > 0 and evals[-1]["diversity_feature"] > 0
    assert result.diversity_metrics() == {"diversity_pixel": result.diversity.pixel,
                                          "diversity_feature": result.diversity.feature}


def test_one_sample_per_prompt_has_no_diversity(tmp_path):
    from branchgrpo.train.evaluation import evaluate
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, "branchgrpo", "split_plan=0:2,3:2", "eval.samples_per_prompt=1")
    result = evaluate(trainer.model, trainer.reward, trainer.model.heldout_prompts, trainer.config, device="cpu")
    assert result.diversity is None and result.diversity_metrics() == {}


def test_bench_reports_each_methods_end_diversity(tmp_path):
    import csv

    from branchgrpo.bench import run_bench
    from branchgrpo.train.evaluation import evaluate
    from branchgrpo.train.trainer import Trainer
    from test_trainer import brightness_reward, tiny_generator

    trainers = {}

    def make_trainer(config):
        trainers[config.method.name] = Trainer(config, model=tiny_generator(), reward=brightness_reward)
        return trainers[config.method.name]

    methods = ["dancegrpo", "branchgrpo"]
    run_bench(methods, iterations=1, eval_every=1, out_dir=tmp_path, make_trainer=make_trainer,
              overrides=["run.device=cpu", "data.prompts_per_iteration=1", "eval.samples_per_prompt=3", "tree.steps=6",
                         "split_plan=0:2,2:2", "update.learning_rate=1e-2"])
    with open(tmp_path / "bench.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    expected = {}
    for name, trainer in trainers.items():  # the end weights' held-out samples, evaluated again here
        result = evaluate(trainer.model, trainer.reward, trainer.model.heldout_prompts, trainer.config, device="cpu")
        expected[name] = div.sample_diversity(result.images, result.prompts)
        assert float(rows[name]["end_diversity_pixel"]) == pytest.approx(expected[name].pixel, abs=6e-5)
        assert float(rows[name]["end_diversity_feature"]) == pytest.approx(expected[name].feature, abs=6e-5)
    ratio = expected["branchgrpo"].feature / expected["dancegrpo"].feature
    assert float(rows["branchgrpo"]["end_diversity_ratio"]) == pytest.approx(ratio, abs=6e-5)
    assert float(rows["dancegrpo"]["end_diversity_ratio"]) == 1.0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [len(saved["diversity"][m]) for m in methods] == [len(saved["evals"][m]) for m in methods]
    assert "`branchgrpo` end feature diversity ≥ 90% of `dancegrpo`'s" in (tmp_path / "bench.md").read_text()
