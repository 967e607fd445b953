"""The on-disk prompt-embedding cache, with a counting stand-in encoder (no model needed)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from branchgrpo.models import prompt_cache
from branchgrpo.models.prompt_cache import (
    PromptEmbeddingCache,
    cached_encode,
    encoder_identity,
    preprocess_prompts,
)


class CountingEncoder:
    """Deterministic per-prompt embeddings; records the prompts of every call."""

    def __init__(self, identity: str = "fake--0", dtype=torch.bfloat16):
        self.encoder_identity = identity
        self.calls: list[list[str]] = []
        self.dtype = dtype

    def encode_prompts_uncached(self, prompts):
        self.calls.append(list(prompts))
        rows = []
        for prompt in prompts:
            seed = int.from_bytes(prompt_cache.prompt_hash(prompt)[:8].encode(), "little") % 2**31
            rows.append(torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)))
        embeds = torch.stack(rows).to(self.dtype)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": embeds.float().mean(1).to(self.dtype)}


def test_identity_is_stable_folder_safe_and_sensitive():
    config = {"max_sequence_length": 512, "layers": [1, 2]}
    identity = encoder_identity("black-forest-labs/FLUX.1-dev", config)
    assert identity == encoder_identity("black-forest-labs/FLUX.1-dev", dict(reversed(list(config.items()))))
    assert "/" not in identity and identity.startswith("black-forest-labs_FLUX.1-dev--")
    assert identity != encoder_identity("/models/FLUX.1-dev", config)
    assert identity != encoder_identity("black-forest-labs/FLUX.1-dev", {**config, "max_sequence_length": 256})


def test_misses_are_encoded_in_batches_and_hits_are_identical(tmp_path):
    encoder = CountingEncoder()
    cache = PromptEmbeddingCache(tmp_path, encoder.encoder_identity)
    prompts = ["a", "b", "c", "a", "d", "e"]
    first = cached_encode(encoder, prompts, cache, batch_size=2)
    assert encoder.calls == [["a", "b"], ["c", "d"], ["e"]]  # unique prompts, in order
    direct = encoder.encode_prompts_uncached(prompts)
    for name in direct:
        assert first[name].dtype == torch.bfloat16
        assert torch.equal(first[name], direct[name])  # rows in prompt order, repeats included
    encoder.calls.clear()
    second = cached_encode(encoder, list(reversed(prompts)), cache, batch_size=2)
    assert encoder.calls == []
    for name in first:
        assert torch.equal(second[name], first[name].flip(0))


def test_files_are_safetensors_with_the_prompt_in_metadata(tmp_path):
    encoder = CountingEncoder(identity="enc--1")
    preprocess_prompts(encoder, ["a red car"], tmp_path)
    cache = PromptEmbeddingCache(tmp_path, "enc--1")
    path = cache.path("a red car")
    assert path.parent.parent == tmp_path / "enc--1" and path.suffix == ".safetensors"
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["prompt"] == "a red car"
        assert set(handle.keys()) == {"prompt_embeds", "pooled_prompt_embeds"}
        assert handle.get_tensor("prompt_embeds").shape == (5, 4)
    assert (tmp_path / "enc--1" / "identity.json").is_file()


def test_failed_write_leaves_no_entry_and_no_temporary(tmp_path, monkeypatch):
    encoder = CountingEncoder()
    cache = PromptEmbeddingCache(tmp_path, encoder.encoder_identity)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prompt_cache, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        cached_encode(encoder, ["x"], cache)
    monkeypatch.undo()
    assert "x" not in cache
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    cached_encode(encoder, ["x"], cache)
    assert "x" in cache


def test_corrupt_or_foreign_entries_are_recomputed(tmp_path):
    encoder = CountingEncoder()
    cache = PromptEmbeddingCache(tmp_path, encoder.encoder_identity)
    expected = cached_encode(encoder, ["x", "y"], cache)
    cache.path("x").write_bytes(b"not a safetensors file")
    cache.path("y").write_bytes(cache.path("x").read_bytes())
    cached_encode(encoder, ["z"], cache)
    cache.path("y").write_bytes(cache.path("z").read_bytes())  # an entry for another prompt
    encoder.calls.clear()
    again = cached_encode(encoder, ["x", "y"], cache)
    assert encoder.calls == [["x", "y"]]
    for name in expected:
        assert torch.equal(again[name], expected[name])


def test_preprocess_report_and_progress(tmp_path):
    encoder = CountingEncoder()
    seen = []
    report = preprocess_prompts(encoder, ["a", "b", "a", "c"], tmp_path, batch_size=2,
                                progress=lambda done, total: seen.append((done, total)))
    assert (report.prompts, report.unique_prompts, report.encoded, report.already_cached) == (4, 3, 3, 0)
    assert seen == [(0, 3), (2, 3), (3, 3)]
    assert report.cache_directory == tmp_path / encoder.encoder_identity
    again = preprocess_prompts(encoder, ["c", "d"], tmp_path)
    assert (again.encoded, again.already_cached) == (1, 1)
    with pytest.raises(ValueError, match="batch_size"):
        preprocess_prompts(encoder, ["a"], tmp_path, batch_size=0)


def test_other_identity_does_not_see_the_entries(tmp_path):
    first, second = CountingEncoder("enc--a"), CountingEncoder("enc--b")
    preprocess_prompts(first, ["a"], tmp_path)
    cached_encode(second, ["a"], PromptEmbeddingCache(tmp_path, second.encoder_identity))
    assert second.calls == [["a"]]
