"""`branchgrpo plan`: the numbers docs/method.md §10 states, JSON keys, and errors without tracebacks."""

import json
import subprocess
import sys

import pytest

from branchgrpo.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "branchgrpo.cli", *args], capture_output=True, text=True, timeout=120
    )


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "preset, calls, edges, trained",
    [
        ("branchgrpo", 203, 218, 218),
        ("branchgrpo-widpru", 203, 218, 138),
        ("branchgrpo-deppru", 203, 218, 138),
        ("dancegrpo", 305, 320, 320),
        ("dancegrpo-tf0.6", 305, 320, 192),
        ("dancegrpo-indep", 320, 320, 320),
    ],
)
def test_plan_numbers(capsys, preset, calls, edges, trained):
    out = plan_json(capsys, "--preset", preset)
    for key in ("leaves", "rollout_calls", "edges", "trained_edges", "training_forwards", "per_leaf"):
        assert key in out
    assert (out["rollout_calls"], out["edges"], out["trained_edges"]) == (calls, edges, trained)
    assert out["leaves"] == 16
    assert out["per_leaf"]["rollout_calls"] == pytest.approx(calls / 16)
    assert out["per_leaf"]["trained_edges"] == pytest.approx(trained / 16)


def test_plan_iteration_moves_windows(capsys):
    first = plan_json(capsys, "--preset", "branchgrpo-mix", "iteration=0")
    later = plan_json(capsys, "--preset", "branchgrpo-mix", "iteration=250")
    # window steps 0-3 at iteration 0 (splits 0,3,6,9 always SDE): 2+2+2+4 + 8 + 16
    assert first["trained_edges"] == 34
    assert first["sde_steps"] == [0, 1, 2, 3, 6, 9]
    # iteration 250: window advanced 10 steps -> steps 10..13 plus the split steps
    assert later["sde_steps"] == [0, 3, 6, 9, 10, 11, 12, 13]
    assert later["trained_edges"] == 2 + 4 + 8 + 16 + 4 * 16


def test_plan_text_output(capsys):
    assert main(["plan", "--preset", "branchgrpo"]) == 0
    text = capsys.readouterr().out
    assert "rollout calls" in text and "203" in text and "218" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "--preset", "nope"], "unknown preset 'nope'"),
        (["plan", "split_plan=0:2,25:2"], "tree.split_plan"),
        (["plan", "tree.nope=1"], "unknown key"),
        (["plan", "iteration=-3"], "iteration"),
        (["plan", "eta=high"], "tree.eta"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
