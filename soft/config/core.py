"""Typed config: dataclass sections, YAML files and dotted `key=value` overrides.

Precedence is defaults < YAML < command line. Every key is checked against the dataclass
schema: an unknown key, a wrong type or an invalid value fails before any work starts, with
the key's full dotted path in the message.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

import yaml

from soft.config.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# The config sections are dataclasses: from_dict reads their fields and builds one.
T = TypeVar("T", bound="DataclassInstance")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def option(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown in the config reference)."""
    if isinstance(default, list | dict):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}
        )
    return dataclasses.field(default=default, metadata={"help": help})


def section(default_factory: Any, help: str) -> Any:
    """A nested config section."""
    return dataclasses.field(default_factory=default_factory, metadata={"help": help})


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; return it (ints widen to float)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        if value is not None and len(arms) == 1:  # Optional[X]: X's own, more precise error
            return _coerce(value, arms[0], key)
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list | tuple):
            (item_tp,) = get_args(tp)
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads `2e-5` (no dot) as a string; accept it as the number it is.
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=key)
    else:  # pragma: no cover - a schema bug, not user input
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"config section '{prefix or '<root>'}': expected a mapping, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{_join(prefix, unknown[0])}' in {where}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {
        name: _coerce(value, hints[name], _join(prefix, name)) for name, value in data.items()
    }
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(
            f"command-line override '{text}': expected key=value, e.g. train.train_iters=50"
        )
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"command-line override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"command-line override '{text}': cannot parse value: {exc}") from exc
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"command-line override '{'.'.join(path)}': '{part}' is not a section"
            )
        node = child
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; `defaults: [other.yaml, ...]` entries are merged first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}': invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at the top level")
    merged: dict[str, Any] = {}
    for parent in data.pop("defaults", []) or []:
        deep_merge(merged, read_yaml(path.parent / parent))
    deep_merge(merged, data)
    return merged


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config atomically (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b': v} (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = _join(prefix, key)
        if isinstance(value, dict):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def describe(cls: type[DataclassInstance], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows for the config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        rows.append((key, _type_name(tp), _default_text(f), f.metadata.get("help", "")))
    return rows


def _default_text(f: dataclasses.Field[Any]) -> str:
    """repr of a field's default; a field with neither default nor factory is required."""
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"
