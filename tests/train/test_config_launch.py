"""Every shipped config starts: it fits the process count its header launches it with, and it trains
its first iteration on two gloo processes on CPU.

``test_header_launch_fits_the_data_settings`` (no model): each config's header names its launch,
``torchrun --nproc-per-node N -m branchgrpo train ...`` (or ``branchgrpo train ...``: one process); the
trainer's own start-up check (``DataConfig.check_processes``) accepts that N.

``test_every_config_reaches_its_first_iteration_on_two_processes``: every config of configs/ runs
``branchgrpo train --config FILE key=value ...`` under ``torchrun --nproc-per-node 2`` (one torchrun job
trains them one after another, tests/train/launch_configs.py), against stand-ins written where the
config looks (tests/train/standins.py): diffusers folders laid out as the real downloads with tiny
random weights of the real architectures, prompt files, edit rows with their source images. Configs
whose header runs ``branchgrpo preprocess`` first get it here too, so training reads the prompt cache.
The overrides are ones a user could type (standins.tiny_overrides): tiny sizes, a 3-step tree, one
prompt per process, one held-out sample, one iteration with a checkpoint, and — the configs' rewards
need checkpoints or servers that are not here — a checkpoint-free stand-in reward (mean brightness)
registered by tests/train/standin_rewards.py, named in ``imports``. Everything else is the config's
own: preset and method settings, run.parallel (FSDP or DDP), LoRA, gradient checkpointing, dtype
(``auto``: float32 on CPU), paths.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # standins, standin_rewards (the configs' imports)

from standins import CONFIGS, REPO, header_launch, tiny_overrides, write_standins  # noqa: E402

from branchgrpo.config import ConfigError, to_dict  # noqa: E402
from branchgrpo.train.config import DataConfig, load_train_config  # noqa: E402

LAUNCHER = Path(__file__).resolve().parent / "launch_configs.py"
# What the launch keeps of each config (dotted keys into the resolved config), checked in the run's config.yaml.
KEPT = ("preset", "model.family", "model.path", "model.dtype", "model.lora", "model.gradient_checkpointing",
        "model.prompt_cache_dir", "data.train_prompts", "data.heldout_prompts", "run.parallel", "run.output_dir",
        "method.update", "method.advantage", "method.selection", "method.tree.eta", "method.tree.shift",
        "method.tree.transition", "method.tree.split_noise", "method.tree.logprob_reduction")


def lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


# -- the header's launch command --------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_header_launch_fits_the_data_settings(path):
    processes = header_launch(path).processes
    data = load_train_config(path).data
    data.check_processes(processes)  # the trainer's start-up check, for the header's process count
    per_process = data.prompts_per_process or data.prompts_per_iteration / processes
    assert per_process >= 1 and per_process == int(per_process), (processes, data)


def test_process_check_refuses_uneven_shares_and_names_the_field():
    DataConfig(prompts_per_iteration=8).check_processes(8)
    DataConfig(prompts_per_iteration=1, prompts_per_process=1).check_processes(8)  # per process wins
    with pytest.raises(ConfigError, match=r"data.prompts_per_iteration.*1 prompts cannot be shared evenly by 8 "
                                          r"processes; set data.prompts_per_iteration=8 or data.prompts_per_process=1"):
        DataConfig(prompts_per_iteration=1).check_processes(8)


def test_header_launch_reads_torchrun_and_plain_commands(tmp_path):
    file = tmp_path / "job.yaml"
    file.write_text("# notes\n#   branchgrpo preprocess --config job.yaml\n"
                    "#   torchrun --nproc-per-node 4 -m branchgrpo train --config job.yaml\npreset: branchgrpo\n")
    assert (header_launch(file).processes, header_launch(file).preprocess) == (4, True)
    file.write_text("# run it: branchgrpo train --config job.yaml\npreset: branchgrpo\n# torchrun --nproc-per-node 8\n")
    assert (header_launch(file).processes, header_launch(file).preprocess) == (1, False)
    file.write_text("preset: branchgrpo\n")
    with pytest.raises(ValueError, match="names no `branchgrpo train` command"):
        header_launch(file)


# -- the stand-ins and the launch -------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _standin_rewards_registered_here_only():
    """The configs' ``imports`` register the stand-in rewards in this process too (preprocess, build);
    they leave the registry with this module."""
    yield
    import standin_rewards

    standin_rewards.unregister()


@pytest.fixture(scope="module")
def standin_root(tmp_path_factory):
    """A folder standing for the repository: every model folder and prompt file the configs name."""
    root = tmp_path_factory.mktemp("configs")
    write_standins(root)
    return root


def test_lora_with_gradient_checkpointing_recomputes_the_transformer(standin_root, monkeypatch):
    """configs/flux2-dev-branchgrpo.yaml trains LoRA with gradient checkpointing: the checkpointing goes
    to the transformer under the LoRA view (build_policy refused the combination before)."""
    from branchgrpo.train.components import build_policy

    monkeypatch.chdir(standin_root)
    path = REPO / "configs" / "flux2-dev-branchgrpo.yaml"
    config = load_train_config(path, None, tiny_overrides(path))
    assert config.model.lora is not None and config.model.gradient_checkpointing
    bundle = build_policy(config, torch.device("cpu"))
    transformer = bundle.trainable.transformer
    assert transformer.is_gradient_checkpointing and bundle.policy.transformer is transformer
    trained = [name for name, p in bundle.trainable.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)


@pytest.fixture(scope="module")
def launched(standin_root):
    """``branchgrpo preprocess`` where the header runs it, then every config trained for one iteration
    in one ``torchrun --nproc-per-node 2`` job; returns the job's result and each config's overrides."""
    from branchgrpo.cli import main

    jobs = [{"config": str(path), "overrides": tiny_overrides(path)} for path in CONFIGS]
    here = os.getcwd()
    os.chdir(standin_root)  # the configs' paths are relative to the repository root
    try:
        for path, job in zip(CONFIGS, jobs):
            if header_launch(path).preprocess:
                assert main(["preprocess", "--config", str(path), *job["overrides"]]) == 0, path.name
    finally:
        os.chdir(here)
    (standin_root / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(LAUNCHER.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(LAUNCHER),
         "jobs.json"], cwd=standin_root, env=env, capture_output=True, text=True, timeout=900)
    return dict(root=standin_root, result=result, jobs=dict(zip(CONFIGS, jobs)))


def test_every_config_reaches_its_first_iteration_on_two_processes(launched):
    result, root = launched["result"], launched["root"]
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    for path in CONFIGS:
        shipped = load_train_config(path)
        run = root / shipped.run.output_dir
        assert f"launch_configs: {path.name}: exit 0" in result.stdout, path.name
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (train,) = [row for row in rows if "reward_mean" in row]
        assert train["iteration"] == 0 and train["processes"] == 2, (path.name, train)
        assert train["optimizer_steps"] >= 1 and train["nfe/trained_edges"] > 0, (path.name, train)
        assert "nonfinite_keys" not in train and math.isfinite(train["loss"]), (path.name, train)
        assert train["ratio_max_deviation_first_step"] < 1e-4, path.name  # the rollout policy is the trained one (docs/method.md §8)
        assert (run / "checkpoints" / "iter_000001" / "COMPLETE").is_file(), path.name
        assert (run / "weights" / "model.safetensors").is_file(), path.name
        recorded = yaml.safe_load((run / "config.yaml").read_text())
        for key in KEPT:  # the config ran as shipped but for the tiny overrides
            assert lookup(recorded, key) == lookup(to_dict(shipped), key), (path.name, key)
        expected_reward = shipped.reward.name if shipped.reward.name == "digits" else "standin_"
        assert recorded["reward"]["name"].startswith(expected_reward), path.name
