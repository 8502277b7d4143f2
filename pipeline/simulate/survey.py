"""The synthetic survey as Parquet: footprint, noise, chunks keyed by (seed, chunk index).

Rows are made in fixed-size chunks, each from its own random stream keyed by (seed, chunk index), so
the same seed gives the same rows in the same order however many processes do the work.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from speclabel.core.arrays import fixed_size_list
from speclabel.core.contract import DEFECT_COLUMN, spectra_schema
from speclabel.core.errors import ConfigError
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import Setup
from speclabel.core.storage import atomic_output, filesystem_and_path

from .defects import DEFECTS, inject
from .labels import draw_labels, load_label_prior, resample_labels
from .spectra import synthesize


@dataclass(frozen=True)
class SurveyConfig:
    n: int
    seed: int = 0
    snr_range: tuple[float, float] = (10.0, 150.0)
    release: str = "SIM"
    chunk_size: int = 500
    masked_fraction: float = 0.003
    rv_residual_kms: float = 1.0
    continuum_error: float = 0.002
    n_fields: int = 60
    label_prior: str | None = None
    # The fraction of spectra given one defect each (pipeline/simulate/defects.py, kind drawn
    # uniformly from DEFECTS) before the noise, recorded in a ``defect`` column: a release to check
    # the anomaly screening on. Its draws have their own random stream, so the other spectra are
    # the same as without defects.
    defect_fraction: float = 0.0
    # The same stars (same labels, ids and positions as without it) as noise-free reference spectra:
    # no photon noise, velocity residual, continuum error or masked pixels, and no ivar columns.
    # What a synthetic grid at the training labels is for the label refinement (model/refine.py),
    # as ../shared/data's noise-free twins are for the shared file.
    noise_free: bool = False

    def __post_init__(self) -> None:
        if self.n < 0 or self.chunk_size < 1:
            raise ConfigError("n must be >= 0 and chunk_size >= 1")
        if not 0.0 <= self.defect_fraction <= 1.0:
            raise ConfigError(f"defect_fraction must be within [0, 1], got {self.defect_fraction}")
        lo, hi = self.snr_range
        if not 0 < lo <= hi:
            raise ConfigError(f"snr range must satisfy 0 < A <= B, got {self.snr_range}")

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)


def survey_fields(seed: int, n_fields: int) -> tuple[np.ndarray, np.ndarray]:
    """Field centres (deg) of a southern-sky fibre survey: a fixed set per seed, denser near the plane."""
    rng = np.random.default_rng([seed, 0xF1E1D])
    ra = rng.uniform(0.0, 360.0, n_fields)
    dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-80.0)), np.sin(np.radians(15.0)), n_fields)))
    return ra, dec


def _cname(ra: float, dec: float) -> str:
    """Gaia-ESO style coordinate name, e.g. 12345678-1234567."""
    h = ra / 15.0
    hh, mm = int(h), int((h % 1) * 60)
    ss = ((h * 60) % 1) * 60
    sign = "-" if dec < 0 else "+"
    d = abs(dec)
    dd, dm = int(d), int((d % 1) * 60)
    ds = ((d * 60) % 1) * 60
    return f"{hh:02d}{mm:02d}{int(ss * 100):04d}{sign}{dd:02d}{dm:02d}{int(ds * 10):03d}"


def simulate_chunk(setup: Setup, config: SurveyConfig, chunk: int, prior: dict | None = None) -> pa.Table:
    """Rows ``chunk * chunk_size ...`` of the survey, always the same for the same (seed, chunk)."""
    start = chunk * config.chunk_size
    n = min(config.chunk_size, config.n - start)
    rng = np.random.default_rng([config.seed, chunk])
    labels = resample_labels(rng, n, prior) if prior is not None else draw_labels(rng, n)
    labels["rv"] = rng.normal(0.0, config.rv_residual_kms, n)
    if config.noise_free:
        labels["rv"][:] = 0.0
    flux = synthesize(setup, labels)
    defect = None
    if config.defect_fraction > 0:
        flux, defect = _with_defects(setup, flux, config.defect_fraction, [config.seed, chunk, 0xDEFEC7])

    lo, hi = config.snr_range
    snr = np.exp(rng.uniform(np.log(lo), np.log(hi), n))  # log-uniform, as survey S/N distributions
    columns: dict[str, pa.Array] = {}
    for i, (arm, part) in enumerate(zip(setup.arms, setup.arm_slices.values(), strict=True)):
        # The first arm has the catalogued S/N; red arms of fibre spectrographs scatter around it.
        arm_snr = snr if i == 0 else snr * rng.uniform(0.8, 1.6, n)
        x = np.linspace(-1.0, 1.0, arm.n_pixels)
        tilt = rng.normal(0, config.continuum_error, (n, 3))
        continuum = 1.0 + tilt[:, :1] + tilt[:, 1:2] * x + tilt[:, 2:3] * (x**2 - 1 / 3)
        # Drawn in noise-free mode too: the positions below come from the same random stream.
        observed, ivar = photon_noise(flux[:, part] * continuum, arm_snr, rng)
        ivar[rng.random(ivar.shape) < config.masked_fraction] = 0.0
        if config.noise_free:
            columns[arm.flux_column] = fixed_size_list(flux[:, part].astype(np.float32))
            continue
        columns[arm.flux_column] = fixed_size_list(observed)
        columns[arm.ivar_column] = fixed_size_list(ivar)

    field_ra, field_dec = survey_fields(config.seed, config.n_fields)
    field = rng.integers(0, config.n_fields, n)
    radius = 0.2 * np.sqrt(rng.random(n))  # GIRAFFE/FLAMES field of view: 25 arcmin across
    angle = rng.uniform(0, 2 * np.pi, n)
    dec = np.clip(field_dec[field] + radius * np.sin(angle), -89.9, 89.9)
    ra = (field_ra[field] + radius * np.cos(angle) / np.cos(np.radians(dec))) % 360.0

    columns["spectrum_id"] = pa.array([f"{config.release}-{start + k:08d}" for k in range(n)], pa.string())
    columns["ra"] = pa.array(ra, pa.float64())
    columns["dec"] = pa.array(dec, pa.float64())
    columns["snr"] = pa.array(snr.astype(np.float32))
    columns["object"] = pa.array([_cname(r, d) for r, d in zip(ra, dec, strict=True)], pa.string())
    columns["release"] = pa.array([config.release] * n, pa.string())
    for name in LABEL_NAMES:
        columns[name] = pa.array(labels[name].astype(np.float32))
    if defect is not None:
        columns[DEFECT_COLUMN] = pa.array(defect, pa.string())
    schema = survey_schema(setup, config)
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def _with_defects(setup: Setup, flux: np.ndarray, fraction: float, seed: list[int]):
    """``flux`` with a defect injected into ``fraction`` of the rows, and each row's defect kind
    (None for a clean row). Companions and foreign arms come from the chunk's next star."""
    rng = np.random.default_rng(seed)
    hit = rng.random(len(flux)) < fraction
    kinds = np.array(DEFECTS)[rng.integers(0, len(DEFECTS), len(flux))]
    other = np.roll(flux, -1, axis=0)
    out = flux.copy()
    for kind in DEFECTS:
        rows = hit & (kinds == kind)
        if rows.any():
            out[rows] = inject(kind, flux[rows], other[rows], setup, rng)
    return out, [str(k) if h else None for k, h in zip(kinds, hit, strict=True)]


def photon_noise(
    flux: np.ndarray, snr: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free normalised ``flux [N, P]`` observed with photon noise at continuum S/N ``snr [N]``:
    (observed flux, its ivar), both float32 in shape. Pixels darker than 2 % keep that much light
    (saturated cores of a real spectrum are never perfectly black)."""
    model = np.maximum(flux, 0.02)
    sigma = np.sqrt(model) / np.asarray(snr)[:, None]
    observed = model + sigma * rng.standard_normal(model.shape, dtype=np.float32)
    return observed.astype(np.float32), (1.0 / sigma**2).astype(np.float32)


def survey_schema(setup: Setup, config: SurveyConfig | None = None) -> pa.Schema:
    """The survey's columns: the labelled spectra contract, plus ``defect`` where the config injects them."""
    schema = spectra_schema(setup, labelled=True)
    if config is not None and config.noise_free:
        for arm in setup.arms:
            schema = schema.remove(schema.get_field_index(arm.ivar_column))
    if config is not None and config.defect_fraction > 0:
        schema = schema.append(pa.field(DEFECT_COLUMN, pa.string()))
    return schema


def _chunk_worker(args) -> pa.Table:
    setup, config, chunk, prior, then = args
    table = simulate_chunk(setup, config, chunk, prior)
    return table if then is None else then(table, chunk)


def iter_survey(
    setup: Setup,
    config: SurveyConfig,
    workers: int | None = None,
    then: Callable[[pa.Table, int], pa.Table] | None = None,
) -> Iterator[pa.Table]:
    """The survey's chunks in order; ``workers`` > 1 makes them in parallel processes.

    ``then(table, chunk)``, a picklable function, runs on each chunk in the worker that made it (the
    FITS writer uses it to write files in parallel) and its result is yielded instead.
    """
    prior = load_label_prior(config.label_prior) if config.label_prior else None
    tasks = [(setup, config, chunk, prior, then) for chunk in range(config.n_chunks)]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    if workers <= 1:
        yield from map(_chunk_worker, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        # map() keeps order, so output is identical to the serial path; at most 2x workers chunks
        # are in flight, which bounds memory whatever n is.
        pending = []
        for task in tasks:
            pending.append(pool.submit(_chunk_worker, task))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def write_parquet(location: str, setup: Setup, config: SurveyConfig, workers: int | None = None) -> int:
    """Write the survey as one Parquet file, one row group per chunk, published atomically.

    Memory stays flat whatever ``config.n``: chunks stream from the workers into the writer.
    """
    fs, path = filesystem_and_path(location)
    schema = survey_schema(setup, config)
    rows = 0
    with atomic_output(fs, path) as out, pq.ParquetWriter(out, schema) as writer:
        for table in iter_survey(setup, config, workers):
            writer.write_table(table, row_group_size=config.chunk_size)
            rows += table.num_rows
    return rows
