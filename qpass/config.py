"""Typed configs (dataclasses) and their strict loading from plain mappings (YAML/TOML/JSON).

Every recipe key is checked: an unknown key or a wrong type is a `ConfigError` naming the key
path and the expected type.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from qpass.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        nested = None  # a mapping meant for a dataclass option: its own error names the inner key
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
                    nested = exc
                continue
        if nested is not None:
            raise nested
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            (item,) = {a for a in get_args(tp) if a is not Ellipsis}
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value.lower() if isinstance(value, str) else value)
        except ValueError:
            pass
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return from_mapping(tp, value, where)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    msg = f"recipe key '{where}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    raise ConfigError(msg)


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        msg = f"recipe key '{where}': expected a mapping of options, got {type(data).__name__}"
        raise ConfigError(msg)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        msg = f"recipe key '{where}.{unknown[0]}' is unknown; expected one of: {', '.join(sorted(fields))}"
        raise ConfigError(msg)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        msg = f"recipe key '{where}': {exc}"
        raise ConfigError(msg) from exc


def to_mapping(obj: Any) -> Any:
    """The inverse of `from_mapping`: plain dicts, lists and scalars (enums by value)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    return obj
