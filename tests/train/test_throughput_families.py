"""Per-phase FLOPs (``throughput/*``, src/branchgrpo/train/metrics.py ``phase_flops``) beyond FLUX.1:
the rollout FLOPs the trainer logs for one rollout row equal what torch's FLOP counter sees when
the real adapter runs that row — Qwen-Image and Qwen-Image-Edit with true CFG (two transformer rows
per sample, the source's tokens in the image stream), Wan's video latents in 3-D patches, SD3.5's
``[B, C, H, W]`` latents with true CFG, Z-Image's per-caption lengths padded to 32 (with CFG, the
negative caption at its own length), HunyuanVideo 1.5's three-part context behind its input wrapper."""

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


def zimage_case(guidance: float):
    """One prompt whose caption is 5 of 40 tokens and, under CFG, a negative caption of 20 (both
    padded to 32 by the transformer, so the batched CFG call pads neither further); a 6×8 latent
    in 2×2 patches: 12 image tokens → 32."""
    from branchgrpo.models.zimage import ZImageVelocity

    torch.manual_seed(0)
    model = diffusers.ZImageTransformer2DModel(all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=32,
                                               n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                               cap_feat_dim=12, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32]).eval()
    gen = torch.Generator().manual_seed(1)

    def mask(n):
        return (torch.arange(40) < n).unsqueeze(0)

    conditioning = {"prompt_embeds": torch.randn(1, 40, 12, generator=gen), "prompt_mask": mask(5),
                    "negative_prompt_embeds": torch.randn(1, 40, 12, generator=gen), "negative_prompt_mask": mask(20)}
    return ZImageVelocity(model, guidance_scale=guidance), torch.randn(1, 4, 6, 8, generator=gen), conditioning


def hunyuan_case(guidance: float):
    """The adapter's velocity (``TextToVideoInputs`` wrapper: zero condition channels, 729 masked
    image-embedding tokens) with padded Qwen and ByT5 masks, with and without CFG."""
    from branchgrpo.models.hunyuanvideo15 import HunyuanVideo15Velocity

    torch.manual_seed(0)
    model = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_refiner_layers=1, mlp_ratio=4.0, patch_size=1, patch_size_t=1, text_embed_dim=12, text_embed_2_dim=10,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6), task_type="t2v").eval()
    gen = torch.Generator().manual_seed(1)
    half = (torch.arange(6) < 3).float().unsqueeze(0)
    conditioning = {"prompt_embeds": torch.randn(1, 6, 12, generator=gen), "prompt_embeds_mask": half,
                    "prompt_embeds_2": torch.randn(1, 4, 10, generator=gen), "prompt_embeds_mask_2": torch.ones(1, 4)}
    conditioning |= {f"negative_{k}": v.clone() for k, v in conditioning.items()}
    return HunyuanVideo15Velocity(model, guidance_scale=guidance), torch.randn(1, 4, 2, 3, 4, generator=gen), conditioning


CASES = {"qwenimage": lambda: qwen_case(False), "qwenimage-edit": lambda: qwen_case(True),
         "wan-cfg": lambda: wan_case(5.0), "wan-plain": lambda: wan_case(1.0), "sd3-cfg": sd3_case,
         "zimage-plain": lambda: zimage_case(0.0), "zimage-cfg": lambda: zimage_case(4.0),
         "hunyuanvideo15-plain": lambda: hunyuan_case(1.0), "hunyuanvideo15-cfg": lambda: hunyuan_case(6.0)}


@pytest.mark.parametrize("case", list(CASES))
def test_logged_rollout_flops_equal_the_flop_counter_on_the_real_adapter(case):
    policy, x, conditioning = CASES[case]()
    sigma = torch.tensor([0.5])
    assert logged_rollout(policy, x, conditioning) == counted(policy, x, sigma, conditioning) > 0


def test_unknown_architectures_log_no_flops():
    policy = SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    x = torch.zeros(1, 4, 2)
    tree = SimpleNamespace(latents=[x], rollout_calls=1)
    assert phase_flops(policy, {"prompt_embeds": torch.zeros(1, 3, 2)}, tree, SimpleNamespace(training_forwards=1),
                       SimpleNamespace(update=SimpleNamespace(kl_coef=0.0))) is None


def test_zimage_prompts_are_counted_at_their_own_padded_caption_lengths():
    """Two prompts (5 and 37 caption tokens → 32 and 64 after padding), one row each: the logged
    rollout is the two rows' FLOPs as each runs alone (a batched call would pad the shorter one to
    the longer, work that is not counted), and differs from counting both at one length."""
    policy, x, conditioning = zimage_case(0.0)
    both = {"prompt_embeds": torch.cat([conditioning["prompt_embeds"], conditioning["negative_prompt_embeds"]]),
            "prompt_mask": torch.cat([conditioning["prompt_mask"], torch.arange(40).unsqueeze(0) < 37])}
    sigma = torch.tensor([0.5])
    alone = [counted(policy, x, sigma, {k: v[i:i + 1] for k, v in both.items()}) for i in range(2)]
    assert alone[0] < alone[1]
    tree = SimpleNamespace(latents=[x], rollout_calls=2)
    logged = phase_flops(policy, both, tree, SimpleNamespace(training_forwards=0),
                         SimpleNamespace(update=SimpleNamespace(kl_coef=0.0)))["rollout"]
    assert logged == sum(alone)
