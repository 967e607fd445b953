"""Qwen-Image's parameter count and forward FLOPs (branchgrpo.resources.qwenimage) against
diffusers' ``QwenImageTransformer2DModel``: on the meta device for the hub config, tiny and random
for the FLOP counter."""

from __future__ import annotations

import pytest
import torch

from branchgrpo.resources import parameter_count
from branchgrpo.resources.qwenimage import QWEN_IMAGE, QwenImageArchitecture

diffusers = pytest.importorskip("diffusers")

TINY = {
    "w16-2": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4)),
    "w24-1": dict(patch_size=2, in_channels=32, out_channels=8, num_layers=1, attention_head_dim=8,
                  num_attention_heads=3, joint_attention_dim=20, axes_dims_rope=(2, 2, 4)),
}


@pytest.mark.parametrize("config", [QWEN_IMAGE, *TINY.values()], ids=["qwen-image", *TINY])
def test_parameter_count_equals_the_diffusers_class(config):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = diffusers.QwenImageTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert parameter_count(QwenImageArchitecture(dict(config))) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("height,width,text", [(32, 32, 5), (32, 64, 7)])
def test_forward_flops_match_torch_flop_counter(name, height, width, text):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(**TINY[name]).eval()
    arch = QwenImageArchitecture(TINY[name])
    image = arch.image_tokens(height, width)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=torch.randn(1, image, arch.in_channels),
              encoder_hidden_states=torch.randn(1, text, arch.joint_dim),
              encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.long), timestep=torch.tensor([0.5]),
              img_shapes=[(1, height // 16, width // 16)])
    assert counter.get_total_flops() == arch.forward_flops(image, text)
