"""The shapes world: compositional prompts and an exact verifier on a 2-core CPU (docs/shapes-world.md).

A ~1.3M-parameter diffusers ``FluxTransformer2DModel`` draws 32×32 RGB scenes of one to four
coloured shapes from prompts such as ``"two red circles left of a blue square"``; the reward is a
programmatic verifier (palette quantisation, connected components, shape geometry), no learned model.
"""

from branchgrpo.worlds.shapes.prompts import SceneSpec, parse_prompt
from branchgrpo.worlds.shapes.verifier import verify
from branchgrpo.worlds.shapes.world import ASSET_DIR, ShapesWorld

__all__ = ["ASSET_DIR", "SceneSpec", "ShapesWorld", "parse_prompt", "verify"]
