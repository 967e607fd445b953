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


def test_variants_choose_their_architecture_and_families_their_lora_targets():
    """wan22's ``model.options.variant`` picks the architecture and hub config (T2V-A14B: both
    experts held; TI2V-5B: one transformer, 48 latent channels); an unset ``model.lora.target_modules``
    means the family's targets, as in training (for Wan, FLUX's names would match nothing)."""
    from branchgrpo.models.lora import WAN_TARGET_MODULES
    from branchgrpo.resources import estimate_job, lora_parameter_count, transformer_config
    from branchgrpo.resources.core import Training
    from branchgrpo.resources.wan import WAN22_T2V_A14B_EXPERT, WAN22_TI2V_5B, WanExpertsArchitecture
    from branchgrpo.train.config import load_train_config

    def job(name, *overrides):
        config = load_train_config(str(ROOT / "configs" / name), None, ["model.path=/nonexistent", *overrides])
        arch_config, _ = transformer_config(config.model.family, config.model.path, config.model.options)
        return config, arch_config, estimate_job(config, arch_config)

    _, a14b_config, a14b = job("wan22-a14b-branchgrpo.yaml")
    _, ti2v_config, ti2v = job("wan22-ti2v-5b-branchgrpo.yaml")
    assert a14b_config == WAN22_T2V_A14B_EXPERT and ti2v_config == WAN22_TI2V_5B
    experts = WanExpertsArchitecture(dict(WAN22_T2V_A14B_EXPERT))
    rank = a14b.lora_rank
    assert rank and a14b.trained_parameters == lora_parameter_count(
        experts, Training(rank, tuple(WAN_TARGET_MODULES))) > 0
    assert a14b.parameters == 28_576_983_168
    assert ti2v.tokens.image == 13 * 22 * 40 and ti2v.trained_parameters > 0
    with pytest.raises(ValueError, match="model.options.variant"):
        from branchgrpo.resources.families import plan_family

        plan_family("wan22", {"variant": "i2v-a14b"})
