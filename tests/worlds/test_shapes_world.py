"""The shipped shapes world: assets, offline loading, packing, the registered reward and family,
diversity on RGB 32×32 samples and one `branchgrpo train` iteration on configs/shapes-branchgrpo.yaml."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from branchgrpo.worlds.shapes import ASSET_DIR, ShapesWorld
from branchgrpo.worlds.shapes.generator import images_to_latents, latents_to_images
from branchgrpo.worlds.shapes.prompts import parse_prompt, split_prompts
from branchgrpo.worlds.shapes.scenes import render
from branchgrpo.worlds.shapes.verifier import verify

ROOT = Path(__file__).resolve().parents[2]


def test_assets_are_small_safetensors_and_json():
    files = [p for p in ASSET_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".safetensors"}
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    assert all(p.stat().st_size < 64 * 2**10 for p in files if p.suffix == ".json")
    meta = json.loads((ASSET_DIR / "generator.json").read_text())
    assert meta["heldout_eval"]["sde_eta_0.3"]["mean_reward"] <= 0.5  # headroom for RL


@pytest.fixture(scope="module")
def world():
    return ShapesWorld.load()


def test_world_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    world = ShapesWorld.load()
    assert world.latent_shape == (64, 48)
    emb = world.encode_prompts(["two red circles left of a blue square", "a green triangle"])
    assert emb["prompt_embeds"].shape == (2, 12, 64) and emb["pooled_prompt_embeds"].shape == (2, 64)
    # no prompt word maps to [UNK]
    ids, _ = world.prompt_encoder.tokenize(world.train_prompts + world.heldout_prompts)
    assert not (ids == world.prompt_encoder.tokenizer.token_to_id("[UNK]")).any()


def test_packing_round_trip_and_token_layout():
    images = torch.stack([render(parse_prompt("a red square"), s) for s in range(3)])
    latents = images_to_latents(images * 2 - 1)
    assert latents.shape == (3, 64, 48)
    assert torch.allclose(latents_to_images(latents), images, atol=1e-6)
    # token 0 holds the top-left 4×4 pixel patch (all 48 values)
    assert torch.equal(latents[0, 0].sort().values, (images[0, :, :4, :4] * 2 - 1).flatten().sort().values)


def test_world_and_registered_reward_agree_with_verifier(world):
    from branchgrpo.rewards import build_reward

    _, heldout = split_prompts()
    images = torch.stack([render(parse_prompt(p), 0) for p in heldout])
    images[::2] = images[1::2].flip(-1)  # some wrong scenes
    expected = verify(images, heldout)
    assert 0 < float(expected.mean()) < 1
    assert torch.equal(world.reward(images, heldout), expected)
    reward = build_reward("shapes")
    assert torch.equal(reward(images, heldout), expected)
    with pytest.raises(ValueError, match="takes no checkpoint"):
        build_reward("shapes", "weights.safetensors")
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        reward(torch.zeros(1, 3, 16, 16), ["a red circle"])


def test_world_samples_decode_to_rgb(world):
    latents = torch.randn(2, *world.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 0.5)
    with torch.no_grad():
        v = world.policy(latents, sigma, world.encode_prompts(["a red circle", "a blue square"]))
    assert v.shape == latents.shape and torch.isfinite(v).all()
    images = world.decode(latents)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_diversity_on_rgb_32x32():
    from branchgrpo.diversity import sample_diversity

    a = render(parse_prompt("a red circle"), 0)
    b = render(parse_prompt("a red circle"), 1)
    images = torch.stack([a, b, a, a])
    result = sample_diversity(images, ["p", "p", "q", "q"])
    expected_pixel = float(((a - b) ** 2).mean().sqrt())
    assert result.per_prompt["p"]["pixel"] == pytest.approx(expected_pixel, rel=1e-6)
    assert result.per_prompt["q"]["pixel"] == 0.0 and result.per_prompt["q"]["feature"] == pytest.approx(0.0, abs=1e-6)
    assert result.per_prompt["p"]["feature"] > 0
    assert result.pixel == pytest.approx(expected_pixel / 2, rel=1e-6)


def test_family_and_reward_are_registered():
    from branchgrpo.families import available_families, get_family
    from branchgrpo.rewards import available_rewards

    assert "shapes" in available_families() and get_family("shapes").builtin_prompts
    assert "shapes" in available_rewards()


def test_one_train_iteration_on_the_shapes_config(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "branchgrpo", "train", "--config", str(ROOT / "configs/shapes-branchgrpo.yaml"),
           f"run.output_dir={out}", "run.iterations=1", "data.prompts_per_iteration=1", "eval.samples_per_prompt=1",
           "eval.max_prompts=2", "tree.steps=8", "split_plan=0:2,3:2", "run.progress=false", "run.device=cpu",
           "run.checkpoint_every=0", "run.dump_tree_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out mean reward" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert len(rewards) == 1 and 0.0 <= rewards[0] <= 1.0
