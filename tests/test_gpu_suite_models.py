"""The GPU suite (benchmarks/gpu/run_suite.py) on the other full-size architectures it measures,
``--model sd3.5-medium`` (Flow-GRPO's own job and BranchGRPO's tree on it) and ``--model
wan2.1-1.3b``, at ``--scale tiny`` on CPU: the same code as on the GPU, a 2-block model of each
architecture. FLOPs are checked against ``FlopCounterMode`` over the real phases (attention on the
math backend), to the FLOP; the jobs against their config files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import run_suite  # noqa: E402
import suite_measure  # noqa: E402

MODELS = ("sd3.5-medium", "wan2.1-1.3b")


@pytest.fixture(scope="module", params=MODELS)
def suite(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"gpu-suite-{request.param}")
    result = run_suite.main(["--scale", "tiny", "--model", request.param, "--out", str(out), "--check-flops",
                             "--options", "no-compile"])
    return request.param, result, out


def test_every_case_runs_and_its_flops_equal_the_flop_counter(suite):
    """Rollout: calls × rows per sample (2 under true CFG) × forward; update: the model FLOPs (with
    the KL term's reference forwards) + checkpointing's recomputation of both rows — equal to what
    FlopCounterMode sees, for LoRA, a partial fine-tune and Flow-GRPO's KL job alike."""
    model, result, out = suite
    data = json.loads((out / "results.json").read_text())
    assert data["model"] == model and data["skipped"] == [] and data["finished"]
    scale = run_suite.SCALES["tiny"](model)
    assert [c["case"] for c in data["cases"]] == [c.name for c in run_suite.all_cases(scale)]
    for case in data["cases"]:
        assert "error" not in case, case.get("error")
        assert case["rows_per_sample"] == 2  # both jobs guide with CFG > 1
        f, counted, row = case["flops"], case["flops_counted"], case["flops_per_row"]
        assert counted["rollout"] == f["rollout"] == case["nfe"]["rollout_calls"] * 2 * row["forward"]
        assert counted["update"] == f["update"] + f["update_recompute"] and f["update_recompute"] > 0
        assert case["nfe"]["rollout_calls"] == case["nfe"]["plan_rollout_calls"]
        assert case["nfe"]["training_forwards"] == case["nfe"]["plan_training_forwards"]
        assert 0.0 <= case["ratio_max_deviation_first_step"] < 1e-5  # float32 on CPU
        spec = run_suite.Case(case["preset"], case["resolution"], case["training"], case["preset"] == "flowgrpo")
        assert run_suite.predicted_seconds(spec, scale, scale.steps, rate=1.0) == counted["rollout"] + counted["update"]
        assert (case["plan_estimate"] is None) == (case["training"] == "blocks")
    md = (out / "results.md").read_text()
    assert data["title"] in md and data["config"]["job"] in md


def test_flowgrpo_case_is_the_job_as_written(suite):
    """On SD3.5 the ``flowgrpo`` case runs configs/sd35-medium-flowgrpo.yaml's own method: 24
    independent roots of 10 steps, the first 9 trained, two updates per iteration, with its KL term
    (a reference forward per training forward) — and the ``branchgrpo`` case the preset's tree on the
    same model, micro-batches and LoRA targets, without the file's Flow-GRPO method."""
    model, result, _ = suite
    if model != "sd3.5-medium":
        pytest.skip("the Flow-GRPO job is SD3.5's")
    flow, branch = result["cases"][0], result["cases"][1]
    assert flow["case"] == "flowgrpo-32-lora" and flow["kl_coef"] == 0.01 and branch["kl_coef"] == 0.0
    assert flow["nfe"]["rollout_calls"] == 24 * 10 and flow["nfe"]["training_forwards"] == 24 * 9
    assert flow["optimizer_steps"] == 2 and branch["optimizer_steps"] == 1
    assert branch["nfe"]["rollout_calls"] == 43  # the Dense tree (splits 0/3/6/9, K = 2) at 10 steps
    assert flow["trained_parameters"] == branch["trained_parameters"]  # the job's 8 LoRA targets, rank 4
    scale = run_suite.SCALES["tiny"]("sd3.5-medium")
    own = suite_measure.job_config(run_suite.Case("flowgrpo", 32, "lora", True), scale, 10)
    tree = suite_measure.job_config(run_suite.Case("branchgrpo", 32, "lora"), scale, 10)
    assert own.method.tree.roots_per_prompt == 24 and own.method.update.clip_range == 1e-4
    assert tree.method.tree.roots_per_prompt == 1 and tree.method.update.clip_range == 1e-3
    assert own.model.lora.target_modules == tree.model.lora.target_modules and len(own.model.lora.target_modules) == 8
    assert own.model.options == tree.model.options and own.data.prompts_per_process == 1


def test_trained_parameters_are_the_jobs_lora_targets_or_the_named_blocks(suite):
    from peft import LoraConfig, inject_adapter_in_model

    from branchgrpo.models.lora import default_target_modules

    model, result, _ = suite
    scale = run_suite.SCALES["tiny"](model)
    cls = run_suite.MODELS[model].transformer_class
    import diffusers

    base = getattr(diffusers, cls)(**scale.config)
    blocks = sum(p.numel() for b in scale.blocks for p in base.get_submodule(b).parameters())
    inject_adapter_in_model(LoraConfig(r=scale.lora_rank, target_modules=default_target_modules(base)), base)
    lora = sum(p.numel() for n, p in base.named_parameters() if "lora_" in n)
    assert {c["training"]: c["trained_parameters"] for c in result["cases"]} == {"lora": lora, "blocks": blocks}


@pytest.mark.parametrize("model", ["flux-dev", *MODELS])
def test_random_weights_keep_the_computed_buffers(model):
    """Parameters are made on the meta device and materialised on the target; buffers that the
    constructor computes (SD3's sin-cos position table, Wan's rotary tables) keep their values —
    ``to_empty`` alone would leave them uninitialised."""
    import diffusers

    scale = run_suite.SCALES["tiny"](model)
    cls = run_suite.MODELS[model].transformer_class
    built = dict(run_suite.build_transformer(scale.config, "cpu", torch.float32, 0, cls).named_buffers())
    reference = dict(getattr(diffusers, cls)(**scale.config).named_buffers())
    assert built.keys() == reference.keys()
    assert all(torch.equal(built[k], reference[k]) for k in reference)
    if model != "flux-dev":
        assert reference  # the check has something to compare


def test_full_scale_jobs_have_the_real_geometry():
    """At full size (no model is built): SD3.5-medium at 512² reads 1,024 image and 77 + 128 text
    tokens per row; Wan2.1-1.3B at 480 × 832 × 33 frames 9 × 30 × 52 = 14,040 video tokens and 512
    text tokens; both with CFG (2 rows) and plan estimates under 80 GB."""
    from branchgrpo.resources.families import plan_family

    for model, size, image, text in (("sd3.5-medium", 512, 1024, 205), ("wan2.1-1.3b", 480, 14040, 512)):
        scale = run_suite.SCALES["full"](model)
        case = run_suite.Case("branchgrpo", size, "lora")
        config = suite_measure.job_config(case, scale, scale.steps)
        entry = plan_family(config.model.family, config.model.options)
        tokens = entry.tokens(entry.architecture(scale.config), config.model.options)
        assert (tokens.image, tokens.text) == (image, text) and entry.rows_per_sample(config.model.options) == 2
        assert run_suite.plan_estimate(case, scale, scale.steps)["peak_bytes"] < 80e9


def test_an_unknown_model_ends_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_suite.main(["--scale", "tiny", "--model", "sdxl", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--model: invalid choice: 'sdxl'" in capsys.readouterr().err.strip().splitlines()[-1]
