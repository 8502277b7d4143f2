"""Labels of the synthetic survey: a parametric Milky Way prior, or resampling of a user's label sets."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq

from speclabel.core.errors import InputError
from speclabel.core.labels import LABEL_NAMES

from .spectra import microturbulence


def draw_labels(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Labels from a parametric Milky Way prior for a Gaia-ESO-like target selection.

    Populations: thin disc (68 %), thick disc (24 %), halo (8 %), each with its [Fe/H] distribution
    and [Mg/Fe]-[Fe/H] sequence (low-α thin disc, high-α thick disc with its knee near [Fe/H] = -0.6,
    α-enhanced halo); [Al/Fe] correlates with [Mg/Fe]. Evolutionary states: red giant branch (38 %),
    red clump (18 %), main sequence (32 %) and subgiants (12 %), with Teff shifting hotter at low
    metallicity as isochrones do.
    """
    population = rng.choice(3, size=n, p=[0.68, 0.24, 0.08])
    feh = np.select(
        [population == 0, population == 1],
        [rng.normal(-0.08, 0.22, n), rng.normal(-0.55, 0.25, n)],
        rng.normal(-1.35, 0.40, n),
    )
    feh = np.clip(feh, -2.3, 0.5)
    knee = np.clip((feh + 0.6) / 0.7, 0.0, 1.0)
    mgfe = np.select(
        [population == 0, population == 1],
        [
            0.03 - 0.12 * np.clip(feh, -0.8, 0.4) + rng.normal(0, 0.035, n),
            0.31 - 0.15 * knee + rng.normal(0, 0.04, n),
        ],
        0.28 + rng.normal(0, 0.07, n),
    )
    alfe = 0.75 * mgfe - 0.02 + 0.08 * np.clip(feh, -1.0, 0.3) + rng.normal(0, 0.06, n)
    alfe = np.where(feh < -1.0, alfe - 0.12 * (-1.0 - feh), alfe)
    alpha = 0.8 * mgfe + rng.normal(0, 0.03, n)

    state = rng.choice(4, size=n, p=[0.38, 0.18, 0.32, 0.12])
    metal_shift = -220.0 * feh  # metal-poor isochrones are hotter
    rgb_logg = rng.uniform(1.0, 3.5, n)
    rgb_teff = 4600.0 + 330.0 * (rgb_logg - 2.5) + metal_shift + rng.normal(0, 70, n)
    clump_logg = rng.normal(2.45, 0.12, n)
    clump_teff = 4750.0 + 0.6 * metal_shift + rng.normal(0, 90, n)
    ms_teff = rng.uniform(4700.0, 6600.0, n) + 0.5 * metal_shift
    ms_logg = 4.62 - 2.4e-4 * (ms_teff - 4700.0) + rng.normal(0, 0.08, n)
    sg_logg = rng.uniform(3.5, 4.1, n)
    sg_teff = 5100.0 + 900.0 * (sg_logg - 3.5) + 0.5 * metal_shift + rng.normal(0, 120, n)
    teff = np.choose(state, [rgb_teff, clump_teff, ms_teff, sg_teff])
    logg = np.choose(state, [rgb_logg, clump_logg, ms_logg, sg_logg])
    teff, logg = np.clip(teff, 3900.0, 6900.0), np.clip(logg, 0.8, 4.9)

    vbroad = np.where(logg > 3.5, 4.0 + 4.0 * np.clip((teff - 5500.0) / 1000.0, 0, 1.5), 5.0)
    vbroad = np.clip(vbroad + rng.normal(0, 1.0, n), 2.0, 14.0)
    return {
        "teff": teff,
        "logg": logg,
        "feh": feh,
        "mgfe": mgfe,
        "alfe": alfe,
        "alpha": alpha,
        "vmic": microturbulence(teff, logg),
        "vbroad": vbroad,
    }


# Column names accepted in a label-prior table (case-insensitive), e.g. the APOGEE DR16 sets of
# Guiglion et al. (2020): Teff, logg, FeH, MgFe, AlFe, alphaM.
_PRIOR_COLUMNS = {
    "teff": "teff",
    "logg": "logg",
    "feh": "feh",
    "fe_h": "feh",
    "mgfe": "mgfe",
    "mg_fe": "mgfe",
    "alfe": "alfe",
    "al_fe": "alfe",
    "alpham": "alpha",
    "alpha_m": "alpha",
}
_PRIOR_JITTER = {"teff": 40.0, "logg": 0.08, "feh": 0.04, "mgfe": 0.03, "alfe": 0.04, "alpha": 0.03}


def load_label_prior(path: str) -> dict[str, np.ndarray]:
    """A table of label sets (CSV or Parquet) to resample labels from."""
    try:
        if path.endswith(".parquet"):
            table = pq.read_table(path).to_pydict()
        else:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            table = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    except (OSError, ValueError, IndexError) as exc:
        raise InputError(f"cannot read label prior {path!r}: {exc}") from exc
    prior = {}
    for column, values in table.items():
        key = _PRIOR_COLUMNS.get(column.lower())
        if key:
            prior[key] = np.asarray(values, dtype=np.float64)
    missing = [k for k in LABEL_NAMES if k not in prior]
    if missing:
        raise InputError(f"label prior {path!r} lacks columns for {missing} (has {list(table)})")
    good = np.all([np.isfinite(v) for v in prior.values()], axis=0)
    return {k: v[good] for k, v in prior.items()}


def resample_labels(rng: np.random.Generator, n: int, prior: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pick = rng.integers(0, prior["teff"].size, n)
    out = {k: prior[k][pick] + rng.normal(0, _PRIOR_JITTER[k], n) for k in prior}
    out.setdefault("alpha", 0.8 * out["mgfe"] + rng.normal(0, 0.03, n))
    out["teff"] = np.clip(out["teff"], 3500.0, 7500.0)
    out["logg"] = np.clip(out["logg"], 0.0, 5.2)
    out["vmic"] = microturbulence(out["teff"], out["logg"])
    out["vbroad"] = np.clip(rng.normal(5.0, 1.2, n), 2.0, 14.0)
    return out
