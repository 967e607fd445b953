"""Tiny, randomly initialised checkpoints of every reward's real architecture, in the real file
formats (for tests, the throughput benchmark and trying the plumbing without downloads).

:func:`tiny_reward_spec` writes the files under a folder and returns the :class:`RewardSpec`
that loads them. Scores of these models mean nothing; shapes, file layouts, key names,
preprocessing and scoring formulas are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from branchgrpo.rewards.registry import RewardSpec

TINY_IMAGE_SIZE = 32
WORDS = ("a", "an", "the", "photo", "of", "cat", "dog", "red", "blue", "car", "handwritten", "digit", "on", "in")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(folder: Path) -> int:
    """A tiny byte-level CLIP BPE tokenizer (all bytes + a few merged words); returns its size."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merges.append(f"{a} {b}")
            merged = a + b
            if merged not in vocab:
                vocab[merged] = len(vocab)
            pieces = [merged] + pieces[2:]
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(str(folder))
    return len(vocab)


def write_clip_processor(folder: Path, size: int = TINY_IMAGE_SIZE) -> None:
    """``preprocessor_config.json`` of a CLIP processor (CLIPImageProcessor defaults, smaller size)."""
    config = {
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def write_tiny_clip(folder: Path, seed: int = 0, projection_dim: int = 16, logit_scale: float = 2.6592) -> Path:
    """A transformers CLIP folder: tiny CLIPModel (safetensors) + tokenizer + processor config."""
    from transformers import CLIPConfig, CLIPModel

    vocab_size = write_clip_tokenizer(folder)
    write_clip_processor(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=projection_dim),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=projection_dim),
        projection_dim=projection_dim, logit_scale_init_value=logit_scale,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_tiny_aesthetic_head(path: Path, input_size: int = 16, seed: int = 0) -> Path:
    """The aesthetic MLP head (real layer sizes 1024/128/64/16) as a torch pickle state dict."""
    from branchgrpo.rewards.clip_rewards import AestheticMLP

    torch.manual_seed(seed)
    head = AestheticMLP(input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), str(path))
    return path


BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_bert_vocab(folder: Path) -> int:
    """A tiny bert-base-uncased-style ``vocab.txt`` (specials, letters, ##letters, a few words)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = BERT_SPECIAL + list(WORDS) + letters + ["##" + c for c in letters] + [",", ".", "!", "?", "'"]
    tokens = list(dict.fromkeys(tokens))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return len(tokens)


def tiny_imagereward_config(vocab_size: int) -> dict[str, Any]:
    """Options of ``ImageReward`` for the tiny checkpoint (``vision_config`` + ``med_config``).

    Text width stays 768 (ImageReward's MLP head is ``MLP(768)`` upstream) and the image size
    224 (upstream ``_transform(224)``), so the upstream code can score the same checkpoint; depth
    and the ViT width are tiny.
    """
    return {
        "vision_config": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "image_size": 224, "patch_size": 16},
        "med_config": {"hidden_size": 768, "num_hidden_layers": 2, "num_attention_heads": 12, "intermediate_size": 128,
                       "max_position_embeddings": 40, "vocab_size": vocab_size + 2},  # + [DEC], [ENC]
    }


def write_tiny_imagereward(folder: Path, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """``ImageReward.pt`` in the upstream key layout (``blip.*``, ``mlp.*``) + a tokenizer folder."""
    from branchgrpo.rewards.imagereward import ImageRewardModel, unmap_key

    vocab_size = write_bert_vocab(folder / "tokenizer")
    options = tiny_imagereward_config(vocab_size)
    torch.manual_seed(seed)
    model = ImageRewardModel(options["vision_config"], options["med_config"])
    with torch.no_grad():  # BLIP inits the cls/position embeddings with randn; keep every tensor O(1)
        for p in list(model.vision.parameters()) + list(model.text.parameters()):
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    state = {unmap_key(k): v for k, v in model.state_dict().items() if k != "text.embeddings.position_ids"}
    state["blip.vision_proj.weight"] = torch.randn(8, 48)  # unused upstream parts the real file also holds
    state["blip.text_proj.weight"] = torch.randn(8, 768)
    path = folder / "ImageReward.pt"
    torch.save(state, str(path))
    return path, {"tokenizer": str(folder / "tokenizer"), **options}


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_tiny_hps(folder: Path, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """An HPS-style checkpoint ``{"state_dict": ...}`` of a tiny open_clip CLIP + its config JSON."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "open_clip_config.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP, indent=2))
    path = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, str(path))
    return path, {"model_config": str(config)}


def tiny_reward_spec(name: str, folder: str | Path, seed: int = 0, **spec: Any) -> RewardSpec:
    """Write tiny checkpoint files of reward ``name`` under ``folder``; the spec that loads them."""
    folder = Path(folder) / name
    if name == "pickscore":
        write_tiny_clip(folder, seed=seed)
        return RewardSpec(name, checkpoint=str(folder), **spec)
    if name == "clip":
        write_tiny_clip(folder, seed=seed)
        return RewardSpec(name, checkpoint=str(folder), **spec)
    if name == "aesthetic":
        write_tiny_clip(folder / "clip", seed=seed)
        head = write_tiny_aesthetic_head(folder / "sac+logos+ava1-l14-linearMSE.pth", seed=seed)
        return RewardSpec(name, checkpoint=str(head), options={"clip_model": str(folder / "clip")}, **spec)
    if name == "imagereward":
        path, options = write_tiny_imagereward(folder, seed=seed)
        return RewardSpec(name, checkpoint=str(path), options=options, **spec)
    if name == "hps":
        path, options = write_tiny_hps(folder, seed=seed)
        return RewardSpec(name, checkpoint=str(path), options=options, **spec)
    if name == "digits":
        return RewardSpec(name, **spec)
    raise ValueError(f"no tiny checkpoint for reward {name!r}")


QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL-Instruct's chat template as published with the model (its tokenizer_config.json).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def write_qwen_tokenizer(folder: Path):
    """A tiny byte-level BPE tokenizer (256 bytes, no merges) with Qwen2-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL[1:])})
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_qwen2vl_config(tokenizer, vocab_size: int) -> dict[str, Any]:
    """A 2-layer Qwen2-VL config (hidden 32, vision depth 2) whose token ids match ``tokenizer``."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "model_type": "qwen2_vl", "vocab_size": vocab_size,
        "image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>"),
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": ids("<|im_end|>"),
        "text_config": {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "pad_token_id": tokenizer.pad_token_id,
                        "bos_token_id": tokenizer.pad_token_id, "eos_token_id": ids("<|im_end|>"),
                        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
    }


def write_tiny_qwen_reward(folder: Path, special_tokens: tuple[str, ...], head: str, seed: int = 0):
    """A tiny Qwen2-VL reward model in the authors' layout: ``config.json`` + tokenizer in ``folder``
    and the state dict (``model.*``, ``visual.*``, ``lm_head.*``, ``rm_head.*``) returned.

    ``head``: ``"ranknet"`` (HPSv3: Linear 1024→16→2 shape pattern, shrunk to 24→8→2) or
    ``"linear"`` (VideoAlign: one bias-free Linear to 1)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = write_qwen_tokenizer(folder)
    vocab_size = len(tokenizer) + len(special_tokens)
    config = tiny_qwen2vl_config(tokenizer, vocab_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config))
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        state[key] = value.detach().clone().contiguous()
    hidden = config["text_config"]["hidden_size"]
    if head == "ranknet":
        layers = {0: torch.nn.Linear(hidden, 24), 3: torch.nn.Linear(24, 8), 5: torch.nn.Linear(8, 2)}
        for index, layer in layers.items():
            state[f"rm_head.{index}.weight"] = layer.weight.detach().clone()
            state[f"rm_head.{index}.bias"] = layer.bias.detach().clone()
    else:
        state["rm_head.weight"] = torch.nn.Linear(hidden, 1, bias=False).weight.detach().clone()
    return state
