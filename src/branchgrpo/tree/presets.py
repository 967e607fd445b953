"""Named method presets: YAML files shipped in ``branchgrpo/presets`` (docs/method.md §9, Table 1)."""

from __future__ import annotations

import difflib
from importlib import resources
from typing import Any, Mapping

from branchgrpo.config import ConfigError, build, load_yaml, merge, parse_overrides
from branchgrpo.tree.spec import MethodConfig

TABLE1_PRESETS = (
    "dancegrpo",
    "dancegrpo-tf0.6",
    "mixgrpo",
    "branchgrpo",
    "branchgrpo-widpru",
    "branchgrpo-deppru",
    "branchgrpo-mix",
)


def list_presets() -> list[str]:
    """Names of all shipped presets."""
    folder = resources.files("branchgrpo") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """The preset's one-line description: the first sentence of its file's leading comment."""
    preset_mapping(name)  # unknown names fail with the usual message
    text = (resources.files("branchgrpo") / "presets" / f"{name}.yaml").read_text()
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    joined = " ".join(comment)
    first = joined.split(". ")[0].rstrip(".")
    return first + "." if first else ""


def preset_mapping(name: str) -> dict[str, Any]:
    """The raw mapping of a preset, with its ``base`` chain merged in."""
    names = list_presets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError("preset", f"unknown preset {name!r}{hint}; available: {', '.join(names)}")
    text = (resources.files("branchgrpo") / "presets" / f"{name}.yaml").read_text()
    data = load_yaml(text) or {}
    base = data.pop("base", None)
    return merge(preset_mapping(base), data, MethodConfig) if base else data


def method_config(
    preset: str = "branchgrpo",
    overrides: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> MethodConfig:
    """Build a validated :class:`MethodConfig` from a preset, a mapping and ``key=value`` overrides."""
    data = preset_mapping(preset)
    if extra:
        data = merge(data, extra, MethodConfig)
    if overrides:
        data = merge(data, parse_overrides(MethodConfig, overrides), MethodConfig)
    return build(MethodConfig, data)
