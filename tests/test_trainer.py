"""The trainer loop on a tiny random FLUX: one full iteration of every Table-1 preset, run outputs."""

import json

import pytest
import torch
from policies import tiny_flux, tiny_flux_conditioning

from branchgrpo.config import ConfigError
from branchgrpo.families import ModelFamily, PolicyBundle, register_family
from branchgrpo.rewards import Reward
from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import PromptSampler, Trainer
from branchgrpo.tree.dump import load_tree
from branchgrpo.tree.presets import TABLE1_PRESETS

PROMPTS = ["red", "green", "blue"]


def tiny_generator() -> PolicyBundle:
    policy, info = tiny_flux(seed=0)
    table = tiny_flux_conditioning(len(PROMPTS))

    def encode(prompts):
        index = torch.tensor([PROMPTS.index(p) for p in prompts])
        return {k: v[index] for k, v in table.items()}

    return PolicyBundle(
        family="tiny", policy=policy, trainable=policy.transformer, latent_shape=(info["tokens"], info["channels"]),
        encode_prompts=encode, decode=lambda x: x.mean(dim=-1, keepdim=True).unsqueeze(1).sigmoid(),
        train_prompts=PROMPTS, heldout_prompts=PROMPTS[:2],
    )


class TinyFamily(ModelFamily):
    """The tiny FLUX as a registered family, so a run's config.yaml can be loaded again."""

    name = "tiny"
    builtin_prompts = True

    def build(self, config, device, dtype):
        return tiny_generator()


register_family(TinyFamily(), replace=True)


def brightness_reward(images, prompts):
    return images.flatten(1).mean(dim=1)


def make_trainer(tmp_path, preset, *overrides):
    config = load_train_config(None, preset, [
        f"run.output_dir={tmp_path}", "run.iterations=1", "run.progress=false", "run.tensorboard=false",
        "run.dump_tree_every=1", "data.prompts_per_iteration=2", "eval.samples_per_prompt=2", "tree.steps=6",
        "run.device=cpu", "update.updates_per_iteration=1", *overrides,
    ])
    return Trainer(config, model=tiny_generator(), reward=brightness_reward)


@pytest.mark.parametrize("preset", TABLE1_PRESETS)
def test_one_iteration_of_every_table1_preset(tmp_path, preset):
    split_overrides = {"dancegrpo": [], "dancegrpo-tf0.6": [], "mixgrpo": ["tree.sde_window.size=2"],
                       "branchgrpo-mix": ["tree.sde_window.size=2", "split_plan=0:2,2:2"]}
    overrides = split_overrides.get(preset, ["split_plan=0:2,2:2"])
    if preset == "branchgrpo-deppru":
        overrides = overrides + ["depth_pruning.size=2"]
    trainer = make_trainer(tmp_path, preset, *overrides)
    before = {k: v.clone() for k, v in trainer.model.trainable.state_dict().items()}
    metrics = trainer.step()
    after = trainer.model.trainable.state_dict()
    assert metrics["iteration"] == 0 and trainer.iteration == 1
    assert metrics["nfe/rollout_calls_measured"] == metrics["nfe/rollout_calls"] * 2
    # before the first optimizer step the policy is the rollout policy: ratio 1 (docs/method.md §8)
    assert metrics["ratio_max_deviation_first_step"] < 1e-4
    assert metrics["nfe/trained_edges"] > 0 and metrics["optimizer_steps"] == 1
    assert any(not torch.equal(before[k], after[k]) for k in before), "the update changed no weight"
    columns, meta = load_tree(tmp_path / "trees" / "iter_000000.safetensors")
    assert int(columns["trained"].sum()) == metrics["nfe/trained_edges"] * 2
    assert meta["method"]["name"] == preset


def test_run_writes_config_metrics_samples_and_weights(tmp_path):
    trainer = make_trainer(tmp_path, "branchgrpo", "split_plan=0:2,3:2", "run.iterations=2", "eval.every=1")
    summary = trainer.run()
    assert summary.iterations == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in lines if "reward_mean" in r]
    eval_rows = [r for r in lines if "eval_reward" in r]
    assert [r["iteration"] for r in train_rows] == [0, 1]
    assert [r["iteration"] for r in eval_rows] == [0, 1, 2]
    for key in ("time/rollout", "time/reward", "time/train", "nfe/rollout_calls", "nfe/training_forwards"):
        assert key in train_rows[0]
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "weights" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "iter_000000.png", "iter_000001.png", "iter_000002.png",
    ]
    reloaded = load_train_config(tmp_path / "config.yaml")
    assert reloaded == trainer.config


def test_prompt_sampler_epochs_cover_every_prompt_once():
    sampler = PromptSampler([f"p{i}" for i in range(7)], seed=3)
    first_epoch = sampler.next(7)
    assert sorted(first_epoch) == sorted(f"p{i}" for i in range(7))
    again = PromptSampler([f"p{i}" for i in range(7)], seed=3)
    assert again.next(3) + again.next(4) == first_epoch


def test_bench_writes_table_for_every_method(tmp_path):
    import csv

    from branchgrpo.bench import run_bench

    methods = ["dancegrpo", "branchgrpo", "branchgrpo-widpru", "branchgrpo-k3"]
    result = run_bench(
        methods, iterations=2, eval_every=1, out_dir=tmp_path,
        overrides=["run.device=cpu", "data.prompts_per_iteration=1", "eval.samples_per_prompt=1", "tree.steps=10"],
        make_trainer=lambda config: Trainer(config, model=tiny_generator(), reward=brightness_reward),
    )
    with open(tmp_path / "bench.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == methods
    for column in ("nfe_old_per_leaf", "nfe_train_per_leaf", "iter_time_s", "time_ratio", "ideal_ratio", "final_reward"):
        assert all(r[column] != "" for r in rows), column
    by_method = {r["method"]: r for r in result["rows"]}
    assert by_method["dancegrpo"]["time_ratio"] == 1.0 and by_method["dancegrpo"]["ideal_ratio"] == 1.0
    # dancegrpo is {0: 16} at 10 steps: 1 + 16*9 = 145 calls for 16 leaves; branchgrpo 1+2*3+4*3+8*3
    assert by_method["dancegrpo"]["nfe_old_per_leaf"] == round(145 / 16, 4)
    assert by_method["branchgrpo"]["nfe_old_per_leaf"] == round(43 / 16, 4)
    assert (tmp_path / "bench.md").read_text().count("|") > 20
    # in-run unit costs: the reference's phase seconds over the model calls it made (2 iterations, 1 prompt)
    saved = json.loads((tmp_path / "bench.json").read_text())
    dance = saved["per_iteration"]["dancegrpo"]
    assert dance["calls"]["rollout_calls"] == 2 * 145
    assert saved["meta"]["unit_cost_rollout_row_s"] == pytest.approx(sum(dance["phase_times"]["rollout"]) / 290)
    # ideal_ratio prices one iteration's model calls, scored samples and prompt groups at the reference's
    # unit costs: per iteration, like time_ratio, so a K = 3 tree (81 leaves per prompt) is priced whole
    meta = saved["meta"]
    roll, train = meta["unit_cost_rollout_row_s"], meta["unit_cost_train_row_s"]
    assert meta["unit_cost_reward_sample_s"] == pytest.approx(sum(dance["phase_times"]["reward"]) / (2 * 16))
    assert meta["unit_cost_encode_group_s"] == pytest.approx(sum(dance["phase_times"]["encode"]) / 2)

    def ideal(name):
        calls = saved["per_iteration"][name]["calls"]
        return (calls["rollout_calls"] * roll + calls["training_forwards"] * train
                + calls["scored_samples"] * meta["unit_cost_reward_sample_s"]
                + calls["prompt_groups"] * meta["unit_cost_encode_group_s"]) / 2

    assert saved["per_iteration"]["branchgrpo-k3"]["calls"]["rollout_calls"] == 2 * 118  # 1 + 3·3 + 9·3 + 27·3
    assert saved["per_iteration"]["branchgrpo-k3"]["calls"]["scored_samples"] == 2 * 81  # the split at step 9
    for name in methods:
        assert by_method[name]["ideal_ratio"] == round(ideal(name) / ideal("dancegrpo"), 4), name
    forwards = dance["calls"]["training_forwards"]
    assert 0 < forwards <= 2 * 145
    assert saved["meta"]["unit_cost_train_row_s"] == pytest.approx(sum(dance["phase_times"]["train"]) / forwards)
    assert "## Targets" in (tmp_path / "bench.md").read_text()


def test_bench_equal_time_trains_every_method_to_the_reference_seconds(tmp_path):
    from branchgrpo.bench import run_bench

    methods = ["dancegrpo", "branchgrpo-mix"]
    result = run_bench(
        methods, iterations=1, eval_every=2, out_dir=tmp_path, equal_time=True,
        overrides=["run.device=cpu", "data.prompts_per_iteration=1", "eval.samples_per_prompt=1", "tree.steps=6",
                   "split_plan=0:2,2:2", "tree.sde_window.size=2"],
        make_trainer=lambda config: Trainer(config, model=tiny_generator(), reward=brightness_reward),
    )
    rows = {r["method"]: r for r in result["rows"]}
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert rows["dancegrpo"]["iterations"] == 1
    for name in methods:
        assert rows[name]["iterations"] >= 1
        assert rows[name]["train_seconds"] >= rows["dancegrpo"]["train_seconds"] - 0.01
        evals = saved["evals"][name]
        assert evals[0][0] == 0 and evals[-1][0] == rows[name]["iterations"]  # the last iteration is evaluated
        assert len(saved["per_iteration"][name]["iteration_times"]) == rows[name]["iterations"]
    # the cost columns read the interleaved round only (iterations=1), whatever the run did after it
    for name in methods:
        run = saved["per_iteration"][name]
        assert len(run["iteration_calls"]) == rows[name]["iterations"]
        assert rows[name]["cost_iterations"] == 1
        assert rows[name]["iter_time_s"] == round(run["iteration_times"][0], 4)
        first_calls = run["iteration_calls"][0]["rollout_calls"]
        assert rows[name]["rollout_ms_per_call"] == round(run["phase_times"]["rollout"][0] / first_calls * 1e3, 4)
    ratio = saved["per_iteration"]["branchgrpo-mix"]["iteration_times"][0] / saved["per_iteration"]["dancegrpo"]["iteration_times"][0]
    assert rows["branchgrpo-mix"]["time_ratio"] == round(ratio, 4)


def test_method_record_first_keeps_the_first_iterations_and_their_calls():
    from branchgrpo.bench import MethodRecord

    record = MethodRecord("m", iteration_times=[1.0, 2.0, 4.0], phase_times={"rollout": [0.5, 1.0, 3.0], "train": [0.3, 0.6, 0.9]},
                          calls={"rollout_calls": 60.0, "training_forwards": 6.0},
                          iteration_calls=[{"rollout_calls": 10.0, "training_forwards": 1.0},
                                           {"rollout_calls": 20.0, "training_forwards": 2.0},
                                           {"rollout_calls": 30.0, "training_forwards": 3.0}])
    head = record.first(2)
    assert head.iteration_times == [1.0, 2.0] and head.phase_times == {"rollout": [0.5, 1.0], "train": [0.3, 0.6]}
    assert head.calls == {"rollout_calls": 30.0, "training_forwards": 3.0}
    assert head.calls_per_iteration == {"rollout_calls": 15.0, "training_forwards": 1.5}
    assert head.unit_costs() == pytest.approx({"rollout_calls": 1.5 / 30.0, "training_forwards": 0.9 / 3.0})
    assert record.first(3) is record and record.first(5) is record
    assert record.calls_per_iteration == {"rollout_calls": 20.0, "training_forwards": 2.0}  # the whole run is untouched


def test_digits_config_file_equals_the_builtin_defaults():
    from pathlib import Path

    shipped = load_train_config(Path(__file__).parents[1] / "configs" / "digits-branchgrpo.yaml")
    assert shipped == load_train_config()


def test_auto_micro_batches_resolve_with_a_ready_model(tmp_path):
    """A Trainer given a ready model (no build_policy) still turns ``auto`` into numbers: on CPU the
    defaults, so the rollout never sees the string."""
    trainer = make_trainer(tmp_path, "branchgrpo", "split_plan=0:2,2:2", "method.engine.rollout_micro_batch=auto",
                           "method.engine.train_micro_batch=auto")
    engine = trainer.config.method.engine
    assert (engine.rollout_micro_batch, engine.train_micro_batch) == (64, 16)
    trainer.run()


def test_diversity_bonus_is_trained_on_and_not_logged_as_reward(tmp_path, monkeypatch):
    """``advantage.diversity_bonus``: the leaves' rewards reaching the advantages are the reward plus
    :func:`group_diversity_bonus` of the final latents; the logged reward stays the reward's own."""
    import branchgrpo.train.trainer as trainer_module
    from branchgrpo.tree.diversity_bonus import group_diversity_bonus

    seen = []
    real = trainer_module.score_tree
    monkeypatch.setattr(trainer_module, "score_tree", lambda tree, rewards, *a, **k: seen.append((tree, rewards))
                        or real(tree, rewards, *a, **k))
    rows = []
    for weight in (0.0, 0.5):
        trainer = make_trainer(tmp_path / str(weight), "branchgrpo", "split_plan=0:2,2:2",
                               f"advantage.diversity_bonus={weight}")
        rows.append(trainer.step())
    (tree_off, off), (tree_on, on) = seen
    assert torch.equal(tree_off.leaf_x0, tree_on.leaf_x0)  # same seed, same model: the same rollout
    bonus = group_diversity_bonus(tree_on.leaf_x0, tree_on.group[-1], 0.5)
    assert bonus.abs().max() > 0
    assert torch.allclose(on, off + bonus, atol=1e-12)
    assert rows[0]["reward_mean"] == rows[1]["reward_mean"]
    assert "diversity_bonus_std" not in rows[0] and rows[1]["diversity_bonus_std"] == pytest.approx(float(bonus.std()))


def test_image_space_diversity_bonus_reads_the_decoded_leaves(tmp_path, monkeypatch):
    """``advantage.diversity_space=image``: the bonus is :func:`group_diversity_bonus` of the decoded
    leaves averaged to ``diversity_image_size``² pixels, not of the latents."""
    import branchgrpo.train.trainer as trainer_module
    from branchgrpo.tree.diversity_bonus import coarse_images, group_diversity_bonus

    seen = []
    real = trainer_module.score_tree
    monkeypatch.setattr(trainer_module, "score_tree", lambda tree, rewards, *a, **k: seen.append((tree, rewards))
                        or real(tree, rewards, *a, **k))
    for name, extra in (("off", []), ("image", ["advantage.diversity_space=image", "advantage.diversity_image_size=4"])):
        trainer = make_trainer(tmp_path / name, "branchgrpo", "split_plan=0:2,2:2",
                               f"advantage.diversity_bonus={0.0 if name == 'off' else 0.5}", *extra)
        trainer.step()
    (tree_off, off), (tree_on, on) = seen
    assert torch.equal(tree_off.leaf_x0, tree_on.leaf_x0)
    with torch.no_grad():
        images = trainer.model.decode(tree_on.leaf_x0)
    expected = group_diversity_bonus(coarse_images(images, 4), tree_on.group[-1], 0.5)
    assert torch.allclose(on, off + expected, atol=1e-12)
    latent = group_diversity_bonus(tree_on.leaf_x0, tree_on.group[-1], 0.5)
    assert not torch.allclose(expected, latent, atol=1e-3)  # a different space, not the latents relabelled


class EmbeddingBrightness(Reward):
    """Brightness with an embedding (the mean of each channel's quadrants): a reward-space bonus test."""

    name, embeds, input_channels = "brightness-embedded", True, None

    def _score(self, images, prompts):
        return images.flatten(1).mean(dim=1)

    def _embed(self, images, prompts):
        self.prompts = prompts
        return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1) + 0.1


def test_reward_space_diversity_bonus_reads_the_rewards_embedding(tmp_path, monkeypatch):
    """``advantage.diversity_space=reward``: the bonus is :func:`group_diversity_bonus` of the reward's
    :meth:`Reward.embed` of the decoded leaves (one prompt each); a reward without one is refused at start."""
    import branchgrpo.train.trainer as trainer_module
    from branchgrpo.tree.diversity_bonus import group_diversity_bonus

    seen = []
    real = trainer_module.score_tree
    monkeypatch.setattr(trainer_module, "score_tree", lambda tree, rewards, *a, **k: seen.append((tree, rewards))
                        or real(tree, rewards, *a, **k))
    reward = EmbeddingBrightness()
    for name, bonus in (("off", 0.0), ("reward", 0.5)):
        config = load_train_config(None, "branchgrpo", [
            f"run.output_dir={tmp_path / name}", "run.progress=false", "run.tensorboard=false", "run.dump_tree_every=0",
            "data.prompts_per_iteration=2", "eval.samples_per_prompt=2", "tree.steps=6", "run.device=cpu",
            "update.updates_per_iteration=1", "split_plan=0:2,2:2", f"advantage.diversity_bonus={bonus}",
            "advantage.diversity_space=reward"])
        trainer = Trainer(config, model=tiny_generator(), reward=reward)
        trainer.step()
    (tree_off, off), (tree_on, on) = seen
    assert torch.equal(tree_off.leaf_x0, tree_on.leaf_x0)
    with torch.no_grad():
        images = trainer.model.decode(tree_on.leaf_x0)
    leaf_prompts = reward.prompts  # the last embed call: every leaf with its own tree's prompt
    assert len(leaf_prompts) == images.shape[0] and len(set(leaf_prompts)) == 2
    assert all(leaf_prompts[i] == leaf_prompts[j] for i in range(len(leaf_prompts)) for j in range(len(leaf_prompts))
               if tree_on.group[-1][i] == tree_on.group[-1][j])
    embedded = reward.embed(images, leaf_prompts)
    expected = group_diversity_bonus(embedded, tree_on.group[-1], 0.5)
    assert expected.abs().max() > 0
    assert torch.allclose(on, off + expected, atol=1e-12)
    with pytest.raises(ConfigError, match="advantage.diversity_space: 'reward' needs a reward with an image embedding"):
        make_trainer(tmp_path / "plain", "branchgrpo", "split_plan=0:2,2:2", "advantage.diversity_bonus=0.5",
                     "advantage.diversity_space=reward")


def test_digits_world_scores_with_the_registered_reward_when_the_bonus_needs_its_embedding(tmp_path):
    """The digits family's built-in reward has no embedding; with diversity_space=reward the trainer
    builds the registered digits reward instead, which scores the same (and embeds)."""
    torch.set_num_threads(1)
    config = load_train_config(None, "branchgrpo-mix", [
        f"run.output_dir={tmp_path}", "run.progress=false", "run.tensorboard=false",
        "advantage.diversity_bonus=0.1", "advantage.diversity_space=reward"])
    trainer = Trainer(config)
    assert trainer.reward.embeds
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a handwritten 7", "the digit 3", "a handwritten 0"]
    assert torch.equal(trainer.reward(images, prompts), trainer.model.builtin_reward(images, prompts))
