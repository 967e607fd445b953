"""models/pretrained.py: the shared layout helpers against written-out layouts, and build_adapter's
loading order and text-encoder modes against a recording stand-in for PretrainedFolder."""

from contextlib import nullcontext

import pytest
import torch

from branchgrpo.models.loading import FLUX_FILES, FLUX_LAYOUT, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns

WEIGHTS = (("config.json",), ("*.safetensors",))


def test_diffusers_layout_is_the_written_out_layout():
    layout = diffusers_layout(["transformer", "vae", "text_encoder", "text_encoder_2"],
                              {"tokenizer": ("tokenizer.json", "vocab.json"),
                               "tokenizer_2": ("tokenizer.json", "spiece.model")})
    assert list(layout.items()) == [
        ("transformer", WEIGHTS), ("vae", WEIGHTS), ("text_encoder", WEIGHTS), ("text_encoder_2", WEIGHTS),
        ("tokenizer", (("tokenizer.json", "vocab.json"),)), ("tokenizer_2", (("tokenizer.json", "spiece.model"),)),
    ]
    assert layout == FLUX_LAYOUT  # loading.py writes FLUX.1's out by hand


def test_download_patterns_name_every_subfolder_after_the_extra_ones():
    layout = diffusers_layout(["transformer", "vae", "text_encoder"], {"tokenizer": ("tokenizer.json",)})
    assert download_patterns(layout) == ("model_index.json", "scheduler/*", "transformer/*", "vae/*",
                                         "text_encoder/*", "tokenizer/*")
    assert download_patterns(layout, ("scheduler", "guider"))[:3] == ("model_index.json", "scheduler/*", "guider/*")
    assert download_patterns(FLUX_LAYOUT, ()) == FLUX_FILES.download_patterns  # FLUX.1's, written out


class RecordingFolder:
    """PretrainedFolder's loading surface without files: ``model`` records what it is asked for."""

    initial_text_encoders = PretrainedFolder.initial_text_encoders
    adapter_kwargs = PretrainedFolder.adapter_kwargs

    def __init__(self, text_encoders: str):
        self.text_encoders = text_encoders
        self.source, self.device = "/models/x", torch.device("cpu")
        self.calls = []

    def model(self, cls, subfolder, dtype):
        self.calls.append((subfolder, cls, dtype))
        return f"{cls.__name__}@{subfolder}/{dtype}"

    def errors(self):
        return nullcontext()


class TextModel:
    pass


class Transformer:
    pass


def built(**kwargs):
    return kwargs


@pytest.mark.parametrize("mode", ["load", "lazy", "none"])
def test_build_adapter_loads_encoders_then_models_and_passes_the_rest(mode):
    folder = RecordingFolder(mode)
    out = build_adapter(
        folder, built, dtype=torch.bfloat16,
        text_encoders={"text_encoder": TextModel, "text_encoder_2": None},  # None: absent (SD3 without T5)
        models={"transformer": (Transformer, torch.bfloat16), "vae": None},  # None: not loaded
        encoder_config={"family": "x"}, max_sequence_length=77, tokenizer="tok", height=64,
    )
    loaded_now = [("text_encoder", TextModel, torch.bfloat16)] if mode == "load" else []
    assert folder.calls == loaded_now + [("transformer", Transformer, torch.bfloat16)]
    assert out["transformer"] == "Transformer@transformer/torch.bfloat16" and out["vae"] is None
    assert out["text_encoder"] == ("TextModel@text_encoder/torch.bfloat16" if mode == "load" else None)
    assert out["text_encoder_2"] is None
    assert (out["tokenizer"], out["height"], out["source"], out["max_sequence_length"]) == ("tok", 64, "/models/x", 77)
    assert out["encoder_config"] == {"family": "x"} and out["device"] == torch.device("cpu")
    if mode == "lazy":  # the loader the adapter calls on its first cache miss: the encoders in name order
        assert out["text_encoder_loader"]() == ("TextModel@text_encoder/torch.bfloat16", None)
    else:
        assert out["text_encoder_loader"] is None
