"""LoRA on the digits world, end to end on a CPU: ``branchgrpo train model.lora.rank=4`` trains only
LoRA tensors, ``branchgrpo export RUN out.safetensors`` writes diffusers' LoRA file, and diffusers
loads it — through ``FluxPipeline.load_lora_weights`` and through a lone transformer's
``load_lora_adapter`` — onto the shipped digits transformer, reproducing the run's velocity.

The oracle is diffusers itself: the same velocity wrapper (``FluxVelocity``) on the transformer
diffusers built from the file must give the trained run's velocity to float32 rounding.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from branchgrpo.cli import main  # noqa: E402
from branchgrpo.models.flux import FluxVelocity  # noqa: E402
from branchgrpo.worlds.digits.world import load_transformer  # noqa: E402

RANK = 4
TRAIN = ["model.lora.rank=4", "run.iterations=1", "data.prompts_per_iteration=1", "eval.every=0", "tree.steps=4",
         "split_plan=0:2,2:2", "run.progress=false", "run.device=cpu", "run.tensorboard=false",
         "run.dump_tree_every=0", "run.checkpoint_every=0", "eval.max_prompts=2", "eval.samples_per_prompt=1"]
PROMPTS = ["a handwritten 7", "the number three"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One LoRA iteration through the CLI, its export, and the run's policy rebuilt as `sample` does."""
    from branchgrpo.train.components import build_policy
    from branchgrpo.train.config import load_train_config
    from branchgrpo.train.weights import load_weights

    folder = tmp_path_factory.mktemp("digits-lora")
    run, lora_file = folder / "run", folder / "export" / "digits-lora.safetensors"
    assert main(["train", f"run.output_dir={run}", *TRAIN]) == 0
    assert main(["export", str(run), str(lora_file)]) == 0
    config = load_train_config(run / "config.yaml")
    bundle = build_policy(config, torch.device("cpu"))
    load_weights(bundle.trainable, run / "weights" / "model.safetensors")
    generator = torch.Generator().manual_seed(3)
    inputs = dict(x=torch.randn(2, 64, 4, generator=generator), sigma=torch.tensor([0.8, 0.35]),
                  cond=bundle.encode_prompts(PROMPTS))
    with torch.no_grad():
        ours = bundle.policy(inputs["x"], inputs["sigma"], inputs["cond"])
    return dict(run=run, lora_file=lora_file, config=config, inputs=inputs, ours=ours)


def velocity(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return FluxVelocity(transformer.eval(), 16, 16, guidance_scale=None)(inputs["x"], inputs["sigma"], inputs["cond"])


def test_run_holds_only_lora_tensors_and_export_records_rank_and_alpha(trained):
    from safetensors import safe_open

    with safe_open(str(trained["run"] / "weights" / "model.safetensors"), "pt") as handle:
        run_keys = list(handle.keys())
    assert run_keys and all(".lora_A." in k or ".lora_B." in k for k in run_keys)
    with safe_open(str(trained["lora_file"]), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    assert len(keys) == len(run_keys) and all(k.startswith("transformer.") for k in keys)
    assert {min(shape) for shape in shapes.values()} == {RANK}  # lora_A: [r, in], lora_B: [out, r]
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (RANK, trained["config"].model.lora.alpha)


def test_flux_pipeline_load_lora_weights_reproduces_the_runs_velocity(trained):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from test_flux import tiny_components  # stand-in text encoders and VAE: loading LoRA only needs the transformer

    base = velocity(load_transformer(), trained["inputs"])
    parts = {**tiny_components(), "transformer": load_transformer()}
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts)
    pipe.load_lora_weights(str(trained["lora_file"]))
    loaded = velocity(pipe.transformer, trained["inputs"])
    print(f"digits LoRA via FluxPipeline: max|Δv| = {(loaded - trained['ours']).abs().max():.2e}, "
          f"LoRA's own effect max|v - v_base| = {(trained['ours'] - base).abs().max():.2e}")
    torch.testing.assert_close(loaded, trained["ours"], rtol=0, atol=1e-6)
    assert (trained["ours"] - base).abs().max() > 1e-4  # the LoRA is what makes them equal


def test_lone_transformer_load_lora_adapter_reproduces_the_runs_velocity(trained):
    # Given the folder and weight_name, diffusers reads the rank/alpha metadata; given the file path
    # alone (diffusers 0.42) it does not and assumes alpha = rank, a 16x smaller update here.
    transformer = load_transformer()
    path = trained["lora_file"]
    transformer.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
    torch.testing.assert_close(velocity(transformer, trained["inputs"]), trained["ours"], rtol=0, atol=1e-6)
