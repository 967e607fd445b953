"""model.attention and model.compile (src/branchgrpo/models/speed.py): the CUDA attention flags
they set, which blocks are compiled, and that a compiled policy trains to the same numbers."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from branchgrpo.config import ConfigError
from branchgrpo.models import speed
from branchgrpo.models.flux import FluxVelocity

FLAGS = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled", "math_sdp_enabled")


@pytest.fixture
def restore_attention_flags():
    cuda = torch.backends.cuda
    before = {name: getattr(cuda, name)() for name in FLAGS}
    yield
    cuda.enable_flash_sdp(before["flash_sdp_enabled"])
    cuda.enable_mem_efficient_sdp(before["mem_efficient_sdp_enabled"])
    cuda.enable_cudnn_sdp(before["cudnn_sdp_enabled"])
    cuda.enable_math_sdp(before["math_sdp_enabled"])


def flags() -> tuple[bool, ...]:
    return tuple(getattr(torch.backends.cuda, name)() for name in FLAGS)


@pytest.mark.parametrize("kernel, expected", [
    ("flash", (True, False, False, True)), ("efficient", (False, True, False, True)),
    ("cudnn", (False, False, True, True)), ("math", (False, False, False, True)),
])
def test_each_kernel_alone_with_math_as_fallback(restore_attention_flags, kernel, expected):
    speed.select_attention(kernel)
    assert flags() == expected


def test_auto_leaves_torch_order_and_unknown_names_fail(restore_attention_flags):
    torch.backends.cuda.enable_cudnn_sdp(False)
    before = flags()
    speed.select_attention("auto")
    assert flags() == before
    with pytest.raises(ValueError, match="allowed auto, flash, efficient, cudnn, math; got 'xformers'"):
        speed.select_attention("xformers")


def flux(layers: int = 2, single: int = 3) -> FluxVelocity:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6])
    return FluxVelocity(transformer, 8, 8)


def test_repeated_blocks_are_flux_double_and_single_blocks():
    policy = flux()
    blocks = speed.repeated_blocks(policy)
    assert blocks == [*policy.transformer.transformer_blocks, *policy.transformer.single_transformer_blocks]
    with pytest.raises(ValueError, match="no repeated blocks"):
        speed.compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_compiled_blocks_give_the_eager_forward_and_gradients():
    eager, compiled = flux(), flux()
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        model.transformer.enable_gradient_checkpointing()
        model.train()
    assert speed.compile_blocks(compiled, backend="eager") == 5
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, 16, 16, generator=g), torch.tensor([0.3, 0.8])
    cond = {"prompt_embeds": torch.randn(2, 6, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 16, generator=g)}
    outputs = []
    for model in (eager, compiled):
        out = model(x, sigma, cond)
        out.square().mean().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0])
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    # the blocks really run through dynamo: their forward is the compiled one
    assert all(block._compiled_call_impl is not None for block in speed.repeated_blocks(compiled))


def test_a_compiled_trainer_takes_the_eager_step(tmp_path, monkeypatch):
    from policies import tiny_flux_conditioning
    from test_trainer import PROMPTS, brightness_reward

    from branchgrpo.families import PolicyBundle
    from branchgrpo.train.config import load_train_config
    from branchgrpo.train.trainer import Trainer

    calls = []
    original = speed.compile_blocks

    def eager_compile(module, backend="inductor"):
        calls.append(backend)
        return original(module, backend="eager")  # dynamo's tracing without inductor's minutes on CPU

    monkeypatch.setattr(speed, "compile_blocks", eager_compile)
    table = tiny_flux_conditioning(len(PROMPTS))

    def trainer(name: str, *overrides: str) -> Trainer:
        policy = flux()
        bundle = PolicyBundle(
            family="tiny", policy=policy, trainable=policy.transformer, latent_shape=(16, 16),
            encode_prompts=lambda prompts: {k: v[[PROMPTS.index(p) for p in prompts]] for k, v in table.items()},
            decode=lambda x: x.mean(dim=-1, keepdim=True).unsqueeze(1).sigmoid(),
            train_prompts=PROMPTS, heldout_prompts=PROMPTS[:2])
        config = load_train_config(None, "branchgrpo", [
            f"run.output_dir={tmp_path / name}", "run.iterations=1", "run.progress=false", "run.tensorboard=false",
            "data.prompts_per_iteration=2", "tree.steps=6", "split_plan=0:2,2:2", "run.device=cpu",
            "update.updates_per_iteration=1", "model.gradient_checkpointing=true", *overrides])
        return Trainer(config, model=bundle, reward=brightness_reward)

    eager, compiled = trainer("eager"), trainer("compiled", "model.compile=blocks")
    assert calls == ["inductor"]  # the engine's default backend, swapped here for dynamo's eager one
    assert all(b._compiled_call_impl is not None for b in speed.repeated_blocks(compiled.model.policy))
    first, second = eager.step(), compiled.step()
    for key in ("reward_mean", "loss", "ratio_mean", "grad_norm"):
        assert second[key] == pytest.approx(first[key], rel=1e-5, abs=1e-7), key
    for (name, a), (_, b) in zip(eager.model.trainable.named_parameters(), compiled.model.trainable.named_parameters()):
        torch.testing.assert_close(b, a, msg=name)


def test_compile_of_a_policy_without_repeated_blocks_is_a_config_error(tmp_path):
    from test_trainer import make_trainer

    with pytest.raises(ConfigError, match="model.compile: FluxVelocity has no repeated blocks"):
        make_trainer(tmp_path, "branchgrpo", "split_plan=0:2,2:2", "model.compile=blocks")


def test_config_rejects_unknown_settings():
    from branchgrpo.train.config import load_train_config

    with pytest.raises(ConfigError, match="model.attention"):
        load_train_config(None, "branchgrpo", ["model.attention=xformers"])
    with pytest.raises(ConfigError, match="model.compile"):
        load_train_config(None, "branchgrpo", ["model.compile=yes"])


def test_a_training_workload_compiles_every_variant_it_needs():
    """Rollout (no gradients, eval mode, one row and many) and update (gradients, train mode,
    checkpointing, LoRA, one row and many) call each block in more ways than dynamo's default
    ``recompile_limit`` of 8; past the limit a block silently runs eager. ``compile_blocks`` raises
    the limit, so this workload must not hit it (dynamo is told to fail if it does)."""
    from branchgrpo.models.lora import LoraSpec, add_lora

    torch._dynamo.reset()  # compiled variants are counted per code object, across every earlier test
    policy = flux()
    add_lora(policy.transformer, LoraSpec(rank=4))
    policy.transformer.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(2)

    def call(rows: int, grad: bool) -> None:
        x, sigma = torch.randn(rows, 16, 16, generator=g), torch.rand(rows, generator=g)
        cond = {"prompt_embeds": torch.randn(rows, 6, 32, generator=g),
                "pooled_prompt_embeds": torch.randn(rows, 16, generator=g)}
        if grad:
            policy.train()
            policy(x, sigma, cond).square().mean().backward()
            policy.eval()
        else:
            with torch.no_grad():
                policy(x, sigma, cond)

    # torch's default limit whatever ran before (config.patch restores it; monkeypatch would delete it)
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        speed.compile_blocks(policy, backend="eager")
        assert torch._dynamo.config.recompile_limit >= speed.RECOMPILE_LIMIT
        for rows, grad in ((1, False), (1, True), (4, False), (3, True), (2, False), (5, True), (1, False)):
            call(rows, grad)
    torch._dynamo.reset()
