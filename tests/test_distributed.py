"""Two gloo processes vs one process with the same global batch; NaN on one rank; sharding."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_trainer import brightness_reward, tiny_generator

from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import Trainer

COMMON = [
    "run.progress=false", "run.tensorboard=false", "run.dump_tree_every=0", "run.device=cpu",
    "data.prompts_per_iteration=2", "eval.samples_per_prompt=1", "eval.every=0", "tree.steps=5",
    "split_plan=0:2,2:2", "run.checkpoint_every=0", "update.learning_rate=1e-3", "update.clip_range=0.2",
    "run.iterations=3", "update.updates_per_iteration=1",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make(out, *overrides):
    config = load_train_config(None, "branchgrpo", [f"run.output_dir={out}", *COMMON, *overrides])
    return Trainer(config, model=tiny_generator(), reward=brightness_reward)


def _worker(rank, world, port, out, inject, overrides, factory):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    job = factory(out, *overrides[rank])
    if inject == "nan_output" and rank == 1:
        forward = job.model.policy.forward
        calls = {"n": 0}

        def poisoned(latents, sigmas, conditioning):
            out_ = forward(latents, sigmas, conditioning)
            if torch.is_grad_enabled():  # a training forward, not the rollout
                calls["n"] += 1
                if calls["n"] == 2:
                    return out_ * float("nan")
            return out_

        job.model.policy.forward = poisoned
    if inject == "nan_grad" and rank == 1:
        first = next(job.model.trainable.parameters())
        first.register_hook(lambda g: g * float("nan"))
    job.run()
    job.dist.close()


def run_two(out, inject=None, overrides=(), rank_overrides=None, factory=make):
    """Train in two forked gloo processes; ``rank_overrides[r]`` are extra overrides of rank ``r`` only;
    ``factory(out, *overrides)`` builds each rank's trainer."""
    per_rank = [list(overrides) + list((rank_overrides or {}).get(rank, [])) for rank in range(2)]
    mp.start_processes(_worker, args=(2, free_port(), out, inject, per_rank, factory), nprocs=2, join=True,
                       start_method="fork")


def rows(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "reward_mean" in r]


def test_two_processes_equal_one_process(tmp_path):
    make(tmp_path / "one").run()
    run_two(tmp_path / "two")
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["processes"] for r in two] == [2, 2, 2]
    for a, b in zip(one, two):
        for key in ("reward_mean", "reward_std", "reward_min", "reward_max"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        assert b["nfe/trained_edges"] == pytest.approx(a["nfe/trained_edges"])
    wa = load_file(str(tmp_path / "one" / "weights" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "weights" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-6)


def test_nan_micro_batch_on_one_rank_is_skipped_and_counted(tmp_path):
    run_two(tmp_path, "nan_output")
    data = rows(tmp_path)
    assert len(data) == 3  # the job finished
    assert sum(r["nonfinite_micro_batches"] for r in data) > 0


def test_nan_gradient_on_one_rank_makes_every_rank_skip_the_step(tmp_path):
    run_two(tmp_path, "nan_grad")
    data = rows(tmp_path)
    assert len(data) == 3
    assert all(r["optimizer_steps"] == 0 for r in data)
    weights = load_file(str(tmp_path / "weights" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_prompts_must_divide_among_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    from branchgrpo.config import ConfigError
    from branchgrpo.train.distributed import DistributedContext

    monkeypatch.setattr(DistributedContext, "initialise", classmethod(lambda cls, device, **kw: cls(0, 3, 0)))
    with pytest.raises(ConfigError, match="data.prompts_per_iteration"):
        make(tmp_path)


def test_per_group_generators_make_a_prompts_tree_independent_of_its_batch():
    from policies import TinyMLPPolicy, tiny_conditioning

    from branchgrpo.tree.presets import method_config
    from branchgrpo.tree.rollout import rollout

    spec = method_config("branchgrpo", ["tree.steps=6", "split_plan=0:2,3:3"]).tree
    model, cond = TinyMLPPolicy(), tiny_conditioning(3)

    def gens(ids):
        return [torch.Generator().manual_seed(100 + i) for i in ids]

    both = rollout(model, cond, spec, 3, (8,), generator=gens([0, 1, 2]))
    alone = rollout(model, {"prompt": cond["prompt"][2:3]}, spec, 1, (8,), generator=gens([2]))
    for d in range(spec.steps + 1):
        rows = both.group[d] == 2
        torch.testing.assert_close(both.latents[d][rows], alone.latents[d], rtol=0, atol=1e-6)
        torch.testing.assert_close(both.logp[d][rows], alone.logp[d], rtol=0, atol=1e-6)
