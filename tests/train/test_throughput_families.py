"""Per-phase FLOPs (``throughput/*``, src/branchgrpo/train/metrics.py ``phase_flops``) beyond FLUX.1:
the rollout FLOPs the trainer logs for one rollout row equal what torch's FLOP counter sees when
the real adapter runs that row — Qwen-Image and Qwen-Image-Edit with true CFG (two transformer rows
per sample, the source's tokens in the image stream), Wan's video latents in 3-D patches, SD3.5's
``[B, C, H, W]`` latents with true CFG."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from branchgrpo.train.metrics import phase_flops

diffusers = pytest.importorskip("diffusers")


def counted(policy, x, sigma, conditioning) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        policy(x, sigma, conditioning)
    return counter.get_total_flops()


def logged_rollout(policy, x, conditioning) -> int:
    tree = SimpleNamespace(latents=[x], rollout_calls=x.shape[0])
    stats = SimpleNamespace(training_forwards=0)
    method = SimpleNamespace(update=SimpleNamespace(kl_coef=0.0))
    return phase_flops(policy, conditioning, tree, stats, method)["rollout"]


def qwen_case(edit: bool):
    from branchgrpo.models.qwenimage_edit import QwenImageEditVelocity
    from branchgrpo.models.qwenimage_transformer import QwenImageVelocity

    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                  attention_head_dim=8, num_attention_heads=2,
                                                  joint_attention_dim=12, axes_dims_rope=(2, 2, 4)).eval()
    gen = torch.Generator().manual_seed(1)
    conditioning = {"prompt_embeds": torch.randn(1, 5, 12, generator=gen), "prompt_embeds_mask": torch.ones(1, 5),
                    "negative_prompt_embeds": torch.randn(1, 5, 12, generator=gen),
                    "negative_prompt_embeds_mask": torch.ones(1, 5)}
    if edit:  # a source seen as a 2×3 packed grid
        conditioning |= {"image_latents": torch.randn(1, 6, 16, generator=gen),
                         "image_latent_shape": torch.tensor([[2.0, 3.0]])}
    policy = (QwenImageEditVelocity if edit else QwenImageVelocity)(model, 8, 8, guidance_scale=4.0)
    return policy, torch.randn(1, 16, 16, generator=gen), conditioning


def wan_case(guidance: float):
    from branchgrpo.models.wan import WanVelocity

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                            in_channels=4, out_channels=4, text_dim=12, freq_dim=16, ffn_dim=40,
                                            num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                            rope_max_seq_len=32).eval()
    gen = torch.Generator().manual_seed(1)
    conditioning = {"prompt_embeds": torch.randn(1, 7, 12, generator=gen),
                    "negative_prompt_embeds": torch.randn(1, 7, 12, generator=gen)}
    return WanVelocity(model, guidance_scale=guidance), torch.randn(1, 4, 2, 4, 6, generator=gen), conditioning


def sd3_case():
    from branchgrpo.models.sd3 import SD3Velocity

    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                            caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                            pos_embed_max_size=16, dual_attention_layers=(0,),
                                            qk_norm="rms_norm").eval()
    gen = torch.Generator().manual_seed(1)
    conditioning = {"prompt_embeds": torch.randn(1, 6, 12, generator=gen),
                    "pooled_prompt_embeds": torch.randn(1, 10, generator=gen),
                    "negative_prompt_embeds": torch.randn(1, 6, 12, generator=gen),
                    "negative_pooled_prompt_embeds": torch.randn(1, 10, generator=gen)}
    return SD3Velocity(model, guidance_scale=4.5), torch.randn(1, 4, 8, 8, generator=gen), conditioning


@pytest.mark.parametrize("case", ["qwenimage", "qwenimage-edit", "wan-cfg", "wan-plain", "sd3-cfg"])
def test_logged_rollout_flops_equal_the_flop_counter_on_the_real_adapter(case):
    policy, x, conditioning = {"qwenimage": lambda: qwen_case(False), "qwenimage-edit": lambda: qwen_case(True),
                               "wan-cfg": lambda: wan_case(5.0), "wan-plain": lambda: wan_case(1.0),
                               "sd3-cfg": sd3_case}[case]()
    sigma = torch.tensor([0.5])
    assert logged_rollout(policy, x, conditioning) == counted(policy, x, sigma, conditioning) > 0


def test_unknown_architectures_log_no_flops():
    policy = SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    x = torch.zeros(1, 4, 2)
    tree = SimpleNamespace(latents=[x], rollout_calls=1)
    assert phase_flops(policy, {"prompt_embeds": torch.zeros(1, 3, 2)}, tree, SimpleNamespace(training_forwards=1),
                       SimpleNamespace(update=SimpleNamespace(kl_coef=0.0))) is None
