"""What each run of ``branchgrpo bench`` trains: a method label → (preset, overrides).

A label is a preset's name or a named variant from ``--variants`` (``LABEL: {preset, overrides}``);
its overrides are its preset's ``--tuned`` entry (from ``benchmarks/sweep.py``'s ``best.json``),
then the variant's own, so the variant wins where they overlap. Every problem is one
:class:`~branchgrpo.config.ConfigError` line naming the option and the label.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from branchgrpo.config import ConfigError, read_yaml_file
from branchgrpo.tree.presets import list_presets

# a label names its run's files (sample grids), so it is a plain file-name word
_VARIANT_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def read_tuned(path: str) -> dict[str, list[str]]:
    """``--tuned``: method → its key=value overrides (the ``best.json`` the sweep writes)."""
    try:
        tuned = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError("--tuned", f"cannot read {path} as JSON ({err})") from None
    if not isinstance(tuned, dict) or not all(isinstance(v, list) and all(isinstance(o, str) for o in v)
                                              for v in tuned.values()):
        raise ConfigError("--tuned", f"{path} must map a method to a list of key=value overrides "
                          "(the best.json benchmarks/sweep.py writes)")
    return tuned


def read_variants(path: str) -> dict[str, tuple[str, list[str]]]:
    """``--variants``: label → (preset, overrides), checked: the label is a file-name word and never a
    preset's own name, the preset exists, the overrides are key=value strings."""
    data = read_yaml_file(path, "--variants")
    if not isinstance(data, dict) or not data:
        raise ConfigError("--variants", f"{path} must map labels to {{preset: NAME, overrides: [key=value, ...]}}")
    presets = list_presets()
    out = {}
    for label, spec in data.items():
        where = f"{label!r} in {path}"
        if not isinstance(label, str) or not _VARIANT_LABEL.fullmatch(label):
            raise ConfigError("--variants", f"{where}: a label is 1-64 letters, digits, '.', '_' or '-' "
                              "(it names the run's files)")
        if label in presets:
            raise ConfigError("--variants", f"{where}: the label is a preset's name; choose another")
        if not isinstance(spec, dict) or set(spec) - {"preset", "overrides"} or "preset" not in spec:
            raise ConfigError("--variants", f"{where}: expected {{preset: NAME, overrides: [key=value, ...]}}, "
                              f"got {spec!r}")
        if spec["preset"] not in presets:
            raise ConfigError("--variants", f"{where}: unknown preset {spec['preset']!r}; available: "
                              f"{', '.join(presets)}")
        overrides = spec.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ConfigError("--variants", f"{where}: overrides must be a list of key=value strings, "
                              f"got {overrides!r}")
        out[label] = (spec["preset"], list(overrides))
    return out


def resolve_runs(methods: list[str], tuned: dict[str, list[str]],
                 variants: dict[str, tuple[str, list[str]]]) -> dict[str, tuple[str, list[str]]]:
    """Label → (preset, overrides) for every method: a preset runs as itself, a variant as its preset;
    the tuned entry (the label's, else its preset's) comes first, the variant's own overrides last."""
    runs = {}
    for label in methods:
        preset, own = variants.get(label, (label, []))
        runs[label] = (preset, [*tuned.get(label, tuned.get(preset, [])), *own])
    return runs
