"""What a run sees under ``accelerate launch``, from the environment accelerate itself prepares (its own
launcher functions, called in-process: no process is started).

- ``accelerate launch --multi_gpu --num_processes 2`` hands the job to torchrun's launcher, whose
  workers get RANK/WORLD_SIZE/LOCAL_RANK: the run joins a 2-process group and records 2 processes.
- ``accelerate launch --num_processes 2`` without ``--multi_gpu`` on a machine with fewer than 2 GPUs
  runs accelerate's *simple* launcher: one process, MASTER_ADDR set, no WORLD_SIZE. That one process
  is all there is, so ``processes: 1`` is true — the run now says so on stderr instead of silently.
"""

from __future__ import annotations

import os

import pytest
import torch

from branchgrpo.train import distributed
from branchgrpo.train.distributed import DistributedContext, accelerate_started_one_of_many, launched_distributed

pytest.importorskip("accelerate")

LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID")
# What torchrun's agent adds for worker 1 of 2 (printed by a script under
# `accelerate launch --multi_gpu --num_processes 2`, accelerate 1.15 / torch 2.14).
TORCHRUN_WORKER_1 = {"RANK": "1", "GROUP_RANK": "0", "ROLE_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none",
                     "LOCAL_RANK": "1"}


def accelerate_env(argv: list[str]) -> tuple[bool, dict[str, str]]:
    """``(multi_gpu, environment)`` accelerate 1.x prepares for ``accelerate launch ARGV``."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = _validate_launch_command(launch_command_parser().parse_args(argv))[0]
    if args.multi_gpu:
        return True, prepare_multi_gpu_env(args)
    return False, prepare_simple_launcher_cmd_env(args)[1]


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key in LAUNCH_KEYS or key.startswith("ACCELERATE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def use_env(monkeypatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        if key in LAUNCH_KEYS or key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)


def test_accelerate_multi_gpu_workers_join_a_two_process_group(clean_env, capsys):
    multi_gpu, env = accelerate_env(["--multi_gpu", "--num_processes", "2", "-m", "branchgrpo", "train"])
    assert multi_gpu and "WORLD_SIZE" not in env  # accelerate leaves RANK/WORLD_SIZE to torchrun's workers
    use_env(clean_env, {**env, **TORCHRUN_WORKER_1})
    joined = []
    clean_env.setattr(distributed.dist, "is_initialized", lambda: False)
    clean_env.setattr(distributed.dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    assert launched_distributed() and not accelerate_started_one_of_many()
    context = DistributedContext.initialise(torch.device("cpu"))
    assert (context.rank, context.world_size, context.local_rank) == (1, 2, 1)  # Trainer records world_size
    assert joined and joined[0]["backend"] == "gloo"
    assert "warning" not in capsys.readouterr().err


def test_accelerate_simple_launcher_runs_one_process_and_says_so(clean_env, capsys):
    multi_gpu, env = accelerate_env(["--num_processes", "2", "-m", "branchgrpo", "train"])
    if multi_gpu:
        pytest.skip("accelerate chose --multi_gpu itself: this machine has 2+ GPUs")
    assert "MASTER_ADDR" in env and "WORLD_SIZE" not in env
    use_env(clean_env, env)
    context = DistributedContext.initialise(torch.device("cpu"))
    assert context.world_size == 1 and not launched_distributed()
    err = capsys.readouterr().err
    assert "accelerate launch started 1 process" in err and "--multi_gpu" in err


def test_a_plain_single_process_accelerate_launch_is_quiet(clean_env, capsys):
    multi_gpu, env = accelerate_env(["-m", "branchgrpo", "train"])
    if multi_gpu:
        pytest.skip("accelerate chose --multi_gpu itself: this machine has 2+ GPUs")
    use_env(clean_env, env)
    assert DistributedContext.initialise(torch.device("cpu")).world_size == 1
    assert capsys.readouterr().err == ""
