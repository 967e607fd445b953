"""`branchgrpo train|sample|eval` end to end on the digits world, and their one-line errors."""

import json
import os
import subprocess
import sys

import pytest

FAST = ["run.iterations=2", "data.prompts_per_iteration=1", "eval.samples_per_prompt=1", "eval.max_prompts=4",
        "tree.steps=8", "split_plan=0:2,3:2", "run.progress=false", "run.device=cpu", "run.checkpoint_every=1",
        "run.dump_tree_every=1"]


def cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "branchgrpo", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_train_two_iterations_then_sample_and_eval(tmp_path):
    run = tmp_path / "run"
    result = cli("train", f"run.output_dir={run}", *FAST)
    assert result.returncode == 0, result.stderr
    assert "held-out mean reward" in result.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "reward_mean" in r] == [0, 1]
    assert (run / "weights" / "model.safetensors").is_file()
    assert (run / "trees" / "iter_000001.safetensors").is_file()
    assert (run / "checkpoints" / "iter_000002" / "COMPLETE").is_file()
    assert any((run / "tensorboard").iterdir())

    out = tmp_path / "sevens.png"
    result = cli("sample", "--run", str(run), "--prompt", "a handwritten 7", "--num", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.is_file() and out.stat().st_size > 100

    result = cli("eval", "--run", str(run), "--samples", "1", "--json", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= scores["mean"]["reward"] <= 1.0
    assert "mean" in result.stdout

    result = cli("export", str(run), str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    exported = FluxTransformer2DModel.from_pretrained(tmp_path / "export").state_dict()
    trained = load_file(str(run / "weights" / "model.safetensors"))
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "run.iteratons=3"], "did you mean run.iterations"),
        (["train", "run.iterations=many"], "run.iterations"),
        (["train", "model.path=/no/such/weights.safetensors"], "model.path"),
        (["train", "reward.name=hps", "reward.checkpoint=/no/such/hps.pt"], "/no/such/hps.pt"),
        (["train", "model.family=flux", "reward.name=clip", "reward.checkpoint=.", "model.path=/no/such/flux"],
         "/no/such/flux does not exist"),
        (["train", "--config", "/no/such/config.yaml"], "does not exist"),
        (["eval", "--run", "/no/such/run"], "not a run directory"),
    ],
)
def test_train_errors_are_one_clear_line(args, message):
    result = cli(*args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_empty_prompt_file_is_refused(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n# only a comment\n\n")
    result = cli("train", f"data.train_prompts={empty}", *FAST, timeout=120)
    assert result.returncode == 2
    assert "holds no prompts" in result.stderr and "Traceback" not in result.stderr
