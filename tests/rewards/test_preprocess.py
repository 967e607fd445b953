"""Tensor preprocessing vs the upstream processors.

* Images already at the model size: exact (float rounding) vs transformers' CLIP processor (PIL
  backend, as installed without torchvision) — no resize happens on either side.
* The resize path: bit-exact vs an explicit ``F.interpolate(bicubic, antialias=True,
  align_corners=False)`` + floor center crop (what transformers' torchvision backend and
  torchvision's tensor ``Resize`` run) and, where torchvision is installed, vs that backend itself.
* vs PIL resizing: within 2/255 per pixel on smooth images. Why not exact: PIL filters 8-bit
  images with fixed-point weights and rounds to 8 bits after each of its two separable passes
  (<= 0.5/255 each) and clamps overshoot; torch keeps float32. Smooth images keep bicubic
  overshoot (which PIL would clamp) out of the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from branchgrpo.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    center_crop_or_pad,
    longest_edge_size,
    shortest_edge_size,
)
from branchgrpo.rewards.tiny import write_clip_processor

STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)


def _uint8_images(n: int, h: int, w: int, seed: int = 0, smooth: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if smooth:
        low = torch.rand(n, 3, max(h // 8, 2), max(w // 8, 2), generator=gen)
        x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        return (x * 255).round().to(torch.uint8)
    return torch.randint(0, 256, (n, 3, h, w), generator=gen, dtype=torch.uint8)


def _pil(images_u8: torch.Tensor):
    from PIL import Image

    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images_u8]


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proc")
    write_clip_processor(folder, size=32)
    return folder


def _pil_processor(folder):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(str(folder))


def test_output_size_arithmetic():
    assert shortest_edge_size(720, 720, 224) == (224, 224)
    assert shortest_edge_size(512, 768, 224) == (224, 336)
    assert shortest_edge_size(768, 513, 224) == (int(224 * 768 / 513), 224)
    assert longest_edge_size(512, 768, 224) == (149, 224)
    assert longest_edge_size(3, 448, 224) == (2, 224)  # round(1.5) == 2


def test_exact_size_matches_transformers_pil_processor(processor_dir):
    images = _uint8_images(4, 32, 32)
    expected = _pil_processor(processor_dir)(images=_pil(images), return_tensors="pt")["pixel_values"]
    ours = ImagePreprocess.from_hf_config(processor_dir)(images.float() / 255.0)
    diff = (ours - expected).abs().max().item()
    print(f"exact-size vs CLIPImageProcessorPil: max diff {diff:.3g}")
    assert ours.shape == expected.shape == (4, 3, 32, 32)
    assert diff < 1e-5


@pytest.mark.parametrize("size", [(40, 56), (56, 40), (20, 27), (32, 47)])
def test_resize_path_is_torch_interpolate_antialias(processor_dir, size):
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    prep = ImagePreprocess.from_hf_config(processor_dir)
    h, w = shortest_edge_size(*size, 32)
    ref = F.interpolate(images, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (h - 32) // 2, (w - 32) // 2  # transformers: floor offsets
    ref = (ref[..., top : top + 32, left : left + 32] - MEAN) / STD
    assert torch.equal(prep(images), ref)


@pytest.mark.parametrize("size", [(40, 56), (20, 27), (32, 47), (96, 64)])
def test_resize_path_matches_torchvision_backend_exactly(processor_dir, size):
    pytest.importorskip("torchvision")
    from transformers import CLIPImageProcessor

    if not issubclass(CLIPImageProcessor, __import__("transformers").image_processing_backends.TorchvisionBackend):
        pytest.skip("this transformers has no torchvision-backed CLIPImageProcessor")
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2))
    processor = CLIPImageProcessor.from_pretrained(str(processor_dir))
    expected = processor(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
    ours = ImagePreprocess.from_hf_config(processor_dir)(images)
    diff = (ours - expected).abs().max().item()
    print(f"{size} vs torchvision-backed CLIPImageProcessor: max diff {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize("size", [(64, 80), (24, 24), (20, 36)])  # down, up, up + crop
def test_resize_path_close_to_pil_processor(processor_dir, size):
    images = _uint8_images(3, *size, seed=3, smooth=True)
    expected = _pil_processor(processor_dir)(images=_pil(images), return_tensors="pt")["pixel_values"]
    ours = ImagePreprocess.from_hf_config(processor_dir)(images.float() / 255.0)
    pixel_diff = ((ours - expected).abs() * STD).max().item() * 255
    print(f"{size} vs PIL processor: max diff {pixel_diff:.2f}/255")
    assert pixel_diff <= 2.0


def test_center_crop_rounding_conventions():
    x = torch.arange(35.0).view(1, 1, 1, 35).expand(1, 1, 32, 35)
    floor = center_crop_or_pad(x, (32, 32), "floor")
    rnd = center_crop_or_pad(x, (32, 32), "round")
    assert floor[0, 0, 0, 0] == 1  # (35 - 32) // 2
    assert rnd[0, 0, 0, 0] == 2  # round(1.5) as torchvision CenterCrop
    padded = center_crop_or_pad(torch.ones(1, 1, 20, 32), (32, 32))
    assert padded.shape[-2:] == (32, 32) and padded[0, 0, :6].sum() == 0 and padded[0, 0, 6:26].min() == 1


def test_longest_mode_matches_open_clip_transform():
    """HPSv2's preprocess (open_clip ``image_transform(..., resize_mode='longest')``, the
    open_clip 3 spelling of HPSv2's ``resize_longest_max=True``): exact where no resize happens
    (pure zero padding), within 2/255 where PIL resizes."""
    open_clip = pytest.importorskip("open_clip")
    from branchgrpo.rewards.hps import hps_preprocess

    transform = open_clip.image_transform(32, is_train=False, resize_mode="longest")
    prep = hps_preprocess(32)
    for size, tolerance in (((32, 20), 1e-5), ((20, 32), 1e-5), ((64, 40), 2.0 / 255), ((48, 80), 2.0 / 255)):
        images = _uint8_images(2, *size, seed=4, smooth=True)
        expected = torch.stack([transform(p) for p in _pil(images)])
        ours = prep(images.float() / 255.0)
        diff = ((ours - expected).abs() * STD).max().item()
        print(f"longest {size}: max diff {diff * 255:.3f}/255")
        assert ours.shape == expected.shape == (2, 3, 32, 32)
        assert diff <= tolerance


def test_from_hf_config_rejects_unsupported(tmp_path):
    with pytest.raises(ValueError, match="resample"):
        ImagePreprocess.from_hf_config({"size": {"shortest_edge": 8}, "crop_size": {"height": 8, "width": 8}, "resample": 1})
    assert np.isclose(ImagePreprocess.from_hf_config({"size": {"height": 8, "width": 6}}).resized_size(20, 30), (8, 6)).all()


def test_from_hf_config_reads_the_old_int_format():
    """openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14 ship ``"size": 224, "crop_size": 224``."""
    prep = ImagePreprocess.from_hf_config({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "resample": 3, "size": 224,
    })
    assert (prep.resize_mode, prep.size, prep.crop, prep.interpolation) == ("shortest", 224, (224, 224), "bicubic")
    assert prep(torch.rand(1, 3, 720, 1280)).shape == (1, 3, 224, 224)
