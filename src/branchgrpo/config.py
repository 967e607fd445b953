"""Typed-dataclass configs: building from YAML mappings, dotted ``key=value`` overrides, errors.

Every config section is a dataclass whose fields carry types and defaults. This module turns plain
mappings (YAML, CLI) into those dataclasses, checking every key and value against the field's
type, and reports mistakes as :class:`ConfigError` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Mapping, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake; ``str(err)`` is the whole message."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class ConfigErrors(ConfigError):
    """Several configuration mistakes found together; ``str(err)`` has one line per problem."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = list(errors)
        if len(self.errors) == 1:
            only = self.errors[0]
            super().__init__(only.field, str(only).split(": ", 1)[-1] if only.field else str(only))
        else:
            ValueError.__init__(self, "\n".join(str(e) for e in self.errors))
            self.field = ", ".join(e.field for e in self.errors)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is dict:
        k, v = get_args(tp)
        return f"a mapping {_type_name(k)} -> {_type_name(v)} (e.g. '0:2,3:2')"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise ConfigError("", f"duplicate key {key!r} in {node.start_mark.name or 'mapping'} line {key_node.start_mark.line + 1}")
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(text: str, source: str = "") -> Any:
    """``yaml.safe_load`` that raises :class:`ConfigError` (one line: where and what) on duplicate keys,
    syntax errors, tabs and tags that would build Python objects."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = (err.problem or err.context or "invalid YAML").strip()
        if "\t" in text and ("tab" in problem.lower() or "\\t" in problem):
            problem += " (YAML indents with spaces, not tabs)"
        raise ConfigError(source, f"not valid YAML at {where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(source, f"not valid YAML: {str(err).splitlines()[0]}") from None


def read_yaml_file(path: Any, field: str = "--config") -> Any:
    """A YAML file's content, or one :class:`ConfigError` line (missing, unreadable, not UTF-8, bad YAML)."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ConfigError(field, f"config file {file} does not exist" if not file.exists() else f"{file} is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(str(file), f"is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(str(file), f"cannot be read: {err.strerror}") from None
    return load_yaml(text, str(file))


def _parse_mapping_text(text: str) -> Any:
    """Accept ``0:2,3:2`` as well as YAML ``{0: 2, 3: 2}``."""
    text = text.strip()
    if text in ("", "{}"):
        return {}
    if not text.startswith("{") and ":" in text:
        text = "{" + ", ".join(part.replace(":", ": ", 1) for part in text.split(",")) + "}"
    return load_yaml(text)


def coerce(value: Any, tp: Any, field: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise :class:`ConfigError` naming ``field``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, field)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(field, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(field, f"got {value!r}; allowed values: {', '.join(map(str, allowed))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if isinstance(value, str):
            value = load_yaml(value, field)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=field)
    if origin is dict:
        key_type, value_type = get_args(tp)
        if isinstance(value, str):
            try:
                value = _parse_mapping_text(value)
            except ConfigError as err:
                raise ConfigError(field, str(err)) from None
            except yaml.YAMLError:
                raise ConfigError(field, f"expected {_type_name(tp)}, got {value!r}") from None
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"expected {_type_name(tp)}, got {value!r}")
        return {
            coerce(k, key_type, field): coerce(v, value_type, f"{field}[{k}]")
            for k, v in value.items()
        }
    if origin in (list, tuple):
        (item_type, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"expected a list, got {value!r}")
        items = [coerce(v, item_type, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(field, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(field, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(field, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(field, f"expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise ConfigError(field, f"expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(field, f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(field, f"expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(field, f"unsupported field type {tp!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(path, f"unknown key{hint}; known keys: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and err.field and not err.field.startswith(prefix):
            parent, _, section = prefix.rpartition(".")
            # a section names its own fields from itself (tree.steps inside method.tree): don't double it
            full = (f"{parent}.{err.field}" if parent else err.field) if err.field.split(".")[0] == section \
                else f"{prefix}.{err.field}"
            raise ConfigError(full, str(err).split(": ", 1)[-1]) from None
        raise


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (dataclasses → dicts, tuples → lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def merge(base: Mapping[str, Any], update: Mapping[str, Any], cls: type | None = None) -> dict[str, Any]:
    """Merge ``update`` into ``base``: config sections merge key by key, values are replaced.

    With ``cls`` (the dataclass the mappings describe) only fields typed as dataclasses are
    merged recursively, so a mapping-valued field such as ``split_plan`` is replaced whole.
    Without it every nested mapping merges.
    """
    hints = _hints(cls) if cls is not None else {}
    deep = _deep_merged_fields(cls) if cls is not None else set()
    out = dict(base)
    for key, value in update.items():
        section = _section_type(hints[key]) if key in hints else None
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and (cls is None or section or key in deep):
            out[key] = merge(out[key], value, section)
        else:
            out[key] = value
    return out


def _deep_merged_fields(cls: type) -> set[str]:
    """Mapping fields marked ``metadata={"merge": "deep"}`` (option bags) merge key by key."""
    if not dataclasses.is_dataclass(cls):
        return set()
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("merge") == "deep"}


def _section_type(tp: Any) -> type | None:
    """The dataclass behind a field type (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def field_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """All dotted leaf paths of a dataclass tree → their type."""
    out: dict[str, Any] = {}
    for name, tp in _hints(cls).items():
        path = f"{prefix}{name}"
        inner = [a for a in get_args(tp) if dataclasses.is_dataclass(a)] or (
            [tp] if dataclasses.is_dataclass(tp) else []
        )
        if inner:
            out.update(field_paths(inner[0], path + "."))
        out[path] = tp
    return out


def resolve_key(cls: type, key: str) -> str:
    """Full dotted path for ``key``: exact, or a unique suffix such as ``steps`` → ``tree.steps``."""
    paths = field_paths(cls)
    if key in paths:
        return key
    for path, tp in paths.items():  # a key inside an option bag: model.options.height
        if get_origin(tp) is dict and key.startswith(path + "."):
            return key
    matches = [p for p in paths if p.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(key, f"ambiguous key; say one of: {', '.join(sorted(matches))}")
    close = difflib.get_close_matches(key, list(paths), n=3) or [
        p for p in paths if p.rsplit(".", 1)[-1] in difflib.get_close_matches(key, [q.rsplit(".", 1)[-1] for q in paths], n=2)
    ]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(key, f"unknown key{hint} (keys are dotted paths such as tree.steps)")


def parse_overrides(cls: type, overrides: list[str]) -> dict[str, Any]:
    """``['tree.steps=16', 'eta=0.5']`` → nested mapping of raw values, keys resolved."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are key=value (e.g. tree.steps=16)")
        key, raw = item.split("=", 1)
        path = resolve_key(cls, key.strip())
        value: Any = raw
        if raw.strip().startswith(("{", "[")) or path not in field_paths(cls):
            # YAML for structures, and for values inside an option bag (typed later by their owner)
            try:
                value = load_yaml(raw)
            except ConfigError as err:
                raise ConfigError(path, f"cannot read {raw!r} as a value: {str(err)}") from None
        node = nested
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(path, "cannot set a field inside a value set in the same command")
        node[leaf] = value
    return nested
