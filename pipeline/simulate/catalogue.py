"""Synthetic label rows in the catalogue schema, for tests and for benchmarks at catalogue scale.

Labelling millions of spectra just to get a big catalogue would take hours; these rows have the
catalogue's columns and realistic value distributions (labels from the simulator's Milky Way prior,
positions in fibre-survey fields, a few rows without a position) and are made at millions of rows
per second. The same (seed, chunk) gives the same rows.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from speclabel.core.flags import Flag
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import Setup

from ..catalogue.layout import COLUMN_TYPES, saliency_column
from .labels import draw_labels
from .survey import survey_fields

# Internal precision of the Ambrosch et al. (2023) ensemble at high S/N: the scale of `<label>_std`.
TYPICAL_STD = {"teff": 24.0, "logg": 0.03, "feh": 0.02, "mgfe": 0.02, "alfe": 0.03}


@dataclass(frozen=True)
class SyntheticCatalogue:
    release: str = "SIM"
    model_id: str = "synthetic-model"
    run_id: str = "synthetic-run"
    seed: int = 0
    n_fields: int = 60
    field_radius_deg: float = 0.2  # GIRAFFE/FLAMES: 25 arcmin across
    positionless_fraction: float = 0.01
    n_members: int = 8  # 0 leaves out the per-member columns


def synthetic_label_rows(setup: Setup, config: SyntheticCatalogue, start: int, n: int) -> pa.Table:
    """Label rows ``start .. start + n - 1`` (ids ``<release>-<number>``)."""
    rng = np.random.default_rng([config.seed, start])
    labels = draw_labels(rng, n)
    field_ra, field_dec = survey_fields(config.seed, config.n_fields)
    field = rng.integers(0, config.n_fields, n)
    radius = config.field_radius_deg * np.sqrt(rng.random(n))
    angle = rng.uniform(0, 2 * np.pi, n)
    dec = np.clip(field_dec[field] + radius * np.sin(angle), -89.9, 89.9)
    ra = (field_ra[field] + radius * np.cos(angle) / np.cos(np.radians(dec))) % 360.0
    no_position = rng.random(n) < config.positionless_fraction
    snr = np.exp(rng.uniform(np.log(5.0), np.log(150.0), n)).astype(np.float32)

    columns: dict[str, pa.Array] = {
        "spectrum_id": pa.array([f"{config.release}-{start + k:09d}" for k in range(n)], pa.string()),
        "ra": pa.array(ra, pa.float64(), mask=no_position),
        "dec": pa.array(dec, pa.float64(), mask=no_position),
        "snr": pa.array(snr),
        "object": pa.array([f"field{f:04d}" for f in field], pa.string()),
    }
    flags = np.zeros(n, dtype=np.int32)
    flags[snr < 15] |= Flag.LOW_SNR
    flags[labels["feh"] < -2.5] |= Flag.EXTRAPOLATED
    flags[rng.random(n) < 0.005] |= Flag.HEAVILY_MASKED
    for name in LABEL_NAMES:
        # Ensemble scatter grows at low S/N, with a long tail of disagreeing members.
        std = TYPICAL_STD[name] * (1 + 30 / snr) * rng.lognormal(0.0, 0.5, n)
        columns[name] = pa.array(labels[name].astype(np.float32))
        columns[f"{name}_std"] = pa.array(std.astype(np.float32))
        flags[std > 10 * TYPICAL_STD[name]] |= Flag.HIGH_STD
        if config.n_members:
            members = labels[name][:, None] + std[:, None] * rng.standard_normal((n, config.n_members))
            columns[f"{name}_members"] = pa.ListArray.from_arrays(
                np.arange(0, n * config.n_members + 1, config.n_members, dtype=np.int32),
                pa.array(members.astype(np.float32).ravel()),
            )
    digests = rng.bytes(32 * n).hex()
    columns["input_sha256"] = pa.array([digests[64 * k : 64 * (k + 1)] for k in range(n)], pa.string())
    columns["flags"] = pa.array(flags)
    groups = list(setup.line_windows)
    wave = setup.wave
    for name in LABEL_NAMES:
        shares = rng.dirichlet(np.ones(len(groups) + 1), n)  # the last share falls outside all windows
        for i, group in enumerate(groups):
            columns[saliency_column(name, group)] = pa.array(shares[:, i].astype(np.float32))
        columns[saliency_column(name, "peak_wave")] = pa.array(
            wave[rng.integers(0, wave.size, n)].astype(np.float32)
        )
    columns["model_id"] = pa.array([config.model_id] * n, pa.string())
    columns["run_id"] = pa.array([config.run_id] * n, pa.string())
    processed = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    columns["processed_at"] = pa.array([processed] * n, COLUMN_TYPES["processed_at"])
    return pa.table(columns)


def iter_synthetic(setup: Setup, config: SyntheticCatalogue, n: int, chunk_rows: int = 100_000):
    """All ``n`` rows in chunks of ``chunk_rows`` (streaming: memory stays flat for any n)."""
    for start in range(0, n, chunk_rows):
        yield synthetic_label_rows(setup, config, start, min(chunk_rows, n - start))
