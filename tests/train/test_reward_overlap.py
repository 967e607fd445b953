"""reward.overlap: scoring each chunk of prompt groups while the next rolls out gives the serial
iteration bit for bit (trees, leaf rewards, advantages, updated weights, metrics)."""

import functools

import pytest
import torch
from policies import tiny_flux, tiny_flux_conditioning

import branchgrpo.train.trainer as trainer_module
from branchgrpo.config import ConfigError
from branchgrpo.families import ModelFamily, PolicyBundle, register_family
from branchgrpo.rewards import register_reward
from branchgrpo.rewards.base import Reward, RewardError, as_reward
from branchgrpo.train.config import load_train_config
from branchgrpo.train.reward_worker import ProcessRewardWorker, ThreadRewardWorker
from branchgrpo.train.trainer import Trainer

PROMPTS = ["red", "green", "blue"]


class OverlapFamily(ModelFamily):
    """A tiny random FLUX whose "decoder" maps each latent row to a 1-channel image."""

    name = "overlap-tiny"
    builtin_prompts = True

    def build(self, config, device, dtype):
        policy, info = tiny_flux(seed=0)
        table = tiny_flux_conditioning(len(PROMPTS))

        def encode(prompts):
            index = torch.tensor([PROMPTS.index(p) for p in prompts])
            return {k: v[index] for k, v in table.items()}

        return PolicyBundle(
            family=self.name, policy=policy, trainable=policy.transformer,
            latent_shape=(info["tokens"], info["channels"]), encode_prompts=encode,
            decode=lambda x: x.mean(dim=-1, keepdim=True).unsqueeze(1).sigmoid(),
            train_prompts=PROMPTS, heldout_prompts=PROMPTS[:2],
        )


def image_mean(images, prompts):
    return images.flatten(1).mean(dim=1)


def image_spread(images, prompts):
    return images.flatten(1).std(dim=1) * torch.tensor([len(p) for p in prompts], dtype=images.dtype)


class RankInGroup(Reward):
    """Judges whole groups (like a pairwise judge): each image's rank by mean within its prompt group."""

    name = "overlap-rank"
    needs_groups = True
    input_channels = None

    def score(self, images, prompts, group_ids=None):
        from branchgrpo.rewards.base import RewardOutput

        means = images.flatten(1).mean(dim=1)
        ranks = torch.empty_like(means)
        for group in group_ids.unique():
            rows = (group_ids == group).nonzero().flatten()
            ranks[rows] = means[rows].argsort().argsort().float() / len(rows) + float(group)
        return RewardOutput(total=ranks, components={self.name: ranks})


class Embedded(Reward):
    """Image mean with an embedding (each channel's quadrant means): the reward-space diversity bonus."""

    name = "overlap-embedded"
    input_channels = None
    embeds = True

    def _score(self, images, prompts):
        return images.flatten(1).mean(dim=1)

    def _embed(self, images, prompts):
        return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1) + 0.1


class Broken(Reward):
    name = "overlap-broken"
    input_channels = None

    def _score(self, images, prompts):
        raise RewardError("the judge fell over")


def _factory(make):
    return lambda checkpoint=None, device=None, dtype=None, **options: make()


register_family(OverlapFamily(), replace=True)
register_reward("overlap-mean", _factory(lambda: as_reward(image_mean, name="overlap-mean")), needs_checkpoint=False)
register_reward("overlap-spread", _factory(lambda: as_reward(image_spread, name="overlap-spread")),
                needs_checkpoint=False)
register_reward("overlap-rank", _factory(RankInGroup), needs_checkpoint=False)
register_reward("overlap-broken", _factory(Broken), needs_checkpoint=False)
register_reward("overlap-embedded", _factory(Embedded), needs_checkpoint=False, embeds=True)

# a weighted list normalised over the whole batch: chunks must be combined once, not one by one
BATCH_NORMALISED = ["reward.name=overlap-mean:1.0,overlap-spread:0.5", "reward.normalize=batch"]
GROUP_JUDGE = ["reward.name=overlap-rank"]


def make_config(tmp_path, *overrides):
    return load_train_config(None, "branchgrpo", [
        f"run.output_dir={tmp_path}", "run.iterations=1", "run.progress=false", "run.tensorboard=false",
        "run.device=cpu", "model.family=overlap-tiny", "data.prompts_per_iteration=3", "tree.steps=4",
        "split_plan=0:2,2:2", "update.updates_per_iteration=1",
        # one row per denoiser call: the tiny FLUX on MKL is not batch-invariant (~1e-7 with other batch mates)
        "engine.rollout_micro_batch=1", *overrides,
    ])


def one_iteration(tmp_path, monkeypatch, *overrides):
    """Run one step; return what it scored, the trees' scores, the new weights and the metrics."""
    seen = {}
    score_tree = trainer_module.score_tree

    def recording_score_tree(tree, leaf_rewards, method, generator):
        seen["tree"], seen["leaf_rewards"] = tree, leaf_rewards
        seen["scores"] = score_tree(tree, leaf_rewards, method, generator=generator)
        return seen["scores"]

    monkeypatch.setattr(trainer_module, "score_tree", recording_score_tree)
    config = make_config(tmp_path, *overrides)
    trainer = Trainer(config, model=OverlapFamily().build(config, "cpu", torch.float32))
    metrics = trainer.step()
    seen["weights"] = {k: v.clone() for k, v in trainer.model.trainable.state_dict().items()}
    seen["metrics"] = {k: v for k, v in metrics.items() if not k.startswith(("time/", "throughput/", "memory/"))}
    return seen


def assert_identical(overlapped, serial):
    a, b = overlapped["tree"], serial["tree"]
    for name in ("parent", "group", "latents", "logp"):
        for depth, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            assert torch.equal(x, y), f"tree {name}[{depth}] differs"
    assert torch.equal(overlapped["leaf_rewards"], serial["leaf_rewards"])
    for depth, (x, y) in enumerate(zip(overlapped["scores"].edge_advantage, serial["scores"].edge_advantage)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"advantages at depth {depth} differ"
    for name, value in serial["weights"].items():
        assert torch.equal(overlapped["weights"][name], value), f"updated weight {name} differs"
    assert overlapped["metrics"] == serial["metrics"]


@pytest.mark.parametrize("reward", [BATCH_NORMALISED, GROUP_JUDGE], ids=["batch-normalised-list", "group-judge"])
def test_thread_overlap_gives_the_serial_iteration_bit_for_bit(tmp_path, monkeypatch, reward):
    serial = one_iteration(tmp_path / "serial", monkeypatch, *reward)
    # the rewards are not all equal, so normalising per chunk instead of per batch would show
    assert serial["leaf_rewards"].unique().numel() > 4
    for chunk in (1, 2):  # 2: chunks of 2 and 1 prompt groups
        overlapped = one_iteration(tmp_path / f"overlap{chunk}", monkeypatch, *reward, "reward.overlap=true",
                                   f"reward.overlap_chunk={chunk}")
        assert_identical(overlapped, serial)


@pytest.mark.parametrize("space", ["image", "reward"])
def test_image_and_reward_space_diversity_bonus_is_the_same_with_overlap(tmp_path, monkeypatch, space):
    """The image- or reward-space bonus reads the decoded leaves chunk by chunk under overlap; joined,
    they are the serial iteration's, so every leaf reward (reward + bonus) is too."""
    bonus = ["advantage.diversity_bonus=0.3", f"advantage.diversity_space={space}", "advantage.diversity_image_size=2"]
    reward = BATCH_NORMALISED if space == "image" else ["reward.name=overlap-mean:1.0,overlap-embedded:0.5"]
    serial = one_iteration(tmp_path / "serial", monkeypatch, *reward, *bonus)
    assert serial["metrics"]["diversity_bonus_std"] > 0.01  # the bonus is on and differs between leaves
    overlapped = one_iteration(tmp_path / "overlap", monkeypatch, *reward, *bonus, "reward.overlap=true",
                               "reward.overlap_chunk=2")
    assert_identical(overlapped, serial)


def test_process_overlap_gives_the_serial_iteration_bit_for_bit(tmp_path, monkeypatch):
    serial = one_iteration(tmp_path / "serial", monkeypatch, *BATCH_NORMALISED)
    overlapped = one_iteration(tmp_path / "process", monkeypatch, *BATCH_NORMALISED, "reward.overlap=true",
                               "reward.overlap_chunk=2", "reward.worker=process")
    assert_identical(overlapped, serial)


def test_a_failing_reward_fails_the_iteration_with_its_message(tmp_path):
    config = make_config(tmp_path, "reward.name=overlap-broken", "reward.overlap=true")
    trainer = Trainer(config, model=OverlapFamily().build(config, "cpu", torch.float32))
    with pytest.raises(RewardError, match="the judge fell over"):
        trainer.step()


def test_process_worker_reports_a_reward_it_cannot_build():
    # building the reward opens a file that is not there (picklable, and the process imports no test code)
    worker = ProcessRewardWorker(functools.partial(open, "/nowhere/weights.safetensors"), batch_size=4, threads=1)
    first = worker.submit(torch.zeros(2, 1, 4, 4), ["a", "b"], torch.tensor([0, 0]))
    with pytest.raises(RewardError, match="could not build its reward: FileNotFoundError: .*/nowhere/weights"):
        first.result(timeout=120)
    with pytest.raises(RewardError, match="could not build"):  # later chunks too, at once
        worker.submit(torch.zeros(1, 1, 4, 4), ["c"], torch.tensor([1])).result(timeout=1)
    worker.close()


def test_thread_worker_scores_chunks_as_score_reward_chunk():
    from branchgrpo.train.components import score_reward_chunk

    reward = as_reward(image_mean, name="overlap-mean")
    images = torch.rand(5, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    worker = ThreadRewardWorker(reward, batch_size=2)
    result = worker.submit(images, list("abcde"), torch.tensor([0, 0, 1, 1, 1])).result()
    worker.close()
    expected = images.flatten(1).mean(dim=1)  # independent of the batching
    assert torch.equal(result["overlap-mean"], expected)
    assert torch.equal(result["overlap-mean"], score_reward_chunk(reward, images, list("abcde"), torch.zeros(5), 5)
                       ["overlap-mean"])


@pytest.mark.parametrize(("overrides", "field", "message"), [
    (["reward.overlap=true", "tree.shared_root_noise=true"], "reward.overlap", "shared_root_noise"),
    (["reward.overlap_chunk=0"], "reward.overlap_chunk", "must be >= 1"),
    (["reward.worker=gpu"], "reward.worker", "thread"),
    (["reward.worker_device=tpu"], "reward.worker_device", "allowed values"),
])
def test_bad_overlap_settings_are_one_config_error(tmp_path, overrides, field, message):
    with pytest.raises(ConfigError, match=message) as caught:
        config = make_config(tmp_path, "reward.name=overlap-mean", *overrides)
        Trainer(config, model=OverlapFamily().build(config, "cpu", torch.float32))
    assert field in str(caught.value)


def test_process_worker_refuses_a_reward_given_from_python(tmp_path):
    config = make_config(tmp_path, "reward.overlap=true", "reward.worker=process")
    with pytest.raises(ConfigError, match="reward.worker.*register it"):
        Trainer(config, model=OverlapFamily().build(config, "cpu", torch.float32), reward=image_mean)
