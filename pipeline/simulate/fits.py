"""The synthetic survey as FITS: the Gaia-ESO-like 1-D image layout that ``speclabel ingest`` reads."""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from speclabel.core.arrays import arm_matrix
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import SPEED_OF_LIGHT_KMS, Setup
from speclabel.core.storage import atomic_output, filesystem_and_path, join, write_bytes_atomic

from ..fits_formats import write_wcs1d
from .survey import DEFECT_COLUMN, SurveyConfig, iter_survey

FITS_RV_DISPERSION_KMS = 40.0  # heliocentric radial velocities of disc and halo stars
FITS_TRUTH_FILE = "labels.parquet"
FITS_SPECTRA_DIR = "spectra"


def fits_truth_schema(config: SurveyConfig | None = None) -> pa.Schema:
    """The label table beside the FITS files, keyed by the id ingest gives each star (its CNAME);
    with a ``defect`` column where ``config`` injects defects."""
    fields = [
        pa.field("spectrum_id", pa.string(), nullable=False),
        pa.field("object", pa.string()),
        pa.field("ra", pa.float64()),
        pa.field("dec", pa.float64()),
        pa.field("snr", pa.float32()),
        pa.field("vrad", pa.float64()),
        pa.field("release", pa.string()),
    ]
    fields += [pa.field(name, pa.float32()) for name in LABEL_NAMES]
    if config is not None and config.defect_fraction > 0:
        fields.append(pa.field(DEFECT_COLUMN, pa.string()))
    return pa.schema(fields)


def write_fits_chunk(
    location: str, setup: Setup, config: SurveyConfig, table: pa.Table, chunk: int
) -> pa.Table:
    """Write one chunk as one FITS file per star and arm; return its rows of the truth table.

    Each spectrum is written in the observed (barycentric) frame of a drawn radial velocity: the
    rest-frame grid scaled by (1 + v/c), which is still linear, so the flux needs no resampling and
    ingest's rest-frame shift recovers the setup's grid exactly. The header's SNR is the catalogued
    S/N for the first arm and the median flux/σ of the others.
    """
    fs, root = filesystem_and_path(location)
    rng = np.random.default_rng([config.seed, chunk, 0xF175])
    vrad = rng.normal(0.0, FITS_RV_DISPERSION_KMS, table.num_rows)
    ids = table.column("spectrum_id").to_pylist()
    cnames = table.column("object").to_pylist()
    ra, dec = table.column("ra").to_pylist(), table.column("dec").to_pylist()
    snr = table.column("snr").to_pylist()
    for index, arm in enumerate(setup.arms):
        flux, _ = arm_matrix(table.column(arm.flux_column), arm.n_pixels)
        ivar, _ = arm_matrix(table.column(arm.ivar_column), arm.n_pixels)
        with np.errstate(divide="ignore"):
            sigma = np.where(ivar > 0, 1.0 / np.sqrt(ivar), 0.0)
        for k in range(table.num_rows):
            good = ivar[k] > 0
            arm_snr = snr[k] if index == 0 else float(np.median(flux[k][good] / sigma[k][good]))
            scale = 1.0 + vrad[k] / SPEED_OF_LIGHT_KMS
            cards = {
                "OBJECT": ids[k],
                "CNAME": cnames[k],
                "RA": (ra[k], "[deg] ICRS"),
                "DEC": (dec[k], "[deg] ICRS"),
                "SETUP": arm.name.upper(),
                "SNR": (round(float(arm_snr), 3), "median signal-to-noise"),
                "VRAD": (float(vrad[k]), "[km/s] heliocentric radial velocity"),
                "SPECSYS": "BARYCENT",
                "SPEC_RES": arm.resolution,
                "CONTNORM": (True, "continuum normalised"),
                "ORIGIN": "speclabel simulate",
            }
            data = write_wcs1d(
                flux[k],
                sigma[k],
                wave_start=arm.wave_start * scale,
                wave_step=arm.wave_step * scale,
                medium=setup.medium,
                cards=cards,
            )
            path = join(root, FITS_SPECTRA_DIR, f"{chunk:05d}", f"{ids[k]}_{arm.name}.fits")
            write_bytes_atomic(fs, path, data)
    columns = {
        "spectrum_id": table.column("object"),
        "object": table.column("spectrum_id"),
        "ra": table.column("ra"),
        "dec": table.column("dec"),
        "snr": table.column("snr"),
        "vrad": pa.array(vrad, pa.float64()),
        "release": table.column("release"),
        **{name: table.column(name) for name in LABEL_NAMES},
    }
    if DEFECT_COLUMN in table.column_names:
        columns[DEFECT_COLUMN] = table.column(DEFECT_COLUMN)
    schema = fits_truth_schema(config)
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def write_fits(location: str, setup: Setup, config: SurveyConfig, workers: int | None = None) -> int:
    """Write the survey as FITS files under ``location/spectra/<chunk>/`` plus ``location/labels.parquet``.

    The workers write their chunks' FITS files themselves; only the small truth tables come back,
    so memory stays flat whatever ``config.n``.
    """
    fs, root = filesystem_and_path(location)
    writer_fn = partial(write_fits_chunk, location, setup, config)
    rows = 0
    with (
        atomic_output(fs, join(root, FITS_TRUTH_FILE)) as out,
        pq.ParquetWriter(out, fits_truth_schema(config)) as writer,
    ):
        for truth in iter_survey(setup, config, workers, then=writer_fn):
            writer.write_table(truth)
            rows += truth.num_rows
    return rows
