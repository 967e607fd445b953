"""A family built from a folder trains what the config says: every transformer weight without LoRA
(the loaders hand modules over frozen), only the LoRA tensors with it."""

import pytest
import torch
from conformance import save_layout
from test_flux import IMAGE, MAX_SEQ, PROMPTS, tiny_components

from branchgrpo.train.components import build_policy
from branchgrpo.train.config import load_train_config


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    save_layout(tiny_components(seed=0), folder)
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return folder, prompts


def build(folder, prompts, *overrides):
    config = load_train_config(None, None, [
        "model.family=flux", f"model.path={folder}", f"data.train_prompts={prompts}", "run.device=cpu",
        f"model.options={{height: {IMAGE}, width: {IMAGE}, max_sequence_length: {MAX_SEQ}}}", *overrides,
    ])
    return build_policy(config, torch.device("cpu"))


def test_full_fine_tune_trains_every_transformer_weight(flux_folder):
    bundle = build(*flux_folder)
    params = list(bundle.trainable.parameters())
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in bundle.adapter.vae.parameters())


def test_lora_trains_only_the_adapters(flux_folder):
    bundle = build(*flux_folder, "model.lora.rank=2")
    trained = [name for name, p in bundle.trainable.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)
