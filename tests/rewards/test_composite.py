"""Weighted composites, the weight parser, per-group normalisation (vs hand computation), the
digits reward (vs DigitsWorld.reward) and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from branchgrpo.rewards import (
    CheckpointError,
    CompositeReward,
    Reward,
    RewardError,
    RewardSpec,
    RewardSpecError,
    build_composite,
    build_reward,
    group_normalize,
    parse_reward_weights,
    register_reward,
)


class FixedReward(Reward):
    """Scores given by a table: image i gets values[i] (images carry their index in pixel 0)."""

    def __init__(self, name, values, device="cpu", dtype="float32"):
        super().__init__(device, dtype)
        self.name = name
        self.values = torch.tensor(values, dtype=torch.float32)
        self.calls = 0

    def _score(self, images, prompts):
        self.calls += 1
        return self.values[images[:, 0, 0, 0].mul(100).round().long()]


def _indexed_images(n):
    images = torch.zeros(n, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(n) / 100
    return images


def test_parse_reward_weights():
    assert parse_reward_weights("hps:1.0,clip:0.5") == [("hps", 1.0), ("clip", 0.5)]
    assert parse_reward_weights(" hps , clip : -0.25 ") == [("hps", 1.0), ("clip", -0.25)]
    assert parse_reward_weights("pickscore:2e-1") == [("pickscore", 0.2)]
    for bad, message in [
        ("", "empty reward list"),
        ("hps:1.0,,clip", "item 2 is empty"),
        ("hps:abc", "weight 'abc' of 'hps' is not a number"),
        ("hps:1,hps:2", "'hps' appears twice"),
        (":1", "no valid reward name"),
        ("hps:nan", "must be finite"),
        ("hps:0,clip:0", "every weight is 0"),
    ]:
        with pytest.raises(RewardSpecError, match=message):
            parse_reward_weights(bad)
    with pytest.raises(RewardSpecError, match="unknown reward 'hsp'"):
        parse_reward_weights("hsp:1", known=["hps", "clip"])


def test_group_normalize_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 5.0, 7.0])
    groups = torch.tensor([4, 4, 4, 9, 9, 2, 7])  # arbitrary ids; group 9 constant, group 7 single
    got = group_normalize(scores, groups)
    # group 4: mean 2, unbiased std 1 → (-1, 0, 1)/(1 + 1e-8); group 9: std 0 → 0; group 2 and 7: one member → 0
    expected = torch.tensor([-1 / (1 + 1e-8), 0.0, 1 / (1 + 1e-8), 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(got, expected)
    pair = group_normalize(torch.tensor([0.0, 4.0]), torch.tensor([0, 0]))
    s = math.sqrt(8.0)  # unbiased std of (0, 4)
    torch.testing.assert_close(pair, torch.tensor([-2 / (s + 1e-8), 2 / (s + 1e-8)]))


def test_composite_weighted_sum_and_components():
    a = FixedReward("a", [1.0, 2.0, 3.0, 4.0])
    b = FixedReward("b", [10.0, 0.0, 10.0, 40.0])
    composite = CompositeReward({"a": a, "b": b}, {"a": 1.0, "b": 0.5})
    images = _indexed_images(4)
    out = composite.score(images, ["p"] * 4)
    torch.testing.assert_close(out.total, torch.tensor([1 + 5.0, 2 + 0.0, 3 + 5.0, 4 + 20.0]))
    torch.testing.assert_close(out.components["a"], a.values)
    torch.testing.assert_close(out.components["b"], b.values)
    assert composite(images, ["p"] * 4).shape == (4,)
    assert out.means()["b"] == pytest.approx(15.0)


def test_composite_group_normalisation_by_hand():
    a = FixedReward("a", [1.0, 3.0, 0.2, 0.4, 0.9, 0.1])
    b = FixedReward("b", [20.0, 10.0, 30.0, 30.0, 5.0, 6.0])
    composite = CompositeReward({"a": a, "b": b}, {"a": 2.0, "b": -1.0}, normalize="group")
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    out = composite.score(_indexed_images(6), ["p"] * 6, group_ids=groups)
    s_a = [math.sqrt(2.0), math.sqrt(0.02), math.sqrt(0.32)]  # unbiased std of each pair = |x - y| / sqrt 2
    # group 0: a (1,3) → (-1,1)·sqrt2/s... written out: z = (x - mean) / (std + 1e-8)
    za = [(-1) / (s_a[0] + 1e-8), 1 / (s_a[0] + 1e-8), -0.1 / (s_a[1] + 1e-8), 0.1 / (s_a[1] + 1e-8),
          0.4 / (s_a[2] + 1e-8), -0.4 / (s_a[2] + 1e-8)]
    sb0, sb2 = math.sqrt(50.0), math.sqrt(0.5)
    zb = [5 / (sb0 + 1e-8), -5 / (sb0 + 1e-8), 0.0, 0.0, -0.5 / (sb2 + 1e-8), 0.5 / (sb2 + 1e-8)]  # group 1 of b: std 0
    expected = torch.tensor([2 * x - y for x, y in zip(za, zb)])
    torch.testing.assert_close(out.total, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.components["b"], b.values)  # raw, for logging
    torch.testing.assert_close(out.normalized["b"], torch.tensor(zb), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="pass group_ids"):
        composite(_indexed_images(6), ["p"] * 6)
    assert a.calls == 1  # the missing group ids were caught before scoring
    # chunked scoring + combine gives the same total as one call
    chunks = [composite.components(_indexed_images(6)[i : i + 3], ["p"] * 3) for i in (0, 3)]
    merged = {k: torch.cat([c[k] for c in chunks]) for k in ("a", "b")}
    torch.testing.assert_close(composite.combine(merged, groups).total, out.total)


def test_batch_normalisation():
    a = FixedReward("a", [1.0, 2.0, 3.0])
    out = CompositeReward({"a": a}, {"a": 1.0}, normalize="batch").score(_indexed_images(3), ["p"] * 3)
    torch.testing.assert_close(out.total, torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-8))


def test_registry_builds_composites_from_strings():
    register_reward("fixed_a", lambda checkpoint=None, device="cpu", dtype="float32", **kw: FixedReward("fixed_a", [1.0, 2.0]))
    register_reward("fixed_b", lambda checkpoint=None, device="cpu", dtype="float32", **kw: FixedReward("fixed_b", [5.0, 7.0]))
    composite = build_reward("fixed_a:1.0,fixed_b:0.5")
    assert isinstance(composite, CompositeReward) and composite.weights == {"fixed_a": 1.0, "fixed_b": 0.5}
    torch.testing.assert_close(composite(_indexed_images(2), ["x", "y"]), torch.tensor([3.5, 5.5]))
    specs = RewardSpec.parse("fixed_a:2,fixed_b")
    assert [(s.name, s.weight) for s in specs] == [("fixed_a", 2.0), ("fixed_b", 1.0)]
    group = build_composite(specs, normalize="group")
    assert group.normalize == "group"
    with pytest.raises(RewardSpecError, match="settings for \\['clip'\\]"):
        build_reward("fixed_a:1,fixed_b:1", checkpoint={"clip": "x"})
    with pytest.raises(RewardSpecError, match="unknown keys"):
        RewardSpec.from_dict({"name": "hps", "wieght": 1})
    with pytest.raises(RewardError, match="unknown reward 'hsp' \\(did you mean 'hps'\\?\\)"):
        build_reward("hsp")


def test_digits_reward_matches_digits_world():
    torch.set_num_threads(1)
    from branchgrpo.worlds.digits import DigitsWorld
    from branchgrpo.worlds.digits.world import load_classifier

    world = DigitsWorld(None, None, load_classifier())  # DigitsWorld.reward only uses the classifier
    reward = build_reward("digits")
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 16, 16, generator=gen) * 1.2 - 0.1  # a little outside [0, 1]: both clamp
    prompts = ["a handwritten 7", "the digit 3", "the number seven", "a handwritten 0", "the digit 9", "a handwritten 1"]
    expected = world.reward(images, prompts)
    got = reward(images, prompts)
    print(f"digits max |ours - DigitsWorld.reward| = {(got - expected).abs().max().item():.3g}")
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"\[B, 1, 16, 16\]|1-channel"):
        reward(torch.rand(2, 3, 16, 16), prompts[:2])
    with pytest.raises(ValueError, match="names no digit"):
        reward(images[:1], ["a cat"])


def test_digits_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing.*does not exist"):
        build_reward("digits", str(tmp_path / "nothing"))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"config": {"width": 16, "hidden": 64, "dropout": 0.25}}')
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*does not match the reward's architecture"):
        build_reward("digits", str(tmp_path))


def test_digits_embedding_is_the_classifiers_last_hidden_layer():
    """``embed`` (advantage.diversity_space=reward): the classifier's last hidden layer, unit-normalised,
    computed here layer by layer from its weights; the logits are read from it."""
    import torch.nn.functional as F

    torch.set_num_threads(1)
    reward = build_reward("digits")
    assert reward.embeds
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(5, 1, 16, 16, generator=gen)
    prompts = ["a handwritten 7"] * 5
    convs = [m for m in reward.classifier.features if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in reward.classifier.head if isinstance(m, torch.nn.Linear)]
    x = images * 2.0 - 1.0
    x = F.max_pool2d(F.relu(F.conv2d(F.relu(F.conv2d(x, convs[0].weight, convs[0].bias, padding=1)),
                                     convs[1].weight, convs[1].bias, padding=1)), 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, convs[2].weight, convs[2].bias, padding=1)), 2)
    hidden = F.relu(F.linear(x.flatten(1), linears[0].weight, linears[0].bias))
    got = reward.embed(images, prompts)
    torch.testing.assert_close(got, F.normalize(hidden, dim=-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(5))
    probs = F.linear(hidden, linears[1].weight, linears[1].bias).softmax(-1)[:, 7]
    torch.testing.assert_close(reward(images, prompts), probs, atol=1e-6, rtol=1e-5)


def test_embedding_of_a_list_and_of_a_reward_without_one():
    """A weighted list embeds as its components that have an embedding, joined and renormalised;
    a reward without one refuses by name."""
    import torch.nn.functional as F

    digits = build_reward("digits")
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    prompts = ["the digit 3"] * 4
    plain = FixedReward("table", [0.1, 0.2, 0.3, 0.4])
    assert not plain.embeds
    with pytest.raises(RewardError, match="reward 'table' has no image embedding"):
        plain.embed(images, prompts)
    assert CompositeReward({"d": digits, "t": plain}, {"d": 1.0, "t": 1.0}).embeds
    joined = CompositeReward({"d": digits, "t": plain}, {"d": 1.0, "t": 1.0}).embed(images, prompts)
    torch.testing.assert_close(joined, digits.embed(images, prompts))  # one part: itself
    two = CompositeReward({"a": digits, "b": digits}, {"a": 1.0, "b": 2.0}).embed(images, prompts)
    part = digits.embed(images, prompts)
    torch.testing.assert_close(two, F.normalize(torch.cat([part, part], dim=-1), dim=-1))
    torch.testing.assert_close(two, torch.cat([part, part], dim=-1) / math.sqrt(2))
    with pytest.raises(RewardError, match="no component has an image embedding"):
        CompositeReward({"t": plain}, {"t": 1.0}).embed(images, prompts)
