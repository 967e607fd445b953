"""The family registry: ``model.family`` names → :class:`ModelFamily` instances."""

from __future__ import annotations

import difflib

from branchgrpo.config import ConfigError
from branchgrpo.families.base import ModelFamily

_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Make ``family`` available as ``model.family=<family.name>``; returns it (usable as a decorator on
    an instance factory). Registering a taken name needs ``replace=True``."""
    if isinstance(family, type):
        family = family()
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family takes a ModelFamily instance, got {type(family).__name__}")
    name = family.name
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"family name {name!r} must be a non-empty word (letters, digits, - and _)")
    if name in _FAMILIES and not replace and type(_FAMILIES[name]) is not type(family):
        raise ValueError(f"model family {name!r} is already registered ({type(_FAMILIES[name]).__name__}); "
                         "pass replace=True to replace it")
    _FAMILIES[name] = family
    return family


def get_family(name: str) -> ModelFamily:
    """The registered family ``name`` or a :class:`ConfigError` listing the known ones."""
    if name not in _FAMILIES:
        close = difflib.get_close_matches(str(name), list(_FAMILIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError("model.family", f"unknown model family {name!r}{hint}; allowed values: "
                          f"{', '.join(_FAMILIES)} (or register your own with branchgrpo.register_family)")
    return _FAMILIES[name]


def available_families() -> dict[str, str]:
    """``{name: one-line description}`` of every registered family."""
    return {name: family.description for name, family in _FAMILIES.items()}




def registered_family(name: str) -> ModelFamily | None:
    """The family registered as ``name``, or None."""
    return _FAMILIES.get(name)
