"""Model families as plug-ins: ``model.family`` names one of these (see docs/api.md).

    from branchgrpo import register_family
    from branchgrpo.families import ModelFamily, PolicyBundle

    class MyFamily(ModelFamily):
        name = "mine"
        def build(self, config, device, dtype) -> PolicyBundle: ...

    register_family(MyFamily())      # then model.family=mine works in configs and the CLI
"""

from __future__ import annotations

from branchgrpo.families.base import ModelFamily, Modality, NoOptions, PolicyBundle, resolve_options
from branchgrpo.families.digits import DigitsFamily
from branchgrpo.families.flux import FluxFamily
from branchgrpo.families.flux_kontext import FluxKontextFamily
from branchgrpo.families.hunyuanvideo15 import HunyuanVideo15Family
from branchgrpo.families.flux2 import Flux2Family, Flux2KleinFamily
from branchgrpo.families.qwenimage import QwenImageFamily
from branchgrpo.families.qwenimage_edit import QwenImageEditFamily
from branchgrpo.families.sd3 import SD3Family
from branchgrpo.families.shapes import ShapesFamily
from branchgrpo.families.registry import available_families, get_family, register_family, registered_family
from branchgrpo.families.wan import WanFamily
from branchgrpo.families.wan22 import Wan22Family
from branchgrpo.families.zimage import ZImageFamily

for _family in (DigitsFamily(), FluxFamily(), FluxKontextFamily(), Flux2Family(), Flux2KleinFamily(), HunyuanVideo15Family(), QwenImageFamily(), QwenImageEditFamily(), SD3Family(), ShapesFamily(), WanFamily(), Wan22Family(), ZImageFamily()):
    register_family(_family)

__all__ = [
    "ModelFamily",
    "Modality",
    "NoOptions",
    "PolicyBundle",
    "available_families",
    "get_family",
    "register_family",
    "registered_family",
    "resolve_options",
]
