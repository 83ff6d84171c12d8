"""Frozen dataclasses from and to plain data (the dicts and lists of yaml and JSON), with
errors that name the path of the node at fault."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Mapping, TypeVar, Union

T = TypeVar("T")

IGNORED = ("_target_",)
"""Keys of the official hydra nodes that name the class, not an argument."""


def to_plain(obj: Any) -> Any:
    """A dataclass as plain JSON data (dicts, lists for tuples, numbers, strings, None)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def from_plain(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build the dataclass ``cls`` from plain data, nested dataclasses and tuples included.

    Parameters
    ----------
    cls
        A dataclass whose fields carry type annotations.
    data
        Field name -> value; ``_target_`` keys are ignored.
    where
        The path of ``data`` for error messages (e.g. ``"model"``).

    Raises
    ------
    ValueError
        Naming the node and the unknown key(s) or missing argument.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(k for k in data if k not in names and k not in IGNORED)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items() if k not in IGNORED}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"{where}: {err}") from None


def _convert(kind: Any, value: Any, where: str) -> Any:
    """``value`` as the annotated ``kind``."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if value is None else _convert(options[0], value, where)
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):  # type: ignore[arg-type]
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping for {getattr(kind, '__name__', kind)}, "
                             f"got {type(value).__name__}")
        return from_plain(kind, value, where)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(kind)
        return tuple(_convert(args[0] if args else Any, v, where) for v in value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value
