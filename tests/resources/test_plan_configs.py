"""`branchgrpo plan` on every shipped config: an estimate for the families the plan covers (no
weights: the architecture comes from the built-in hub configs), one clear line for the rest, and
the plan line in each covered config's header equal to what the command prints now."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from branchgrpo.cli import main
from branchgrpo.resources.families import PLAN_FAMILIES

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
COVERED = set(PLAN_FAMILIES)


def _family(name: str) -> str:
    return re.search(r"^\s+family:\s*(\S+)", (ROOT / "configs" / name).read_text(), re.M).group(1)


@pytest.mark.parametrize("name", CONFIGS)
def test_plan_runs_for_every_config(name, capsys):
    text = (ROOT / "configs" / name).read_text()
    header = re.search(r"# Plan \(`branchgrpo plan --config (\S+) --processes (\d+)( --gpu-memory (\S+))?`\)"
                       r"(.*?)\n(?!#)", text, re.S)
    family = _family(name)
    if family not in COVERED:
        assert main(["plan", "--config", f"configs/{name}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"model.family={family}" in err[0]
        return
    assert header is not None, f"configs/{name} has no `# Plan (...)` line"
    args = ["plan", "--config", header.group(1), "--processes", header.group(2)]
    if header.group(4):
        args += ["--gpu-memory", header.group(4)]
    assert main(args) == 0
    out = capsys.readouterr().out
    peak = re.search(r"peak per process: ([0-9.]+) GiB", out).group(1)
    assert f"{peak} GiB" in header.group(5), (peak, header.group(5))
    if header.group(4):
        spare = re.search(r"fits, ([0-9.]+) GiB to spare", out).group(1)
        assert f"{spare} GiB to spare" in header.group(5)
