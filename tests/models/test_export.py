"""Export (branchgrpo.models.export): full folders load in diffusers and reproduce our η = 0 sampling
with the trained transformer (tiny SD3 models built offline); merged state dicts; export errors.
That every family's LoRA file loads with its pipeline's ``load_lora_weights`` and gives our velocity
is the conformance suite's ``test_exported_lora_loads_in_the_pipeline`` (tests/models/conformance.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from branchgrpo.models.export import export_full, export_lora, merged_state_dict, plain_transformer
from branchgrpo.models.flux import FluxVelocity
from branchgrpo.models.lora import LoraSpec, add_lora, trainable_parameters
from branchgrpo.models.sd3 import SD3Velocity, spec_sigmas_for_pipeline
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.spec import TreeSpec

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from test_sd3 import (  # noqa: E402  (pytest puts tests/models/ on sys.path)
    GUIDANCE, IMAGE, MAX_SEQ, NEGATIVE, PROMPTS, make_adapter, sd3_pipeline, tiny_components,
)

STEPS = 3
LORA_SPEC = LoraSpec(rank=4, alpha=12.0)  # alpha ≠ rank: a loader that ignored alpha would be off by 3×


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_lora(transformer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Inject LoRA and give it non-trivial weights (stands in for GRPO training)."""
    add_lora(transformer, LORA_SPEC)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainable_parameters(transformer):
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return transformer


def ode_rollout(policy, conditioning, latent_shape, num_prompts=2):
    spec = TreeSpec(steps=STEPS, shift=3.0, eta=0.0, split_plan={})
    return rollout(policy, conditioning, spec, num_prompts=num_prompts, latent_shape=latent_shape,
                   generator=torch.Generator().manual_seed(0), micro_batch=num_prompts)


@pytest.fixture(scope="module")
def sd3_trained():
    components = tiny_components(seed=11)
    base_transformer = copy.deepcopy(components["transformer"])
    trained = train_lora(components["transformer"])
    adapter = make_adapter(components)
    conditioning = adapter.encode_prompts(PROMPTS[:2])
    tree = ode_rollout(adapter.velocity_model(), conditioning, adapter.latent_shape())
    return dict(components=components, base_transformer=base_transformer, trained=trained, adapter=adapter,
                conditioning=conditioning, tree=tree)


def sd3_call(conditioning, noise, **extra):
    return dict(
        prompt_embeds=conditioning["prompt_embeds"], pooled_prompt_embeds=conditioning["pooled_prompt_embeds"],
        negative_prompt_embeds=conditioning["negative_prompt_embeds"],
        negative_pooled_prompt_embeds=conditioning["negative_pooled_prompt_embeds"],
        latents=noise.clone(), height=IMAGE, width=IMAGE, num_inference_steps=STEPS,
        sigmas=spec_sigmas_for_pipeline(STEPS), guidance_scale=GUIDANCE, **extra,
    )


def test_sd3_full_folder_from_base_folder_loads_and_reproduces(sd3_trained, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    parts = sd3_trained["components"]
    base_dir = tmp_path / "base"
    sd3_pipeline({**parts, "transformer": sd3_trained["base_transformer"]}).save_pretrained(base_dir)
    before = sorted(p.relative_to(base_dir) for p in base_dir.rglob("*"))
    out = export_full(sd3_trained["trained"], base_dir, tmp_path / "export")
    assert sorted(p.relative_to(base_dir) for p in base_dir.rglob("*")) == before  # base untouched
    assert (out / "text_encoder_3").is_symlink() and (out / "vae").is_symlink()
    assert not (out / "transformer").is_symlink() and list((out / "transformer").glob("*.safetensors"))
    assert (out / "model_index.json").is_file() and not (out / "model_index.json").is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    tree = sd3_trained["tree"]
    call = dict(prompt=PROMPTS[:2], negative_prompt=NEGATIVE, height=IMAGE, width=IMAGE, num_inference_steps=STEPS,
                sigmas=spec_sigmas_for_pipeline(STEPS), guidance_scale=GUIDANCE, max_sequence_length=MAX_SEQ)
    latents = pipe(latents=tree.latents[0].clone(), output_type="latent", **call).images
    images = pipe(latents=tree.latents[0].clone(), output_type="pt", **call).images
    latent_diff = (latents - tree.latents[-1]).abs().max().item()
    image_diff = (images - sd3_trained["adapter"].decode(tree.leaf_x0)).abs().max().item()
    print(f"SD3 full folder: max|Δlatent| = {latent_diff:.2e}, max|Δimage| = {image_diff:.2e}")
    assert latent_diff < 1e-5 and image_diff < 1e-5
    with pytest.raises(FileExistsError):
        export_full(sd3_trained["trained"], base_dir, out)


def test_full_folder_from_in_memory_components_with_copies(sd3_trained, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    parts = dict(sd3_trained["components"])
    parts.pop("transformer")
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0)
    out = export_full(sd3_trained["trained"], parts, tmp_path / "export", dtype=torch.float32)
    assert not any(p.is_symlink() for p in out.iterdir())
    loaded = SD3Transformer2DModel.from_pretrained(out / "transformer")
    x = sd3_trained["tree"].latents[1]
    sigma = torch.full((2,), 0.7)
    cond = sd3_trained["conditioning"]
    with torch.no_grad():
        ours = SD3Velocity(sd3_trained["trained"], GUIDANCE)(x, sigma, cond)
        theirs = SD3Velocity(loaded, GUIDANCE)(x, sigma, cond)
    assert (ours - theirs).abs().max() < 1e-5
    assert StableDiffusion3Pipeline.from_pretrained(out).transformer is not None


def test_merged_state_dict_leaves_the_live_model_alone(sd3_trained):
    trained = sd3_trained["trained"]
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    merged = merged_state_dict(trained)
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    assert set(merged) == set(sd3_trained["base_transformer"].state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(value, before[key])
    bf16 = plain_transformer(trained, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16 and not any(t.is_meta for t in bf16.state_dict().values())


def tiny_flux():
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    torch.manual_seed(21)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=IMAGE, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    return transformer, vae


def test_export_lora_needs_lora_and_a_known_pipeline(tmp_path):
    with pytest.raises(ValueError, match="no LoRA"):
        export_lora(tiny_flux()[0], tmp_path / "x.safetensors")
    block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    add_lora(block, LoraSpec(rank=2, alpha=2.0, target_modules=["0"]))
    with pytest.raises(ValueError, match="pipeline_class"):
        export_lora(block, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        export_lora(block, tmp_path / "x.bin")
