"""Specification tests for the tree dump: one row per node, columns checked node by node against
the in-memory tree and its scores, metadata, and the atomic write."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import branchgrpo.tree.dump as dump_module
from branchgrpo.config import build
from branchgrpo.tree.dump import load_tree, save_tree
from branchgrpo.tree.presets import method_config
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.scoring import score_tree
from branchgrpo.tree.spec import TreeSpec
from policies import TinyMLPPolicy, tiny_conditioning

DIM = 8


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matmuls: OpenMP hand-off between threads costs ~1000x the work on a 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def scored(preset="branchgrpo-mix", overrides=None, num_prompts=2, iteration=0, seed=0):
    config = method_config(preset, overrides or [])
    model = TinyMLPPolicy(dim=DIM, seed=0)
    with torch.no_grad():
        tree = rollout(
            model, tiny_conditioning(num_prompts), config.tree, num_prompts, (DIM,),
            generator=torch.Generator().manual_seed(seed), iteration=iteration,
        )
    rewards = torch.randn(tree.parent[-1].numel(), generator=torch.Generator().manual_seed(seed + 1))
    return tree, score_tree(tree, rewards, config), config


CASES = [
    # Mix: ODE steps (logp 0, is_sde False, never trained), roots_per_prompt 2
    ("branchgrpo-mix", ["tree.steps=10", "tree.split_plan={0: 2, 3: 2}", "tree.roots_per_prompt=2",
                        "tree.sde_window={size: 2, start: 5, advance_every: 0}"], 2),
    ("branchgrpo-widpru", ["tree.steps=8", "tree.split_plan={1: 3, 4: 2}"], 3),
    ("dancegrpo", ["tree.steps=4", "tree.logprob_reduction=sum", "advantage.fusion_beta=0.5"], 2),
]


@pytest.mark.parametrize("preset,overrides,num_prompts", CASES)
def test_round_trip_one_row_per_node(tmp_path, preset, overrides, num_prompts):
    tree, scores, config = scored(preset, overrides, num_prompts)
    path = save_tree(tmp_path / "sub" / "tree.safetensors", tree, scores, config)
    columns, meta = load_tree(path)

    # Brute force, node by node: rows ordered by depth then index; a node's row is the number
    # of nodes at shallower depths plus its index.
    first_row, total = [], 0
    for p in tree.parent:
        first_row.append(total)
        total += p.numel()
    expected = {k: [] for k in ("parent", "depth", "step", "tree_id", "logp", "is_sde", "leaf_reward",
                                "fused_reward", "advantage", "trained")}
    steps = len(tree.parent) - 1
    for d in range(steps + 1):
        for j in range(tree.parent[d].numel()):
            root = d == 0
            expected["parent"].append(-1 if root else first_row[d - 1] + int(tree.parent[d][j]))
            expected["depth"].append(d)
            expected["step"].append(d - 1)
            expected["tree_id"].append(int(tree.group[d][j]))
            expected["logp"].append(0.0 if root else float(tree.logp[d][j]))
            expected["is_sde"].append(False if root else bool(tree.sde[d - 1]))
            expected["leaf_reward"].append(float(scores.leaf_rewards[j]) if d == steps else math.nan)
            expected["fused_reward"].append(float(scores.fused.reward[d][j]))
            expected["advantage"].append(0.0 if root else float(scores.edge_advantage[d][j]))
            expected["trained"].append(False if root else bool(scores.selection.mask[d][j]))

    assert set(expected) <= set(columns)
    for name, values in expected.items():
        assert columns[name].shape == (total,), name
    assert columns["parent"].tolist() == expected["parent"]
    assert columns["depth"].tolist() == expected["depth"]
    assert columns["step"].tolist() == expected["step"]
    assert columns["tree_id"].tolist() == expected["tree_id"]
    assert columns["is_sde"].tolist() == expected["is_sde"]
    assert columns["trained"].tolist() == expected["trained"]
    # float columns are stored as float32: compare to the float32 value of the in-memory number
    for name in ("logp", "leaf_reward", "fused_reward", "advantage"):
        want = torch.tensor(expected[name], dtype=torch.float32)
        torch.testing.assert_close(columns[name].float(), want, rtol=0, atol=0, equal_nan=True, msg=name)

    # structural facts a reader relies on, checked on the loaded columns alone
    parent = columns["parent"]
    internal = parent >= 0
    assert (columns["depth"][internal] == columns["depth"][parent[internal]] + 1).all()
    assert (columns["tree_id"][internal] == columns["tree_id"][parent[internal]]).all()
    is_leaf = columns["depth"] == steps
    assert torch.isnan(columns["leaf_reward"][~is_leaf]).all() and torch.isfinite(columns["leaf_reward"][is_leaf]).all()
    ode_or_root = ~columns["is_sde"]
    assert columns["logp"][ode_or_root].eq(0).all()
    assert columns["logp"][columns["is_sde"]].ne(0).all()
    assert not columns["trained"][ode_or_root].any()  # ODE edges are never trained (docs/method.md §7.4)
    assert int(columns["trained"].sum()) == scores.selection.trained_edges

    # metadata: spec / beta / reduction as JSON, rebuildable into the same TreeSpec
    assert meta["format"] == "branchgrpo-tree/1"
    assert meta["beta"] == config.advantage.fusion_beta
    assert meta["reduction"] == config.tree.logprob_reduction
    assert meta["iteration"] == tree.iteration
    assert meta["num_groups"] == num_prompts
    assert isinstance(meta["spec"], dict)
    assert meta["spec"]["split_plan"] == {str(k): v for k, v in config.tree.split_plan.items()}
    assert meta["spec"]["eta"] == config.tree.eta and meta["spec"]["steps"] == config.tree.steps
    assert build(TreeSpec, meta["spec"]) == config.tree
    assert meta["method"]["name"] == config.name


def test_mix_case_really_has_ode_edges_and_untrained_edges():
    """Guard: the first CASE exercises ODE rows, several roots per prompt and pruned edges."""
    tree, scores, _ = scored(*CASES[0])
    assert not all(tree.sde) and any(tree.sde)
    assert tree.parent[0].numel() == 4
    assert 0 < scores.selection.trained_edges < sum(p.numel() for p in tree.parent[1:])


def test_extra_tensors_are_stored_and_may_not_clash(tmp_path):
    tree, scores, config = scored(*CASES[1])
    thumbs = torch.arange(tree.leaf_x0.numel(), dtype=torch.float32).reshape(tree.leaf_x0.shape)
    path = save_tree(tmp_path / "t.safetensors", tree, scores, config, extra_tensors={"leaf_x0": thumbs})
    columns, _ = load_tree(path)
    assert torch.equal(columns["leaf_x0"], thumbs)
    with pytest.raises(ValueError, match="logp"):
        save_tree(tmp_path / "u.safetensors", tree, scores, config, extra_tensors={"logp": thumbs})


def test_write_is_atomic_and_replaces_existing_file(tmp_path):
    tree, scores, config = scored(*CASES[1])
    path = tmp_path / "tree.safetensors"
    # an existing, larger file is replaced whole (no stale tail bytes)
    path.write_bytes(b"\xff" * 5_000_000)
    save_tree(path, tree, scores, config)
    assert sorted(os.listdir(tmp_path)) == ["tree.safetensors"]  # no temporary file left behind
    columns, _ = load_tree(path)
    assert columns["depth"].numel() == sum(p.numel() for p in tree.parent)
    size_fresh = path.stat().st_size
    save_tree(tmp_path / "fresh.safetensors", tree, scores, config)
    assert size_fresh == (tmp_path / "fresh.safetensors").stat().st_size < 5_000_000


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    tree, scores, config = scored(*CASES[1])
    path = tmp_path / "tree.safetensors"
    save_tree(path, tree, scores, config)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")  # a crash half-way through the write
        raise OSError("disk full")

    import branchgrpo.atomic as atomic_module

    monkeypatch.setattr(atomic_module, "save_file", crash)
    other_tree, other_scores, _ = scored(*CASES[1], seed=5)
    with pytest.raises(OSError, match="disk full"):
        save_tree(path, other_tree, other_scores, config)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["tree.safetensors"]


def test_load_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a branchgrpo tree dump"):
        load_tree(path)


# -- prompts and x̂0 thumbnails (what the trainer stores) -------------------------------------------
def picture(latents: torch.Tensor) -> torch.Tensor:
    """A stand-in decoder: latents [N, 8] → grey images [N, 1, 2, 4] in [0, 1]."""
    return torch.sigmoid(latents.reshape(-1, 1, 2, 4).float())


def test_node_thumbnails_are_each_nodes_predicted_clean_image(tmp_path):
    from branchgrpo.models.protocol import select_conditioning
    from branchgrpo.tree.dump import THUMBNAIL_KEY, node_thumbnails

    config = method_config("branchgrpo", ["tree.steps=5", "tree.split_plan={0: 2, 2: 3}"])
    model, conditioning = TinyMLPPolicy(dim=DIM, seed=0), tiny_conditioning(2)
    with torch.no_grad():
        tree = rollout(model, conditioning, config.tree, 2, (DIM,), generator=torch.Generator().manual_seed(3),
                       keep_node_x0=True)
        plain = rollout(model, conditioning, config.tree, 2, (DIM,), generator=torch.Generator().manual_seed(3))
    for kept, without in zip(tree.latents + tree.logp, plain.latents + plain.logp):
        assert torch.equal(kept, without)  # keeping x̂0 for a dump does not change the tree that trains
    thumbs = node_thumbnails(tree, picture)

    # x̂0 = x − σ·v at every node (rectified flow), from the policy called here; a leaf shows its parent's
    expected = []
    for d, x in enumerate(tree.latents[:-1]):
        sigma = torch.full((x.shape[0],), float(tree.sigmas[d]))
        with torch.no_grad():
            v = model(x, sigma, select_conditioning(conditioning, tree.group[d]))
        expected.append(x.double() - float(tree.sigmas[d]) * v.double())
    expected.append(expected[-1][tree.parent[-1]])
    pixels = (picture(torch.cat(expected)) * 255).round()
    assert thumbs.dtype == torch.uint8 and thumbs.shape == (sum(p.numel() for p in tree.parent), 1, 2, 4)
    assert (thumbs.double() - pixels).abs().max() <= 1  # float32 vs float64 rounding at a .5 boundary

    scores = score_tree(tree, torch.randn(tree.parent[-1].numel(), generator=torch.Generator().manual_seed(4)), config)
    prompts = ["a red fox", "zwei Äpfel „quoted“"]
    path = save_tree(tmp_path / "t.safetensors", tree, scores, config, prompts=prompts,
                     extra_tensors={THUMBNAIL_KEY: thumbs, "absent": None})
    columns, meta = load_tree(path)
    assert meta["prompts"] == prompts and torch.equal(columns[THUMBNAIL_KEY], thumbs) and "absent" not in columns
    with pytest.raises(ValueError, match="3 prompts for 2 prompt groups"):
        save_tree(tmp_path / "u.safetensors", tree, scores, config, prompts=prompts + ["x"])
    with pytest.raises(ValueError, match="keep_node_x0=True"):
        node_thumbnails(plain, picture)


def test_thumbnails_shrink_like_pil_and_take_a_videos_middle_frame():
    from PIL import Image

    from branchgrpo.tree.dump import thumbnails

    images = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    small = thumbnails(images, size=32)
    assert small.dtype == torch.uint8 and small.shape == (2, 3, 19, 32)  # long side 32, aspect kept (48·0.4)
    for image, thumb in zip(images, small):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        resized = Image.fromarray(pixels).resize((32, 19), Image.Resampling.BILINEAR)
        reference = torch.from_numpy(np.array(resized)).permute(2, 0, 1)
        assert (thumb.int() - reference.int()).abs().max() <= 2  # PIL resamples the rounded uint8 image
    video = torch.zeros(1, 5, 1, 4, 4)
    video[:, 2] = 1.0
    assert torch.equal(thumbnails(video), torch.full((1, 1, 4, 4), 255, dtype=torch.uint8))  # frame 2 of 0..4
    assert torch.equal(thumbnails(torch.full((1, 1, 4, 4), 0.5)), torch.full((1, 1, 4, 4), 128, dtype=torch.uint8))
    assert thumbnails(torch.rand(3, 7)) is None and thumbnails(torch.rand(2, 2, 4, 4)) is None
