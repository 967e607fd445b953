"""Text-rendering reward (``ocr``): 1 − normalised edit distance to the quoted text, as Flow-GRPO.

Definition (Flow-GRPO, github.com/yifan123/flow_grpo, ``flow_grpo/ocr.py`` ``OcrScorer.__call__``
and ``flow_grpo/rewards.py`` ``ocr_score``, commit ac4c86e):

* target: ``prompt.split('"')[1]`` — the text after the first ASCII double quote, up to the next
  one (or to the end of the prompt when there is only one quote); a prompt without a double quote
  raises there (``IndexError``), and here is a :class:`RewardError` unless ``unquoted="prompt"``.
* images: ``round(x * 255)`` as ``uint8`` HWC arrays in RGB order, handed to the engine as arrays
  (PaddleOCR and RapidOCR both read an array as BGR; Flow-GRPO passes RGB, and so do we).
* recognised text: the texts of all detected lines (top to bottom, left to right) with a
  confidence ``> 0`` that the engine kept (its drop threshold, 0.5), concatenated without separator.
* both strings: every ``" "`` removed (only the space character), then ``str.lower()``.
* ``d = 0`` if the target is a substring of the recognised text, else ``Levenshtein(recognised,
  target)``; ``d = min(d, len(target))``; ``reward = 1 - d / len(target)`` in ``[0, 1]``.
  A blank image scores 0. An empty target divides by zero there; here it is a :class:`RewardError`.

The engine here is RapidOCR (``rapidocr-onnxruntime``, Apache-2.0): PaddleOCR's PP-OCRv4 detector
and recogniser converted to ONNX and shipped inside its wheel, so it runs offline. Flow-GRPO used
PaddleOCR 2.9.1 (``lang="en"``, no angle classifier); its default settings that matter are kept
(``det_limit_side_len=960``, ``det_limit_type="max"``, drop score 0.5, no classifier), but
RapidOCR's recogniser is the Chinese+English PP-OCRv4 model, so recognised strings can differ from
Flow-GRPO's on hard images. Flow-GRPO scores an image whose OCR raises as 0; here that is an error.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from branchgrpo.rewards.base import Reward, RewardError, is_finite_number

UNQUOTED = ("error", "prompt")
# Flow-GRPO ran PaddleOCR with these (its defaults, tools/infer/utility.py); RapidOCR's own
# defaults differ (limit_type "min", 736, angle classifier on).
ENGINE_DEFAULTS: dict[str, Any] = {"use_cls": False, "det_limit_side_len": 960, "det_limit_type": "max"}
# engine settings that have their own option here
_OWN_OPTIONS = {"text_score": "min_confidence", "intra_op_num_threads": "num_threads",
                "inter_op_num_threads": "num_threads"}


def quoted_text(prompt: str) -> str | None:
    """The text to render: after the first ``"`` up to the next (or the end); None without one."""
    parts = prompt.split('"')
    return parts[1] if len(parts) > 1 else None


def normalize_text(text: str) -> str:
    """Flow-GRPO's normalisation: spaces removed, lower case (other whitespace is kept)."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit insertions, deletions and substitutions (two-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(recognized: str, target: str) -> float:
    """``1 - min(d, len(t)) / len(t)`` with ``d = 0`` if ``t`` occurs in the recognised text, else
    their edit distance; both strings normalised first (:func:`normalize_text`).

    Raises ValueError when the target is empty after normalisation.
    """
    recognized, target = normalize_text(recognized), normalize_text(target)
    if not target:
        raise ValueError("the target text is empty after removing spaces")
    distance = 0 if target in recognized else levenshtein(recognized, target)
    return 1.0 - min(distance, len(target)) / len(target)


def _load_engine_class():
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as err:
        raise RewardError(
            "reward 'ocr' needs rapidocr-onnxruntime, which is not installed; "
            "install it with: pip install 'branchgrpo[ocr]' (or pip install rapidocr-onnxruntime)"
        ) from err
    return RapidOCR


def _engine_option_names() -> set[str]:
    """The keyword arguments ``RapidOCR(**kwargs)`` understands, from its shipped config.yaml."""
    from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
    from rapidocr_onnxruntime.utils import read_yaml

    config = read_yaml(str(DEFAULT_CFG_PATH))
    names = set(config["Global"]) | {f"det_{k}" for k in config["Det"]} | {"det_donot_use_dilation", "rec_keys_path"}
    for section, prefix in (("Cls", "cls_"), ("Rec", "rec_")):
        names |= {k if k.startswith(prefix) else prefix + k for k in config[section]}
    return names


class OCRReward(Reward):
    """Flow-GRPO's text-rendering reward on RapidOCR (PP-OCRv4 ONNX, CPU); see the module docstring.

    Args:
        checkpoint: must be None (the models ship in the rapidocr-onnxruntime wheel; other ONNX
            models go in ``engine_options``, e.g. ``det_model_path``, ``rec_model_path``,
            ``rec_keys_path``).
        device, dtype: accepted for the common reward signature; the engine runs on ONNX Runtime
            (CPU unless ``engine_options`` turns on e.g. ``det_use_cuda`` with onnxruntime-gpu),
            and scores come back on the images' device.
        min_confidence: recognised lines below this confidence are dropped (the engine's
            ``text_score``; PaddleOCR's ``drop_score`` is 0.5 too).
        num_threads: ONNX Runtime intra-op threads per model; None lets ONNX Runtime choose.
        unquoted: a prompt without ``"``: ``"error"`` (Flow-GRPO fails on it) or ``"prompt"``
            (the whole prompt is the target, as some later ports do).
        engine_options: more ``RapidOCR(**options)`` settings, over :data:`ENGINE_DEFAULTS`.
    """

    name = "ocr"
    modality = "image"
    needs_checkpoint = False
    input_channels = 3

    def __init__(
        self,
        checkpoint: Any = None,
        *,
        device: Any = "cpu",
        dtype: Any = "float32",
        min_confidence: float = 0.5,
        num_threads: int | None = None,
        unquoted: Literal["error", "prompt"] = "error",
        engine_options: Mapping[str, Any] | None = None,
    ):
        super().__init__(device, dtype)
        if checkpoint is not None:
            raise RewardError(
                "reward 'ocr' takes no checkpoint (its models ship in rapidocr-onnxruntime); "
                "to use other ONNX models pass engine_options={'det_model_path': ..., 'rec_model_path': ...}"
            )
        if not is_finite_number(min_confidence) or not 0.0 <= min_confidence <= 1.0:
            raise RewardError(f"reward 'ocr': min_confidence must be a number in [0, 1], got {min_confidence!r}")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise RewardError(f"reward 'ocr': num_threads must be a positive integer or None, got {num_threads!r}")
        if unquoted not in UNQUOTED:
            raise RewardError(f"reward 'ocr': unquoted must be one of {', '.join(UNQUOTED)}, got {unquoted!r}")
        engine_class = _load_engine_class()
        options = dict(ENGINE_DEFAULTS)
        options.update(self._check_engine_options(engine_options))
        options["text_score"] = float(min_confidence)
        if num_threads is not None:
            options["intra_op_num_threads"] = options["inter_op_num_threads"] = num_threads
        self.min_confidence = float(min_confidence)
        self.unquoted = unquoted
        self.engine_options = options
        self.engine = engine_class(**options)

    @staticmethod
    def _check_engine_options(engine_options: Mapping[str, Any] | None) -> dict[str, Any]:
        if engine_options is None:
            return {}
        if not isinstance(engine_options, Mapping):
            raise RewardError(f"reward 'ocr': engine_options must be a mapping, got {type(engine_options).__name__}")
        known = _engine_option_names()
        for key in engine_options:
            if key in _OWN_OPTIONS:
                raise RewardError(
                    f"reward 'ocr': set {key!r} with the option {_OWN_OPTIONS[key]!r}, not in engine_options"
                )
            if key not in known:
                raise RewardError(
                    f"reward 'ocr': unknown engine option {key!r}; RapidOCR knows: {', '.join(sorted(known))}"
                )
        return dict(engine_options)

    def targets(self, prompts: list[str]) -> list[str]:
        """The text each prompt asks for (see the module docstring); errors name the prompt."""
        targets = []
        for index, prompt in enumerate(prompts):
            target = quoted_text(prompt)
            if target is None:
                if self.unquoted == "error":
                    raise RewardError(
                        f"reward 'ocr': prompt {index} has no text in double quotes ({prompt[:80]!r}); "
                        'put the text to render in "..." or build the reward with unquoted="prompt"'
                    )
                target = prompt
            if not normalize_text(target):
                raise RewardError(
                    f"reward 'ocr': prompt {index} asks for no text (empty after removing spaces): {prompt[:80]!r}"
                )
            targets.append(target)
        return targets

    def recognize(self, image: Any) -> str:
        """The engine's lines for one ``uint8`` ``[H, W, 3]`` array, concatenated as Flow-GRPO does."""
        lines, _ = self.engine(image)
        return "".join(text for _, text, confidence in lines or () if float(confidence) > 0)

    def _prepare(self, images: Tensor) -> Tensor:
        return images.detach().float().clamp(0.0, 1.0)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        targets = self.targets(prompts)
        arrays = (images * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores = []
        # RapidOCR takes one image per call (it batches the text lines of an image itself)
        for index, (array, target) in enumerate(zip(arrays, targets)):
            try:
                recognized = self.recognize(array)
            except Exception as err:  # the engine's own failure on one image
                raise RewardError(
                    f"reward 'ocr': the OCR engine failed on image {index}: {type(err).__name__}: {err}"
                ) from err
            scores.append(ocr_score(recognized, target))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
