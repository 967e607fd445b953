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


def test_kontext_rows_carry_the_source_tokens_and_true_cfg_doubles_them():
    """FLUX.1 Kontext: a row is the generated tokens plus as many source tokens ((H/16)·(W/16)
    each); ``true_cfg_scale > 1`` runs ``[negative; positive]`` in every call, so every forward
    count doubles and so does the working set of a micro-batch (here: FLUX.1-dev's fixed
    architecture, so the only differences are the rows)."""
    from branchgrpo.resources import HUB_CONFIGS, estimate_job
    from branchgrpo.train.config import load_train_config

    path = str(ROOT / "configs" / "flux-kontext-branchgrpo.yaml")
    plain = estimate_job(load_train_config(path, None, []), HUB_CONFIGS["flux-kontext-dev"])
    cfg = estimate_job(load_train_config(path, None, ["model.options.true_cfg_scale=3", "model.options.negative_prompt=blurry"]),
                       HUB_CONFIGS["flux-kontext-dev"])
    assert (plain.tokens.image, plain.tokens.text) == (2 * (1024 // 16) ** 2, 512)
    assert plain.forwards["rollout"] > 0 and cfg.forwards == {k: 2 * v for k, v in plain.forwards.items()}
    assert cfg.flops["rollout"] == 2 * plain.flops["rollout"]
    # the saved activations of a micro-batch of b samples are those of 2b rows (casts and RoPE once per call)
    from branchgrpo.resources import FluxArchitecture, Training

    train = Training(None, (), compute_bytes=2, cuda=True)
    trace = FluxArchitecture(HUB_CONFIGS["flux-kontext-dev"]).saved(plain.tokens, train, True)
    b = plain.micro_batches["training"]
    saved = {r.name: r.device for r in cfg.phases["update"]}[f"saved activations (micro-batch {b} × 2 CFG rows)"]
    assert saved == trace.bytes(2 * b, train) - trace.casts * 2
    assert "true classifier-free guidance" in " ".join(cfg.notes)
