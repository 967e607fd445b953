"""The shipped digits world: reward accuracy, reward semantics, generator shapes, base-model headroom."""

from __future__ import annotations

import pytest
import torch

from branchgrpo.models.flux import FluxVelocity, pack_latents
from branchgrpo.worlds.digits import ASSET_DIR, DigitsWorld, parse_digit
from branchgrpo.worlds.digits.evaluate import sample_and_score
from branchgrpo.worlds.digits.prompts import DIGIT_WORDS


@pytest.fixture(scope="module")
def world() -> DigitsWorld:
    torch.set_num_threads(1)
    return DigitsWorld.load("cpu")


@pytest.fixture(scope="module")
def heldout():
    pytest.importorskip("sklearn")
    from branchgrpo.worlds.digits.data import load_digit_images

    return load_digit_images("heldout")


def test_assets_are_small_safetensors_and_json():
    files = [p for p in ASSET_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".safetensors", ".json"}, files
    assert sum(p.stat().st_size for p in files) < 20 * 2**20


def test_split_is_fixed_and_disjoint():
    pytest.importorskip("sklearn")
    from branchgrpo.worlds.digits.data import split_indices

    train, heldout = split_indices(1797)
    assert train.numel() == 1500 and heldout.numel() == 297
    assert not set(train.tolist()) & set(heldout.tolist())
    assert torch.equal(split_indices(1797)[1], heldout)


def test_classifier_heldout_accuracy(world, heldout):
    images, labels = heldout
    assert images.shape == (297, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        accuracy = (world.classifier(images).argmax(-1) == labels).float().mean().item()
    assert accuracy >= 0.95


def test_reward_is_probability_of_prompted_digit(world, heldout):
    images, labels = heldout
    images01 = (images + 1) / 2
    right = world.reward(images01, [f"a handwritten {int(d)}" for d in labels])
    wrong = world.reward(images01, [f"the number {DIGIT_WORDS[(int(d) + 1) % 10]}" for d in labels])
    assert right.shape == (297,) and right.dtype == torch.float32
    for reward in (right, wrong):
        assert ((reward >= 0) & (reward <= 1)).all()
    assert right.mean() > 0.9 and wrong.mean() < 0.05
    assert (right > wrong).float().mean() >= 0.95
    # Rewards over all ten prompts of one image sum to one (a softmax).
    total = sum(world.reward(images01[:8], [f"the digit {d}"] * 8) for d in range(10))
    torch.testing.assert_close(total, torch.ones(8), atol=1e-5, rtol=0)


def test_reward_rejects_bad_input(world):
    with pytest.raises(ValueError, match="one prompt per image"):
        world.reward(torch.zeros(2, 1, 16, 16), ["a handwritten 1"])
    with pytest.raises(ValueError, match=r"\[B, 1, 16, 16\]"):
        world.reward(torch.zeros(2, 16, 16), ["a handwritten 1"] * 2)


def test_generator_shapes_and_trainable_parameters(world):
    assert isinstance(world.policy, FluxVelocity)
    assert world.latent_shape == (64, 4)
    trainable = {id(p) for p in world.policy.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in world.policy.transformer.parameters()}
    assert 1_000_000 <= sum(p.numel() for p in world.policy.parameters()) <= 2_000_000

    conditioning = world.encode_prompts(["a handwritten 7", "the number three", "no digit here"])
    assert conditioning["prompt_embeds"].shape == (3, 12, 64)
    assert conditioning["pooled_prompt_embeds"].shape == (3, 64)
    assert not conditioning["prompt_embeds"].requires_grad
    latents = torch.randn(3, 64, 4, generator=torch.Generator().manual_seed(0))
    velocity = world.policy(latents, torch.tensor([1.0, 0.5, 0.1]), conditioning)
    assert velocity.shape == (3, 64, 4) and velocity.dtype == torch.float32 and torch.isfinite(velocity).all()
    velocity.sum().backward()  # gradients reach the transformer only
    assert world.policy.transformer.proj_out.weight.grad is not None
    world.policy.zero_grad(set_to_none=True)

    images = world.decode(latents)
    assert images.shape == (3, 1, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_decode_inverts_packing(world, heldout):
    images = heldout[0][:4]
    torch.testing.assert_close(world.decode(pack_latents(images)), (images + 1) / 2)


def test_generator_weights_override(world, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "policy.safetensors"
    state = {k: v.detach().clone() + 0.01 for k, v in world.policy.state_dict().items()}
    save_file(state, str(path))  # a FluxVelocity state dict: keys "transformer.…"
    other = DigitsWorld.load("cpu", generator_weights=str(path))
    key = "proj_out.bias"
    torch.testing.assert_close(other.policy.transformer.state_dict()[key], state["transformer." + key])


def test_base_model_has_reward_headroom(world):
    # Measured with scripts/train_digits_generator.py on 160 samples: see docs/digits-world.md.
    scores = sample_and_score(world, world.heldout_prompts, samples_per_prompt=2, eta=0.3, seed=0)
    assert scores.images.shape == (40, 1, 16, 16)
    assert 0.2 < scores.mean_reward < 0.9


def test_parse_digit():
    assert parse_digit("a handwritten 7") == 7
    assert parse_digit("The number SEVEN") == 7
    assert parse_digit("a drawing of the number 0.") == 0
    for prompt in ("a handwritten cat", "the number 17", "a 3 and a 4", ""):
        with pytest.raises(ValueError, match=repr(prompt).replace(".", r"\.")):
            parse_digit(prompt)
