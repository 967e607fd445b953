"""Self-contained RL worlds: a generator, its prompts and a reward, shipped with the package.

``digits`` (:class:`branchgrpo.worlds.digits.DigitsWorld`) is the default: a ~1.3M-parameter
FLUX transformer on 16×16 handwritten digits and a CNN classifier reward, small enough for
GRPO on a 2-core CPU with no download.
"""

from __future__ import annotations

__all__ = ["DigitsWorld"]


def __getattr__(name: str):
    # Lazy: importing ``branchgrpo.worlds`` must not pull in diffusers/transformers.
    if name == "DigitsWorld":
        from branchgrpo.worlds.digits import DigitsWorld

        return DigitsWorld
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
