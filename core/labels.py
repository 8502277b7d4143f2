"""The labels a model learns: name, symbol, unit and the physical range that catches garbage.

A model declares its own label set (``model.json`` ``label_definitions``); the default is the five
labels of the paper. A label name outside :data:`LABELS` (``cafe``, ``vmic``, ...) gets a plain
definition from :func:`label_definition`: its name as symbol, the unit it is given, no physical range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from .errors import ConfigError


@dataclass(frozen=True)
class Label:
    name: str
    symbol: str
    unit: str
    physical_range: tuple[float, float]
    description: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "unit": self.unit, "description": self.description}


# The five labels of Ambrosch et al. (2023), in model output order. The physical ranges only catch
# garbage (a Teff of -5, a log g of 12): the model's own training range is stored in model.json.
LABELS: tuple[Label, ...] = (
    Label("teff", r"$T_\mathrm{eff}$", "K", (2000.0, 60000.0), "effective temperature"),
    Label("logg", r"$\log g$", "dex", (-1.0, 7.0), "surface gravity, log10(g / cm s^-2)"),
    Label("feh", "[Fe/H]", "dex", (-6.0, 1.5), "iron abundance relative to the Sun"),
    Label("mgfe", "[Mg/Fe]", "dex", (-2.0, 2.0), "magnesium-to-iron abundance ratio relative to the Sun"),
    Label("alfe", "[Al/Fe]", "dex", (-2.0, 2.5), "aluminium-to-iron abundance ratio relative to the Sun"),
)
LABEL_NAMES: tuple[str, ...] = tuple(label.name for label in LABELS)
_KNOWN = {label.name: label for label in LABELS}
# Label names become column names (<label>_std, sal_<label>_<group>): plain identifiers only.
_NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


def label_definition(name: str, unit: str | None = None, description: str | None = None) -> Label:
    """The definition of label ``name``: the paper's for its five labels, else a plain one.

    ``unit`` / ``description`` replace the known ones when given.
    """
    if not name or not set(name) <= _NAME_CHARACTERS or name[0].isdigit():
        raise ConfigError(f"label name {name!r} must be lower-case letters, digits and _ (a column name)")
    known = _KNOWN.get(name)
    label = known or Label(name, name, "", (-math.inf, math.inf))
    changes = {k: v for k, v in (("unit", unit), ("description", description)) if v is not None}
    return replace(label, **changes) if changes else label


def label_set(names: Iterable[str]) -> tuple[Label, ...]:
    """Definitions of ``names`` in order; duplicates and bad names are refused."""
    names = list(names)
    if not names:
        raise ConfigError("a label set needs at least one label")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"label(s) {repeated} named more than once")
    return tuple(label_definition(n) for n in names)


def labels_from_dicts(items: Iterable[Mapping]) -> tuple[Label, ...]:
    """The label set of model.json's ``label_definitions`` (see :meth:`Label.to_dict`)."""
    return tuple(label_definition(d["name"], d.get("unit"), d.get("description")) for d in items)
