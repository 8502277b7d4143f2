"""Configuration dataclasses from plain mappings (TOML tables, model.json sections), checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: Mapping, *, what: str) -> T:
    """``cls(**data)``, refusing unknown keys by name and turning invalid values into a
    :class:`ConfigError` that says ``what`` was being read (e.g. "architecture", "[ensemble] in x.toml")."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {what}: {exc}") from exc
