"""Wan 2.1's parameter count and forward FLOPs (branchgrpo.resources.wan) against diffusers'
``WanTransformer3DModel``: built on the meta device for the hub config, tiny and random for the
FLOP counter."""

from __future__ import annotations

import pytest
import torch

from branchgrpo.resources import parameter_count
from branchgrpo.resources.wan import WAN21_T2V_1_3B, WanArchitecture

diffusers = pytest.importorskip("diffusers")

TINY = {
    "w16-1": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                  text_dim=12, freq_dim=16, ffn_dim=40, num_layers=1, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    "w24-2-nonorm": dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=8, in_channels=8,
                         out_channels=4, text_dim=20, freq_dim=32, ffn_dim=56, num_layers=2, cross_attn_norm=False,
                         qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
}


def _meta_count(config: dict) -> int:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = diffusers.WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [WAN21_T2V_1_3B, *TINY.values()], ids=["wan2.1-1.3b", *TINY])
def test_parameter_count_equals_the_diffusers_class(config):
    assert parameter_count(WanArchitecture(dict(config))) == _meta_count(config)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("frames,height,width,text", [(1, 32, 32, 5), (5, 32, 48, 7)])
def test_forward_flops_match_torch_flop_counter(name, frames, height, width, text):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY[name]).eval()
    arch = WanArchitecture(TINY[name])
    latent_frames = (frames - 1) // 4 + 1
    x = torch.randn(1, arch.in_channels, latent_frames, height // 8, width // 8)
    # the math backend: attention as matmuls the counter sees (QKᵀ, AV)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, text, arch.text_dim))
    image = arch.image_tokens(frames, height, width)
    assert image == latent_frames * (height // 16) * (width // 16)
    assert counter.get_total_flops() == arch.forward_flops(image, text)
