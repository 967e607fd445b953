"""The config reference, generated from the dataclasses: every key with its type, default and help.

The help text is the comment on the field's line in the dataclass (or the comment lines right
above it), so the reference and the code cannot drift apart. ``branchgrpo config`` prints it and
``docs/config.md`` is its markdown form (a test keeps the file current).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, get_args

from branchgrpo.config import _type_name


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted path, e.g. method.tree.eta
    type: str
    default: Any
    help: str


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the class source: the comment on the field's line, else the comment
    lines just above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    tree = ast.parse(source)
    out: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        text = ""
        for lineno in range(node.lineno, (node.end_lineno or node.lineno) + 1):
            line = lines[lineno - 1]
            if "  # " in line:
                text = line.split("  # ", 1)[1].strip()
                break
        if not text:
            above = []
            index = node.lineno - 2
            while index >= 0 and lines[index].strip().startswith("#"):
                above.insert(0, lines[index].strip().lstrip("#").strip())
                index -= 1
            text = " ".join(above)
        out[node.target.id] = text
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return None
    from branchgrpo.config import to_dict

    return to_dict(value)


def _section(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def key_docs(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the dataclass tree ``cls`` (sections that may be null are listed too)."""
    import typing

    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        section = _section(tp)
        if section is not None:
            if type(None) in get_args(tp):
                rows.append(KeyDoc(path, f"{section.__name__} or null", None,
                                   comments.get(f.name, "") or (section.__doc__ or "").strip().splitlines()[0]))
            rows += key_docs(section, path + ".")
            continue
        rows.append(KeyDoc(path, _type_name(tp), _default(f), comments.get(f.name, "")))
    return rows


def _cell(value: Any) -> str:
    text = "null" if value is None else repr(value) if isinstance(value, str) else str(value)
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """docs/config.md: the job config, each family's ``model.options`` and the presets."""
    from branchgrpo.families import available_families, get_family
    from branchgrpo.train.config import TrainConfig
    from branchgrpo.tree.presets import list_presets, preset_description

    out = [
        "# Config reference",
        "",
        "Generated from the config dataclasses by `branchgrpo config --markdown` (a test keeps this file",
        "current). Set keys in a YAML file (`--config`) or as dotted `key=value` overrides; a unique suffix",
        "works too (`steps=16` for `method.tree.steps`). Resolution order: dataclass defaults ← preset ←",
        "the model family's recommended method settings ← YAML file ← overrides.",
        "",
        "## The job (`TrainConfig`)",
        "",
        "| key | type | default | help |",
        "|---|---|---|---|",
    ]
    for row in key_docs(TrainConfig):
        out.append(f"| `{row.key}` | {_cell(row.type)} | `{_cell(row.default)}` | {_cell(row.help)} |")
    out += ["", "## Model families (`model.family`, `model.options.*`)", ""]
    for name, description in available_families().items():
        family = get_family(name)
        if not type(family).__module__.startswith("branchgrpo."):
            continue  # the reference documents the families that ship; `branchgrpo families` lists yours too
        out += [f"### `{name}` — {description}", "",
                f"Modality: {family.modality}. LoRA: {'yes' if family.supports_lora else 'no'}. "
                f"Prompt cache (`branchgrpo preprocess`): {'yes' if family.prompt_cache else 'no'}."]
        defaults = ", ".join(f"`{k}={v}`" for k, v in _flat(family.method_defaults, "method.").items())
        if defaults:
            out.append(f"Recommended method settings (applied unless your file or overrides set them): {defaults}.")
        rows = key_docs(family.options_class, "model.options.")
        if rows:
            out += ["", "| key | type | default | help |", "|---|---|---|---|"]
            out += [f"| `{r.key}` | {_cell(r.type)} | `{_cell(r.default)}` | {_cell(r.help)} |" for r in rows]
        out.append("")
    out += ["## Method presets (`--preset`)", "", "| preset | what it is |", "|---|---|"]
    out += [f"| `{name}` | {_cell(preset_description(name))} |" for name in list_presets()]
    return "\n".join(out) + "\n"


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (node or {}).items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def reference_text(family: str | None = None) -> str:
    """The plain-text reference ``branchgrpo config`` prints (one family's options with ``family``)."""
    from branchgrpo.families import get_family
    from branchgrpo.train.config import TrainConfig

    rows = key_docs(TrainConfig) if family is None else key_docs(get_family(family).options_class, "model.options.")
    width = max((len(r.key) for r in rows), default=10)
    lines = []
    for row in rows:
        lines.append(f"{row.key:<{width}}  {row.type} = {_cell(row.default)}")
        if row.help:
            lines.append(f"{'':<{width}}    {row.help}")
    return "\n".join(lines)
