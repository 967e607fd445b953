"""ImageReward on transformers' BLIP vs the upstream ``image-reward`` package's own code.

The upstream comparison needs the package (``pip install --no-deps image-reward==1.5
fairscale==0.4.13`` beside ``timm`` and torchvision) and is skipped without it. Upstream
``med.py`` was written for transformers 4.x; five names that transformers 5 dropped are put back
(:func:`_compat_shims`: two re-exports from ``transformers.pytorch_utils``, and ``init_weights``,
``invert_attention_mask``, ``get_head_mask`` with their transformers-4 bodies). The model code
that computes the score — BLIP's ViT, the BERT layers with cross-attention, the MLP head,
``ImageReward.score`` with its mean/std — is upstream's, unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from branchgrpo.rewards import CheckpointError, build_reward
from branchgrpo.rewards.imagereward import ImageRewardModel, map_upstream_key, unmap_key
from branchgrpo.rewards.tiny import tiny_imagereward_config, tiny_reward_spec, write_bert_vocab

PROMPTS = ["a photo of a cat", "a red car on the road", "a photo of a cat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_reward_spec("imagereward", tmp_path_factory.mktemp("ir"))


def _images(seed: int, size=(224, 224), n=3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *size), generator=gen).float() / 255.0


def test_key_mapping_round_trip():
    model = ImageRewardModel(**{"vision_config": tiny_imagereward_config(50)["vision_config"],
                                "med_config": tiny_imagereward_config(50)["med_config"]})
    for key in model.state_dict():
        if key == "text.embeddings.position_ids":
            continue
        assert map_upstream_key(unmap_key(key)) == key
    assert map_upstream_key("blip.vision_proj.weight") is None
    assert map_upstream_key("blip.visual_encoder.blocks.3.attn.qkv.weight") == "vision.encoder.layers.3.self_attn.qkv.weight"


def test_scores_batched_and_deterministic(tiny):
    torch.set_num_threads(1)
    reward = tiny.build()
    images = _images(0)
    full = reward(images, PROMPTS)
    assert full.shape == (3,) and full.dtype == torch.float32
    singles = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(full, singles, atol=1e-5, rtol=0)
    assert not torch.allclose(full[0], full[1])


def test_missing_tokenizer_and_wrong_checkpoint(tiny, tmp_path):
    opts = {k: v for k, v in tiny.options.items() if k != "tokenizer"}
    with pytest.raises(CheckpointError, match="tokenizer"):
        build_reward("imagereward", tiny.checkpoint, **opts)
    with pytest.raises(CheckpointError, match=r"missing\.pt.*does not exist"):
        build_reward("imagereward", str(tmp_path / "missing.pt"), **tiny.options)
    # a checkpoint of another architecture (one ViT block fewer than configured)
    state = torch.load(tiny.checkpoint, weights_only=True)
    bad = {k: v for k, v in state.items() if ".blocks.1." not in k}
    torch.save(bad, tmp_path / "truncated.pt")
    with pytest.raises(CheckpointError, match=r"truncated\.pt.*missing keys.*vision\.encoder\.layers\.1"):
        build_reward("imagereward", str(tmp_path / "truncated.pt"), **tiny.options)


# --------------------------------------------------------------------------------------------
# upstream reference


def _compat_shims(med) -> None:
    """transformers-4 names that upstream med.py uses and transformers 5 removed."""
    med.BertModel.init_weights = lambda self: self.apply(self._init_weights)

    def invert_attention_mask(self, mask):  # transformers 4.x ModuleUtilsMixin.invert_attention_mask
        ext = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]
        ext = ext.to(dtype=self.dtype)
        return (1.0 - ext) * torch.finfo(self.dtype).min

    med.BertModel.invert_attention_mask = invert_attention_mask
    med.BertModel.get_head_mask = lambda self, head_mask, num_layers, *a, **k: [None] * num_layers


def _load_upstream():
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("upstream image-reward package not installed")
    pytest.importorskip("timm")
    pytest.importorskip("fairscale")
    pytest.importorskip("torchvision")
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        mu.find_pruneable_heads_and_indices = None  # only used by prune_heads
    root = Path(list(spec.submodule_search_locations)[0])
    # import the model modules without ImageReward/__init__.py (it imports the CLIP/aesthetic
    # baselines, which need the `clip` package, and ReFL, which needs diffusers training parts)
    for name, path in (("_ir_upstream", root), ("_ir_upstream.models", root / "models"),
                       ("_ir_upstream.models.BLIP", root / "models" / "BLIP")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
    upstream = importlib.import_module("_ir_upstream.ImageReward")
    med = importlib.import_module("_ir_upstream.models.BLIP.med")
    vit = importlib.import_module("_ir_upstream.models.BLIP.vit")
    _compat_shims(med)
    return upstream, med, vit


def test_matches_upstream_imagereward(tmp_path, monkeypatch):
    """Upstream ``ImageReward.score(prompt, image_path)`` on PNG files vs our batched tensor call.

    Weights: the upstream model's own random init, saved as ``ImageReward.pt`` (upstream key
    layout) and loaded by ours through the key mapping. Images are 224x224 (the model size), so
    upstream's PIL resize is the identity and the comparison is exact up to float rounding.
    """
    torch.set_num_threads(1)
    upstream, med, vit = _load_upstream()
    from PIL import Image
    from transformers import BertTokenizer

    vocab_size = write_bert_vocab(tmp_path / "tokenizer")
    cfg = tiny_imagereward_config(vocab_size)
    vcfg, tcfg = cfg["vision_config"], cfg["med_config"]

    class TinyBlipPretrain(torch.nn.Module):  # BLIP_Pretrain.__init__ with a tiny ViT and BERT
        def __init__(self, image_size=224, vit_name="large", med_config=None):
            super().__init__()
            self.visual_encoder = vit.VisionTransformer(
                img_size=image_size, patch_size=vcfg["patch_size"], embed_dim=vcfg["hidden_size"],
                depth=vcfg["num_hidden_layers"], num_heads=vcfg["num_attention_heads"])
            tokenizer = BertTokenizer.from_pretrained(str(tmp_path / "tokenizer"))  # init_tokenizer, offline
            tokenizer.add_special_tokens({"bos_token": "[DEC]"})
            tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
            self.tokenizer = tokenizer
            config = med.BertConfig(
                vocab_size=tcfg["vocab_size"], hidden_size=tcfg["hidden_size"], num_hidden_layers=tcfg["num_hidden_layers"],
                num_attention_heads=tcfg["num_attention_heads"], intermediate_size=tcfg["intermediate_size"],
                max_position_embeddings=tcfg["max_position_embeddings"], add_cross_attention=True,
                layer_norm_eps=1e-12, hidden_act="gelu")
            config.encoder_width = vcfg["hidden_size"]
            self.text_encoder = med.BertModel(config=config, add_pooling_layer=False)
            self.vision_proj = torch.nn.Linear(vcfg["hidden_size"], 256)
            self.text_proj = torch.nn.Linear(tcfg["hidden_size"], 256)

    monkeypatch.setattr(upstream, "BLIP_Pretrain", lambda image_size, vit, med_config: TinyBlipPretrain(image_size))
    torch.manual_seed(0)
    reference = upstream.ImageReward(med_config=None, device="cpu").eval()
    with torch.no_grad():  # upstream's MLP init (std 1/769) makes scores nearly constant; spread them
        for p in reference.mlp.parameters():
            p.normal_(0.0, 0.05)
    torch.save(reference.state_dict(), tmp_path / "ImageReward.pt")

    ours = build_reward("imagereward", str(tmp_path / "ImageReward.pt"), tokenizer=str(tmp_path / "tokenizer"), **cfg)
    images = _images(1)
    expected = []
    for i, prompt in enumerate(PROMPTS):
        array = (images[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        file = tmp_path / f"img{i}.png"
        Image.fromarray(array).save(file)
        with torch.no_grad():
            expected.append(reference.score(prompt, str(file)))
    expected = torch.tensor(expected, dtype=torch.float32)
    got = ours(images, PROMPTS)
    diff = (got - expected).abs().max().item()
    print(f"imagereward max |ours - upstream| = {diff:.3g} (scores {expected.tolist()})")
    assert expected.std() > 1e-3  # the comparison is not between constants
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_resize_path_close_to_upstream_pil(tmp_path, monkeypatch):
    """A smooth 256x320 image through upstream's PIL Resize(224)+CenterCrop(224) and through our
    tensor resize. PIL filters 8-bit pixels with fixed-point weights and rounds to 8 bits after the
    horizontal and after the vertical pass (<= 0.5/255 each) and clamps; torch keeps floats. On a
    smooth image (no ringing to clamp) that bounds the difference by ~1-2/255; allow 3/255."""
    torch.set_num_threads(1)
    upstream, _, _ = _load_upstream()
    from PIL import Image

    from branchgrpo.rewards.preprocess import ImagePreprocess

    gen = torch.Generator().manual_seed(3)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 20, generator=gen), size=(256, 320), mode="bilinear")
    array = (smooth[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil_pixels = upstream._transform(224)(Image.fromarray(array))
    ours = ImagePreprocess(size=224, crop=(224, 224), resize_mode="shortest", crop_rounding="round")(
        torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0)[0]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    pixel_diff = ((ours - pil_pixels).abs() * std).max().item() * 255
    print(f"imagereward preprocess: max |ours - upstream PIL| = {pixel_diff:.2f}/255")
    assert np.isfinite(pixel_diff) and pixel_diff <= 3.0
