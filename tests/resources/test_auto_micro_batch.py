"""engine.*_micro_batch=auto: the pure choice (closed form), the field's validation, and the
resolution against the plan's own estimate at the chosen and the next power of two."""

from __future__ import annotations

import math

import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.resources import HUB_CONFIGS, estimate_job
from branchgrpo.resources.auto import SAFETY, choose_micro_batch, resolve_micro_batches
from branchgrpo.tree.spec import EngineSpec


def _job(*overrides: str, config: str = "configs/flux-dev-hps.yaml"):
    from branchgrpo.train.config import load_train_config

    return load_train_config(config, None, list(overrides))


@pytest.mark.parametrize("free,fixed,per_row,limit", [
    (80e9, 10e9, 1e9, 1024), (80e9, 10e9, 1e9, 20), (80e9, 70e9, 1e9, 64), (1e9, 5e9, 1e8, 64),
    (100, 0, 10, 3), (100, 0, 1000, 8), (2 ** 40, 0, 1, 1), (2 ** 40, 0, 7, 0),
])
def test_choose_micro_batch_closed_form(free, fixed, per_row, limit):
    """2^floor(log2(min(limit, (safety·free − fixed)/per_row))), at least 1."""
    rows = min(limit, (SAFETY * free - fixed) / per_row)
    expected = 2 ** math.floor(math.log2(rows)) if rows >= 1 else 1
    assert choose_micro_batch(int(free), int(fixed), int(per_row), limit) == expected


def test_choose_micro_batch_refuses_a_zero_row_cost():
    with pytest.raises(ValueError, match="per_row_bytes"):
        choose_micro_batch(10, 0, 0, 4)


def test_engine_fields_accept_auto_and_name_the_field():
    assert EngineSpec("auto", "auto").train_micro_batch == "auto"
    for bad in (0, -3, True, "big", 2.5):
        with pytest.raises(ConfigError, match="engine.train_micro_batch"):
            EngineSpec(train_micro_batch=bad)
    job = _job("method.engine.train_micro_batch=auto", "method.engine.rollout_micro_batch=8")
    assert (job.method.engine.train_micro_batch, job.method.engine.rollout_micro_batch) == ("auto", 8)
    with pytest.raises(ConfigError, match="train_micro_batch"):
        _job("method.engine.train_micro_batch=many")


def test_auto_on_cpu_keeps_the_defaults():
    job = _job("method.engine.train_micro_batch=auto", "method.engine.rollout_micro_batch=auto")
    assert resolve_micro_batches(job, torch.device("cpu")) == {"rollout_micro_batch": 64, "train_micro_batch": 16}
    assert (job.method.engine.rollout_micro_batch, job.method.engine.train_micro_batch) == (64, 16)
    fixed = _job("method.engine.train_micro_batch=4")
    assert resolve_micro_batches(fixed, torch.device("cpu")) == {} and fixed.method.engine.train_micro_batch == 4


@pytest.mark.parametrize("free_gib", [40, 80, 140])
def test_auto_on_cuda_is_the_largest_power_of_two_the_plan_fits(monkeypatch, capsys, free_gib):
    """With mem_get_info faked: at the chosen b, the plan's phase peak minus the resident weights
    fits SAFETY × free; at 2b it does not (or 2b exceeds the rows of an iteration)."""
    free = free_gib * 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    overrides = ("model.lora.rank=32", "model.gradient_checkpointing=true")
    job = _job(*overrides, "method.engine.train_micro_batch=auto", "method.engine.rollout_micro_batch=auto")
    chosen = resolve_micro_batches(job, torch.device("cuda"))
    assert "engine.train_micro_batch=auto ->" in capsys.readouterr().out

    def working_set(phase: str, rows: int) -> int:
        e = estimate_job(_job(*overrides, f"method.engine.train_micro_batch={rows}",
                              f"method.engine.rollout_micro_batch={rows}"), HUB_CONFIGS["flux-dev"])
        return e.phase_peak(phase) - sum(r.device for r in e.persistent[:2]), e.forwards

    for name, phase, rows_key in (("train_micro_batch", "update", "training"),
                                  ("rollout_micro_batch", "rollout", "rollout")):
        b = chosen[name]
        assert b & (b - 1) == 0 and getattr(job.method.engine, name) == b
        used, forwards = working_set(phase, b)
        assert b == 1 or used <= SAFETY * free
        bigger, _ = working_set(phase, 2 * b)
        assert bigger > SAFETY * free or 2 * b > forwards[rows_key]


def test_plan_counts_auto_as_one_and_says_so():
    e = estimate_job(_job("method.engine.train_micro_batch=auto"), HUB_CONFIGS["flux-dev"])
    assert e.micro_batches["training"] == 1 and any("train_micro_batch=auto" in n for n in e.notes)


def _rank(rank: int, store_path: str, results: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    free = (40, 80)[rank] * 2 ** 30  # rank 0 has less free memory: both must take its choice
    torch.cuda.mem_get_info = lambda device=None: (free, 2 * free)
    job = _job("model.lora.rank=32", "model.gradient_checkpointing=true", "method.engine.train_micro_batch=auto")
    import branchgrpo.resources.auto as auto

    values = auto.resolve_micro_batches(job, torch.device("cuda"))
    results[rank] = values["train_micro_batch"]
    dist.destroy_process_group()


def test_auto_is_the_minimum_over_ranks(tmp_path, monkeypatch):
    """Two gloo ranks with 40 and 80 GiB free both take the 40 GiB rank's choice."""
    import torch.multiprocessing as mp

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2 ** 30, 0))
    alone = resolve_micro_batches(_job("model.lora.rank=32", "model.gradient_checkpointing=true",
                                       "method.engine.train_micro_batch=auto"), torch.device("cuda"))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "store"), results), nprocs=2)
        assert dict(results) == {0: alone["train_micro_batch"], 1: alone["train_micro_batch"]}
    assert alone["train_micro_batch"] < 32  # 80 GiB alone would choose more (test above)
