"""docs/api.md's examples run as written (one namespace, in order, in a temporary folder), and a run
started from Python can be evaluated by the CLI — or is refused in one line when it cannot be."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_api_example_runs(in_tmp, capsys):
    from branchgrpo.families.registry import _FAMILIES
    from branchgrpo.rewards.registry import _META, _REGISTRY

    blocks = python_blocks((ROOT / "docs/api.md").read_text())
    assert len(blocks) >= 4
    namespace = {"__name__": "api_examples"}
    try:
        for block in blocks:
            exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - our own documentation
    finally:
        _REGISTRY.pop("ink", None), _META.pop("ink", None), _FAMILIES.pop("sevens", None)
    out = capsys.readouterr().out
    assert "0.0005" in out and "held-out reward" in out
    assert "{'phrasing': 'the number {}'}" in out
    assert "203 138 131" in out  # the plan example's stated numbers
    for run in ("api-demo", "api-ink", "api-sevens"):
        assert (in_tmp / "runs" / run / "weights" / "model.safetensors").is_file()
    assert "name: ink" in (in_tmp / "runs/api-ink/config.yaml").read_text()
    assert "family: sevens" in (in_tmp / "runs/api-sevens/config.yaml").read_text()


PLUGIN = textwrap.dedent('''
    from branchgrpo import Reward, register_reward

    class Ink(Reward):
        name = "ink"
        input_channels = 1

        def _score(self, images, prompts):
            return 1.0 - images.flatten(1).mean(dim=1)

    register_reward("ink", Ink, "1 - mean brightness")
''')

TRAIN = textwrap.dedent('''
    import sys
    {register}
    from branchgrpo import Trainer, load_config
    config = load_config(overrides=["reward.name=ink", "run.iterations=1", "run.output_dir={run}",
        "method.tree.steps=4", "method.tree.split_plan={{0: 2}}", "data.prompts_per_iteration=1",
        "eval.max_prompts=1", "eval.samples_per_prompt=1", "run.progress=false", "run.tensorboard=false",
        "run.threads=1", "run.device=cpu", "eval.every=0"])
    Trainer(config).run()
''')


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def branchgrpo(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "branchgrpo", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_python_run_records_its_plugins_so_eval_finds_them(tmp_path):
    (tmp_path / "ink_plugin.py").write_text(PLUGIN)
    trained = run_python(TRAIN.format(register="import ink_plugin", run=tmp_path / "run"), tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    config_text = (tmp_path / "run" / "config.yaml").read_text()
    assert "imports:\n- ink_plugin" in config_text and "name: ink" in config_text
    result = branchgrpo(["eval", "--run", str(tmp_path / "run"), "--samples", "1", "eval.max_prompts=1"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mean" in result.stdout


def test_a_reward_registered_in_a_script_makes_eval_say_why_in_one_line(tmp_path):
    trained = run_python(TRAIN.format(register=PLUGIN, run=tmp_path / "run"), tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "imports: []" in (tmp_path / "run" / "config.yaml").read_text()  # __main__ cannot be imported
    result = branchgrpo(["eval", "--run", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown reward 'ink'" in lines[0] and "register_reward" in lines[0]
    assert "Traceback" not in result.stderr
