"""One full BranchGRPO run step for SD3 through the Trainer with everything on at once: classifier-free
guidance (g > 1, a negative prompt) in rollout and training, LoRA, and the KL term to the
adapter-disabled reference (tiny random SD3 components from test_sd3)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from branchgrpo.models.lora import LoraSpec, LoraWeights, add_lora
from branchgrpo.models.sd3 import SD3Adapter
from branchgrpo.families import PolicyBundle
from branchgrpo.train.config import LoraConfig, load_train_config
from branchgrpo.train.trainer import Trainer

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from test_sd3 import GUIDANCE, IMAGE, MAX_SEQ, NEGATIVE, PROMPTS, tiny_components  # noqa: E402


def brightness(images, prompts):
    return images.flatten(1).mean(dim=1)


def test_branchgrpo_run_with_cfg_lora_and_kl_logs_a_finite_kl_and_trains_only_lora(tmp_path):
    adapter = SD3Adapter(**tiny_components(seed=3), max_sequence_length=MAX_SEQ, height=IMAGE, width=IMAGE,
                         guidance_scale=GUIDANCE, negative_prompt=NEGATIVE)
    add_lora(adapter.transformer, LoraSpec(rank=4, alpha=8.0))
    config = load_train_config(None, "branchgrpo", [
        f"run.output_dir={tmp_path}", "run.iterations=1", "run.progress=false", "run.tensorboard=false",
        "run.dump_tree_every=0", "run.checkpoint_every=0", "run.device=cpu", "model.family=sd3",
        "data.prompts_per_iteration=2", "eval.samples_per_prompt=1", "tree.steps=4", "split_plan=0:2,2:2",
        "update.kl_coef=0.1", "update.updates_per_iteration=2", "update.learning_rate=1e-2",
    ])
    config.model.lora = LoraConfig(rank=4, alpha=8.0)  # the trainer's KL reference needs LoRA
    generator = PolicyBundle(
        family="sd3", policy=adapter.velocity_model(), trainable=LoraWeights(adapter.transformer),
        latent_shape=adapter.latent_shape(), encode_prompts=adapter.encode_prompts, decode=adapter.decode,
        train_prompts=PROMPTS, heldout_prompts=PROMPTS[:1],
    )
    trainer = Trainer(config, model=generator, reward=brightness)
    assert trainer.reference is not None

    negative = adapter.encode_prompts([NEGATIVE], with_negative=False)["prompt_embeds"][0]
    calls: list[tuple[bool, int, bool]] = []  # (with grad, rows, negative rows first)

    def record(_module, _args, kwargs, _out):
        embeds = kwargs["encoder_hidden_states"]
        half = embeds.shape[0] // 2
        calls.append((torch.is_grad_enabled(), embeds.shape[0],
                      bool(torch.equal(embeds[:half], negative.expand(half, *negative.shape)))))

    before = {k: v.detach().clone() for k, v in adapter.transformer.state_dict().items()}
    hook = adapter.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        summary = trainer.run()
    finally:
        hook.remove()
    assert summary.iterations == 1

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if "reward_mean" in r)
    print({k: train_row[k] for k in ("kl", "loss", "optimizer_steps", "nfe/trained_edges")})
    assert math.isfinite(train_row["kl"]) and train_row["kl"] > 0  # the second update's policy left the reference
    assert train_row["optimizer_steps"] == 2
    # CFG in rollout, evaluation and the training forward: every call is [negative; positive]
    assert any(grad for grad, _, _ in calls) and any(not grad for grad, _, _ in calls)
    assert all(rows_ % 2 == 0 and negative_first for _, rows_, negative_first in calls)

    after = adapter.transformer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:5]
