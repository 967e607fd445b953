"""LoRA (branchgrpo.models.lora) on tiny SD3 and FLUX transformers and a plain torch module."""

from __future__ import annotations

import copy

import pytest
import torch

from branchgrpo.models.lora import (
    LoraSpec,
    LoraWeights,
    ReferenceVelocity,
    add_lora,
    disabled_adapter,
    has_lora,
    load_lora_state_dict,
    lora_config_dict,
    lora_state_dict,
    trainable_parameters,
)
from branchgrpo.models.sd3 import SD3Velocity

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from test_sd3 import tiny_transformer  # noqa: E402  (pytest puts tests/models/ on sys.path)

LORA_SPEC = LoraSpec(rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sd3_inputs(batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cond = {
        "prompt_embeds": torch.randn(batch, 6, 32, generator=gen),
        "pooled_prompt_embeds": torch.randn(batch, 16, generator=gen),
        "negative_prompt_embeds": torch.randn(batch, 6, 32, generator=gen),
        "negative_pooled_prompt_embeds": torch.randn(batch, 16, generator=gen),
    }
    return torch.randn(batch, 4, 8, 8, generator=gen), torch.tensor([0.9, 0.3])[:batch], cond


def base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Base weights by their original names (peft moves a wrapped Linear's weight to base_layer.)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items() if "lora_" not in k}


def test_add_lora_starts_as_the_base_model_and_trains_only_lora():
    original = tiny_transformer(seed=3)
    transformer = add_lora(copy.deepcopy(original), LORA_SPEC)
    assert has_lora(transformer) and not has_lora(original)
    assert type(transformer) is type(original)  # in place: wrappers and .config keep working
    x, sigma, cond = sd3_inputs()
    with torch.no_grad():
        before = SD3Velocity(original, guidance_scale=4.5)(x, sigma, cond)
        after = SD3Velocity(transformer, guidance_scale=4.5)(x, sigma, cond)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # B = 0 at init

    params = trainable_parameters(transformer)
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(params) == len(names) == 2 * (8 * 2 - 1)  # (A, B) × 8 targets × 2 blocks; last block: no to_add_out
    assert all(p.dtype == torch.float32 for p in params)
    config = lora_config_dict(transformer)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)


def test_optimizer_step_moves_lora_only_and_disabled_adapter_is_the_original():
    original = tiny_transformer(seed=4)
    transformer = add_lora(copy.deepcopy(original), LORA_SPEC)
    frozen = base_state(transformer)
    lora_before = {k: v.clone() for k, v in lora_state_dict(transformer).items()}
    policy = SD3Velocity(transformer, guidance_scale=4.5)
    optimizer = torch.optim.AdamW(trainable_parameters(transformer), lr=1e-2, weight_decay=1e-4)
    x, sigma, cond = sd3_inputs()
    for _ in range(2):  # step 1 moves B (A's gradient is B·… = 0 at init), step 2 moves A too
        optimizer.zero_grad()
        loss = policy(x, sigma, cond).pow(2).mean()
        loss.backward()
        assert all(p.grad is None for n, p in transformer.named_parameters() if "lora_" not in n)
        optimizer.step()
    assert len(optimizer.state) == len(trainable_parameters(transformer))  # optimizer state: LoRA only

    for name, value in base_state(transformer).items():
        assert torch.equal(value, frozen[name]), name
    lora_after = lora_state_dict(transformer)
    changed = [k for k in lora_after if not torch.equal(lora_after[k], lora_before[k])]
    # every A and B moved, except the one with no path to the output: in the last (context_pre_only)
    # block the text-token queries only produce text outputs, which are discarded
    assert set(lora_after) - set(changed) == {"transformer_blocks.1.attn.add_q_proj.lora_B.weight"}

    with torch.no_grad():
        reference_original = SD3Velocity(original, guidance_scale=4.5)(x, sigma, cond)
        trained = policy(x, sigma, cond)
        with disabled_adapter(transformer):
            reference = policy(x, sigma, cond)
        again = policy(x, sigma, cond)
    torch.testing.assert_close(reference, reference_original, rtol=0, atol=0)
    assert (trained - reference).abs().max() > 1e-4
    torch.testing.assert_close(again, trained, rtol=0, atol=0)  # adapter back on after the block
    # requires_grad survives the toggle (peft's enable_adapters flips it)
    assert [n for n, p in transformer.named_parameters() if p.requires_grad] == [
        n for n, p in transformer.named_parameters() if "lora_" in n
    ]
    ref_model = ReferenceVelocity(policy)
    assert list(ref_model.parameters()) == []  # shares the policy's weights, registers nothing
    torch.testing.assert_close(ref_model(x, sigma, cond), reference_original, rtol=0, atol=0)


def test_disabled_adapter_restores_state_on_error_and_nests():
    transformer = add_lora(tiny_transformer(seed=5), LORA_SPEC)
    x, sigma, cond = sd3_inputs(seed=1)
    policy = SD3Velocity(transformer, guidance_scale=1.0)
    with pytest.raises(RuntimeError):
        with disabled_adapter(transformer):
            raise RuntimeError("boom")
    with disabled_adapter(transformer):
        with disabled_adapter(transformer):
            pass
        assert all(m.disable_adapters for m in transformer.modules() if hasattr(m, "lora_A"))
    assert not any(m.disable_adapters for m in transformer.modules() if hasattr(m, "lora_A"))
    policy(x, sigma, cond)  # still runs


def test_lora_state_dict_is_diffusers_convention_and_round_trips():
    transformer = add_lora(tiny_transformer(seed=6), LORA_SPEC)
    for p in trainable_parameters(transformer):
        torch.nn.init.normal_(p, std=0.1)
    state = lora_state_dict(transformer)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and ".default." not in k for k in state)
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in state
    other = add_lora(tiny_transformer(seed=6), LORA_SPEC)
    load_lora_state_dict(other, state)
    for key, value in lora_state_dict(other).items():
        assert torch.equal(value, state[key])
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(other, {k: v for k, v in list(state.items())[1:]})


def test_lora_weights_view_saves_loads_and_broadcasts_only_lora():
    transformer = add_lora(tiny_transformer(seed=7), LORA_SPEC)
    view = LoraWeights(transformer)
    params = list(view.parameters())
    assert [id(p) for p in params] == [id(p) for p in trainable_parameters(transformer)]
    state = view.state_dict()
    assert set(state) == {n for n, _ in transformer.named_parameters() if "lora_" in n}
    assert all(state[n].data_ptr() == p.data_ptr() for n, p in transformer.named_parameters() if "lora_" in n)
    # what a checkpoint + EMA + broadcast do with trainable.state_dict()
    saved = {k: v.detach().clone() + 1.0 for k, v in state.items()}
    view.load_state_dict(saved, strict=True)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, saved[name])
    next(iter(view.state_dict().values())).add_(5.0)  # in place on the state tensor reaches the model
    first = next(n for n, _ in transformer.named_parameters() if "lora_" in n)
    assert torch.equal(dict(transformer.named_parameters())[first], next(iter(saved.values())) + 5.0)
    with pytest.raises(RuntimeError, match="missing"):
        view.load_state_dict({}, strict=True)
    optimizer = torch.optim.AdamW([p for p in view.parameters() if p.requires_grad], lr=1e-3)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(p.numel() for p in params)


def test_flux_transformer_and_plain_modules_take_lora():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6],
    )
    add_lora(flux, LORA_SPEC)
    targeted = {n.rsplit(".lora_", 1)[0] for n, _ in flux.named_parameters() if "lora_" in n}
    assert "single_transformer_blocks.0.attn.to_q" in targeted and "transformer_blocks.0.attn.to_add_out" in targeted

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Module()
            self.attn.to_q = torch.nn.Linear(8, 8)
            self.mlp = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.mlp(self.attn.to_q(x))

    block = Block()
    add_lora(block, LoraSpec(rank=2, alpha=2.0, dropout=0.1, target_modules=["attn.to_q", "mlp"]))
    assert len(trainable_parameters(block)) == 4
    x = torch.randn(3, 8)
    block.train()
    with disabled_adapter(block):
        assert torch.equal(block(x), block(x))  # base path: no dropout randomness
    with pytest.raises(ValueError, match="matches LoRA target_modules"):
        add_lora(tiny_transformer(), LoraSpec(target_modules=["no_such_layer"]))


def test_lora_spec_validation():
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSpec(dropout=1.0)
    defaults = LoraSpec()
    assert (defaults.rank, defaults.alpha, defaults.init) == (32, 64.0, "gaussian")  # Flow-GRPO's SD3.5 LoRA


def test_float32_lora_on_a_bfloat16_base_trains():
    transformer = add_lora(tiny_transformer(seed=8).to(torch.bfloat16), LORA_SPEC)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(transformer))
    assert transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        for p in trainable_parameters(transformer):
            p.normal_(std=0.1)
    x, sigma, cond = sd3_inputs(seed=2)
    out = SD3Velocity(transformer, guidance_scale=4.5)(x, sigma, cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    grads = [p.grad for p in trainable_parameters(transformer)]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
