"""SD3.5's parameter count and forward FLOPs (branchgrpo.resources.sd3) against diffusers'
``SD3Transformer2DModel``: on the meta device for the hub config, tiny and random for the FLOP
counter."""

from __future__ import annotations

import pytest
import torch

from branchgrpo.resources import parameter_count
from branchgrpo.resources.sd3 import SD35_MEDIUM, SD3Architecture

diffusers = pytest.importorskip("diffusers")

TINY = {
    "w16-3-dual0": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                        pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,),
                        qk_norm="rms_norm"),
    "w24-2-plain": dict(sample_size=8, patch_size=2, in_channels=8, num_layers=2, attention_head_dim=8,
                        num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24,
                        pooled_projection_dim=6, out_channels=8, pos_embed_max_size=16, dual_attention_layers=(),
                        qk_norm=None),
}


@pytest.mark.parametrize("config", [SD35_MEDIUM, *TINY.values()], ids=["sd3.5-medium", *TINY])
def test_parameter_count_equals_the_diffusers_class(config):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = diffusers.SD3Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert parameter_count(SD3Architecture(dict(config))) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("height,width,text", [(32, 32, 5), (32, 64, 7)])
def test_forward_flops_match_torch_flop_counter(name, height, width, text):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    config = TINY[name]
    model = diffusers.SD3Transformer2DModel(**config).eval()
    arch = SD3Architecture(config)
    x = torch.randn(1, arch.in_channels, height // 8, width // 8)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=x, encoder_hidden_states=torch.randn(1, text, arch.joint_dim),
              pooled_projections=torch.randn(1, arch.pooled_dim), timestep=torch.tensor([500]))
    image = arch.image_tokens(height, width)
    assert image == (height // 16) * (width // 16)
    assert counter.get_total_flops() == arch.forward_flops(image, text)
