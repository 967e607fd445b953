"""The digits world: RL on a 2-core CPU with no download (see docs/digits-world.md).

A ~1.3M-parameter diffusers ``FluxTransformer2DModel`` generates 16×16 handwritten digits from
prompts such as ``"a handwritten 7"``; the reward is a CNN classifier's probability of the
prompted digit. Data: scikit-learn's bundled ``load_digits``.
"""

from branchgrpo.worlds.digits.prompts import parse_digit
from branchgrpo.worlds.digits.world import ASSET_DIR, DigitsWorld

__all__ = ["ASSET_DIR", "DigitsWorld", "parse_digit"]
