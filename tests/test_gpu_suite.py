"""The GPU suite (benchmarks/gpu/run_suite.py) at ``--scale tiny`` on CPU, and the trainer's
throughput metrics (``throughput/*``, src/branchgrpo/train/metrics.py).

FLOP counts are checked against ``torch.utils.flop_counter.FlopCounterMode`` wrapped around the
real phases (attention on the math backend, so its matmuls are seen): tolerance zero, the
architecture count and the counter agree to the FLOP.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import run_suite  # noqa: E402

from branchgrpo.train import metrics as M  # noqa: E402

CASES = "branchgrpo-32-lora,branchgrpo-32-blocks"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    result = run_suite.main(["--scale", "tiny", "--out", str(out), "--check-flops", "--cases", CASES,
                             "--options", "no-compile"])
    return result, out


def test_result_files_hold_every_field(suite):
    result, out = suite
    data = json.loads((out / "results.json").read_text())
    assert data["scale"] == "tiny" and data["steps"] == 10 and data["skipped"] == []
    assert data["machine"]["device"] == "cpu" and data["machine"]["torch"] == torch.__version__
    assert data["command"].startswith("python benchmarks/gpu/run_suite.py --scale tiny")
    assert data["packages"]["diffusers"] and data["date"] and data["peak_tflops"] is None
    assert [c["case"] for c in data["cases"]] == CASES.split(",")
    for case in data["cases"]:
        assert set(case["seconds"]) >= {"rollout", "reward", "update"} and all(v > 0 for v in case["seconds"].values())
        assert set(case["peak_memory_bytes"]) == {"rollout", "reward", "update"}  # None on CPU
        assert case["mfu"] == {"rollout": None, "update": None}  # no known peak on a CPU
        for phase in ("rollout", "update"):
            assert case["tflops"][phase] == pytest.approx(case["flops"][phase] / case["seconds"][phase] / 1e12)
        assert case["nfe"]["rollout_calls"] == case["nfe"]["plan_rollout_calls"] == 43  # the Dense tree, 10 steps
        assert case["nfe"]["training_forwards"] == case["nfe"]["plan_training_forwards"]
        # float32 on CPU: rollout and training forwards agree to rounding, far inside the clip range
        assert 0.0 <= case["ratio_max_deviation_first_step"] < 1e-5 < case["clip_range"]
        assert case["optimizer_steps"] == 1 and case["skipped_steps"] == 0 and math.isfinite(case["grad_norm"])
    lora = data["cases"][0]
    assert lora["plan_estimate"]["peak_phase"] in {"rollout", "update", "optimizer step"}
    assert data["cases"][1]["plan_estimate"] is None  # plan does not model a partial fine-tune
    md = (out / "results.md").read_text()
    assert data["command"] in md and "| branchgrpo-32-blocks |" in md and "| branchgrpo-32-lora |" in md


def test_speed_options_time_each_attention_backend_and_micro_batch(suite):
    result, out = suite
    data = json.loads((out / "results.json").read_text())
    assert data["finished"] and data["speed_options"] == result["speed_options"]
    options = data["speed_options"]
    default = options["attention"]["default"]
    assert set(options["attention"]) == set(run_suite.ATTENTION_BACKENDS)
    assert default["rows"] == 4 and default["seconds"] > 0
    assert default["tflops"] == pytest.approx(4 * options["flops_per_row"] / default["seconds"] / 1e12)
    assert [int(k) for k in options["micro_batch"]] == [1, 2] and options["compile"] is None
    # the row FLOPs the rates use are what torch's FLOP counter sees in one forward at that size
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from branchgrpo.models.flux import FluxVelocity

    scale = run_suite.SCALES["tiny"]()
    latent = options["resolution"] // 8
    policy = FluxVelocity(run_suite.build_transformer(scale.config, "cpu", torch.float32, 0), latent, latent)
    tokens = options["tokens"]["image"]
    cond = {"prompt_embeds": torch.randn(1, scale.text_tokens, scale.config["joint_attention_dim"]),
            "pooled_prompt_embeds": torch.randn(1, scale.config["pooled_projection_dim"])}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        policy(torch.randn(1, tokens, scale.config["in_channels"]), torch.full((1,), 0.5), cond)
    assert options["flops_per_row"] == counter.get_total_flops()
    md = (out / "results.md").read_text()
    assert "| attention backend (4 rows) |" in md and "torch.compile of the blocks: not measured" in md


def test_architecture_flops_equal_the_flop_counter(suite):
    """Rollout: rows × forward; update: forwards × (forward + backward) + checkpointing's
    recomputation of every block — both equal FlopCounterMode's count over the real phase."""
    result, _ = suite
    for case in result["cases"]:
        flops, counted = case["flops"], case["flops_counted"]
        assert counted["rollout"] == flops["rollout"] == case["nfe"]["rollout_calls"] * case["flops_per_row"]["forward"]
        assert counted["update"] == flops["update"] + flops["update_recompute"]
        assert flops["update_recompute"] > 0  # gradient checkpointing is on


def test_checkpointing_off_and_a_training_micro_batch_change_only_what_they_should(suite, tmp_path):
    """``--checkpointing off --train-micro-batch 8`` (the update MFU experiment): the model does not
    checkpoint (the FLOP counter sees no recomputation), the update's model FLOPs and NFE equal the
    checkpointed run's, the skip rule predicts no recomputation, and plan's update phase needs more
    memory (activations kept) than with checkpointing at the same micro-batch."""
    on = suite[0]["cases"][0]
    result = run_suite.main(["--scale", "tiny", "--out", str(tmp_path), "--check-flops", "--cases", on["case"],
                             "--options", "none", "--checkpointing", "off", "--train-micro-batch", "8"])
    (off,) = result["cases"]
    assert "error" not in off, off.get("error")
    assert result["config"]["checkpointing"] is False and off["checkpointing"] is False and on["checkpointing"]
    assert off["micro_batches"] == {"rollout": 64, "train": 8} and on["micro_batches"] == {"rollout": 64, "train": 32}
    assert off["flops"]["update_recompute"] == 0 and off["flops_counted"]["update"] == off["flops"]["update"]
    assert off["flops"]["update"] == on["flops"]["update"] and off["nfe"] == on["nfe"]
    scale = run_suite.dataclasses.replace(run_suite.SCALES["tiny"](), checkpointing=False, train_micro_batch=8)
    spec = run_suite.Case(off["preset"], off["resolution"], off["training"])
    assert run_suite.predicted_seconds(spec, scale, 10, rate=1.0) == off["flops"]["rollout"] + off["flops"]["update"]
    assert off["plan_estimate"] == run_suite.plan_estimate(spec, scale, 10)
    checkpointed = run_suite.plan_estimate(spec, run_suite.dataclasses.replace(scale, checkpointing=True), 10)
    assert off["plan_estimate"]["phase_peak_bytes"]["update"] > checkpointed["phase_peak_bytes"]["update"]
    md = (tmp_path / "results.md").read_text()
    assert "gradient checkpointing off" in md and "| 64/8 |" in md


def test_trained_parameters_are_the_named_blocks_or_peft_adapters(suite):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from branchgrpo.models.lora import DEFAULT_TARGET_MODULES

    result, _ = suite
    scale = run_suite.SCALES["tiny"]()
    model = FluxTransformer2DModel(**scale.config)
    blocks = sum(p.numel() for b in scale.blocks for p in model.get_submodule(b).parameters())
    inject_adapter_in_model(LoraConfig(r=scale.lora_rank, target_modules=list(DEFAULT_TARGET_MODULES)), model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert {c["training"]: c["trained_parameters"] for c in result["cases"]} == {"lora": lora, "blocks": blocks}


def test_budget_prediction_counts_the_same_flops(suite):
    """The skip rule's FLOPs (plan's counts × the architecture, before the case runs) equal
    what the case then did (rollout + update + recomputation)."""
    result, _ = suite
    scale = run_suite.SCALES["tiny"]()
    for case in result["cases"]:
        spec = run_suite.Case(case["preset"], case["resolution"], case["training"])
        f = case["flops"]
        predicted = run_suite.predicted_seconds(spec, scale, 10, rate=1.0)
        assert predicted == f["rollout"] + f["update"] + f["update_recompute"]


def test_trainer_row_carries_the_suite_throughput(suite):
    result, _ = suite
    for case in result["cases"]:
        row = case["trainer_metrics"]
        assert row["throughput/rollout_tflops"] == pytest.approx(case["tflops"]["rollout"], rel=1e-12)
        assert row["throughput/train_tflops"] == pytest.approx(case["tflops"]["update"], rel=1e-12)
        assert "throughput/rollout_mfu" not in row  # CPU


def test_budget_skips_the_cases_that_do_not_fit_and_says_so(tmp_path):
    result = run_suite.main(["--scale", "tiny", "--out", str(tmp_path), "--budget-s", "0.001",
                             "--cases", "dancegrpo-32-lora,branchgrpo-64-lora", "--options", "none"])
    assert [c["case"] for c in result["cases"]] == ["dancegrpo-32-lora"]  # the first always runs on a CPU
    assert result["cases"][0]["nfe"]["rollout_calls"] == 1 + 16 * 9  # one shared root call, then 16 rows a step
    [skipped] = result["skipped"]
    assert skipped["case"] == "branchgrpo-64-lora" and skipped["reason"].startswith("budget:")
    assert "- branchgrpo-64-lora: budget:" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--cases", "nope"], "--cases: unknown nope; allowed: branchgrpo-64-lora,"),
    (["--steps", "5"], "--steps: must be >= 10"),
    (["--budget-s", "0"], "--budget-s: must be > 0"),
])
def test_bad_arguments_end_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_suite.main(["--scale", "tiny", "--out", str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_full_scale_without_a_gpu_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_suite.main(["--out", str(tmp_path)])
    assert "--scale full needs a CUDA GPU" in capsys.readouterr().err


def test_a_package_missing_here_is_imported_from_its_wheel(tmp_path):
    name = "gpu_suite_wheel_probe"
    wheel = tmp_path / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 7\n")
    saved = list(sys.path)
    try:
        module, source = run_suite.import_with_wheels(name, tmp_path)
        assert module.VALUE == 7 and source == wheel.name and str(wheel) in module.__file__
    finally:
        sys.path[:] = saved
        sys.modules.pop(name, None)
    with pytest.raises(SystemExit, match="prepare_wheels.sh"):
        run_suite.import_with_wheels(name, tmp_path / "empty")
    importlib.invalidate_caches()


def test_prepare_wheels_pins_the_ci_version():
    script = (ROOT / "benchmarks" / "gpu" / "prepare_wheels.sh").read_text()
    assert "requirements/ci.txt" in script and "diffusers==" in script
    assert any(line.startswith("diffusers==") for line in (ROOT / "requirements" / "ci.txt").read_text().splitlines())
    assert "benchmarks/gpu/wheels/" in (ROOT / ".gitignore").read_text().splitlines()


# -- the trainer's throughput metrics --------------------------------------------------------------
@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert M.peak_tflops(torch.device("cuda", 0)) == peak
    assert M.peak_tflops("cpu") is None


def test_throughput_is_flops_over_seconds_and_mfu_needs_bf16_on_a_known_gpu(monkeypatch):
    flops, times = {"rollout": 3e12, "train": 8e12}, {"rollout": 1.5, "train": 4.0, "reward": 1.0}
    assert M.throughput_metrics(flops, times, torch.device("cpu")) == {
        "throughput/rollout_tflops": 2.0, "throughput/train_tflops": 2.0}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert M.throughput_metrics(flops, times, cuda, torch.bfloat16)["throughput/train_mfu"] == pytest.approx(2 / 989)
    assert "throughput/train_mfu" not in M.throughput_metrics(flops, times, cuda, None)  # float32 compute
    assert M.throughput_metrics(flops, {"rollout": 0.0}, cuda, torch.bfloat16) == {}


def test_trainer_logs_throughput_equal_to_the_flop_counter(tmp_path):
    """One Trainer.step on a tiny FLUX (no checkpointing): rollout + train TFLOP/s × their times
    equal FlopCounterMode's count over the whole step (rewards and decoding do no matmuls)."""
    from policies import tiny_flux, tiny_flux_conditioning
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from branchgrpo.families import PolicyBundle
    from branchgrpo.train.config import load_train_config
    from branchgrpo.train.trainer import Trainer

    policy, info = tiny_flux(seed=0)
    table = tiny_flux_conditioning(2)
    bundle = PolicyBundle(
        family="tiny", policy=policy, trainable=policy.transformer, latent_shape=(info["tokens"], info["channels"]),
        encode_prompts=lambda prompts: {k: v[: len(prompts)] for k, v in table.items()},
        decode=lambda x: x.mean(dim=-1, keepdim=True).unsqueeze(1).sigmoid(), train_prompts=["a", "b"],
        heldout_prompts=["a"],
    )
    config = load_train_config(None, "branchgrpo", [
        f"run.output_dir={tmp_path}", "run.iterations=1", "run.progress=false", "run.tensorboard=false",
        "data.prompts_per_iteration=2", "tree.steps=10", "run.device=cpu", "method.engine.rollout_micro_batch=64",
        "method.engine.train_micro_batch=32",
    ])
    trainer = Trainer(config, model=bundle, reward=lambda images, prompts: images.flatten(1).mean(dim=1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        row = trainer.step()
    logged = sum(row[f"throughput/{p}_tflops"] * row[f"time/{p}"] * 1e12 for p in ("rollout", "train"))
    assert logged == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert "throughput/rollout_mfu" not in row


def test_a_compiled_case_compiles_in_the_warm_up_only(tmp_path):
    """``--compile blocks``: every variant the rollout and update need (gradients or not, train or
    eval mode, one row and the micro-batch sizes) compiles in the warm-up, so no compilation is timed
    as rollout or update, and no block passes dynamo's recompile limit (the suite makes that an
    error). Dynamo's eager backend: the same tracing and guards without inductor's minutes on CPU."""
    torch._dynamo.reset()
    result = run_suite.main(["--scale", "tiny", "--out", str(tmp_path), "--cases", "branchgrpo-32-lora",
                             "--options", "none", "--compile", "blocks", "--compile-backend", "eager"])
    torch._dynamo.reset()
    (case,) = result["cases"]
    assert "error" not in case, case.get("error")
    assert case["compile"] == "blocks" and case["compile_backend"] == "eager"
    assert case["compiled_graphs_in_phases"] == {"rollout": 0, "update": 0}
    assert case["nfe"]["rollout_calls"] == 43 and case["optimizer_steps"] == 1
    md = (tmp_path / "results.md").read_text()
    assert "- branchgrpo-32-lora: backend eager, warm-up" in md and "rollout 0, update 0" in md


@pytest.mark.parametrize("models", ["flux sd3", "wan"])
def test_next_session_script_commands_parse_and_name_known_cases(models, tmp_path):
    """benchmarks/gpu/next_session.sh is what a GPU session runs unprepared: its commands must be
    ones the suite accepts, naming cases the model has, within the time it is given."""
    env = {**os.environ, "OUT": str(tmp_path), "DRY_RUN": "1", "MODELS": models, "TOTAL_S": "560"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "next_session.sh")], env=env,
                          capture_output=True, text=True, check=True, timeout=60)
    commands = [line.split(": ", 2)[2] for line in done.stdout.splitlines() if line.startswith("next_session: ")]
    assert len(commands) == len(models.split())
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    for command in commands:
        words = shlex.split(command)
        assert words[:3] == ["PYTHONUNBUFFERED=1", "python3", "benchmarks/gpu/run_suite.py"]
        args = run_suite.build_parser().parse_args(words[3:])
        assert Path(args.out).parent == tmp_path
        assert args.options == "none" and 0 < args.deadline_s < 560
        known = {c.name for c in run_suite.all_cases(run_suite.SCALES["full"](args.model))}
        if args.cases:
            assert set(args.cases.split(",")) <= known
        if args.model == "flux-dev":
            assert (args.compile, args.checkpointing, args.train_micro_batch) == ("blocks", "off", 2)
