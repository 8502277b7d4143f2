"""The labels a model learns: name, symbol, unit and the physical range that catches garbage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    name: str
    symbol: str
    unit: str
    physical_range: tuple[float, float]


# The five labels of Ambrosch et al. (2023), in model output order. The physical ranges only catch
# garbage (a Teff of -5, a log g of 12): the model's own training range is stored in model.json.
LABELS: tuple[Label, ...] = (
    Label("teff", r"$T_\mathrm{eff}$", "K", (2000.0, 60000.0)),
    Label("logg", r"$\log g$", "dex", (-1.0, 7.0)),
    Label("feh", "[Fe/H]", "dex", (-6.0, 1.5)),
    Label("mgfe", "[Mg/Fe]", "dex", (-2.0, 2.0)),
    Label("alfe", "[Al/Fe]", "dex", (-2.0, 2.5)),
)
LABEL_NAMES: tuple[str, ...] = tuple(label.name for label in LABELS)
