"""A Gaia-ESO-style label catalogue of the synthetic survey: what a survey's own pipeline delivers.

Keyed by ``CNAME``, the id the spectra carry in a store: for ``--format fits`` the star's CNAME
(``speclabel ingest`` keys stars by it), for ``--format parquet`` the ``spectrum_id`` column.
Columns, in Gaia-ESO iDR6 spelling: ``SNR``, ``TEFF``/``E_TEFF`` (K), ``LOGG``/``E_LOGG``,
``FEH``/``E_FEH``, ``MG1``/``E_MG1``, ``AL1``/``E_AL1`` and ``PECULI``. Abundances are absolute,
A(X) = [X/Fe] + [Fe/H] + A(X)_sun, with the simulator's solar values (:data:`SOLAR_ABUNDANCES`,
Grevesse et al. 2007: A(Mg) = 7.53, A(Al) = 6.37), so ``mgfe = MG1 - FEH - 7.53``.

Like a real catalogue it is not the truth:

* each value is the true label plus Gaussian scatter of its quoted error, which grows as 1/S/N
  above a floor (Gaia-ESO-like: E_TEFF ~ 55 K at S/N 150, ~ 110 K at S/N 10);
* a fraction of each label column is null (NaN in FITS), the abundances most often;
* a few rows have errors ``large_error_factor`` times larger, and values scattered by them;
* ``PECULI`` (a boolean stand-in for Gaia-ESO's peculiarity codes: binaries, emission lines) marks
  a few rows whose values are off by more than their quoted errors say.

The catalogue is drawn from its own random stream keyed by the survey seed, in the survey's row
order, so the same seed gives the same catalogue however the spectra were written.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from speclabel.core.errors import ConfigError
from speclabel.core.storage import atomic_output, filesystem_and_path, write_bytes_atomic

from .spectra import ELEMENTS

# A(X)_sun of the absolute abundances: one place, the simulator's element table.
SOLAR_ABUNDANCES = {element: values[2] for element, values in ELEMENTS.items()}

# Catalogue column -> (true label, error floor, error x S/N, unit, systematic offset of PECULI rows).
LABEL_COLUMNS: dict[str, tuple[str, float, float, str, float]] = {
    "TEFF": ("teff", 50.0, 600.0, "K", 400.0),
    "LOGG": ("logg", 0.08, 1.2, "dex", 0.5),
    "FEH": ("feh", 0.04, 0.6, "dex", 0.3),
    "MG1": ("mgfe", 0.05, 0.8, "dex", 0.25),
    "AL1": ("alfe", 0.06, 1.0, "dex", 0.3),
}
# The element whose solar abundance turns [X/Fe] into A(X), for the absolute-abundance columns.
ABSOLUTE = {"MG1": "Mg", "AL1": "Al"}
# The columns of a truth table the catalogue is drawn from (``labels.parquet`` or the Parquet survey).
TRUTH_COLUMNS = ("spectrum_id", "snr", *(spec[0] for spec in LABEL_COLUMNS.values()))
FORMATS = {
    ".fits": "fits",
    ".fit": "fits",
    ".fts": "fits",
    ".fits.gz": "fits.gz",
    ".parquet": "parquet",
    ".csv": "csv",
}


def _default_nulls() -> dict[str, float]:
    return {"TEFF": 0.02, "LOGG": 0.03, "FEH": 0.05, "MG1": 0.15, "AL1": 0.25}


@dataclass(frozen=True)
class LabelCatalogueConfig:
    """How far the catalogue is from the truth; ``scatter=False`` gives the true labels exactly."""

    seed: int = 0
    null_fraction: Mapping[str, float] = field(default_factory=_default_nulls)
    large_error_fraction: float = 0.02
    large_error_factor: float = 10.0
    peculiar_fraction: float = 0.03
    scatter: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.null_fraction) - set(LABEL_COLUMNS)
        if unknown:
            raise ConfigError(f"null_fraction names unknown columns {sorted(unknown)}")
        fractions = [*self.null_fraction.values(), self.large_error_fraction, self.peculiar_fraction]
        if not all(0.0 <= f <= 1.0 for f in fractions):
            raise ConfigError("catalogue fractions must lie in [0, 1]")


def label_catalogue(truth: pa.Table, config: LabelCatalogueConfig = LabelCatalogueConfig()) -> pa.Table:
    """The catalogue rows of a truth table (``spectrum_id``, ``snr`` and the five true labels)."""
    n = truth.num_rows
    rng = np.random.default_rng([config.seed, 0xCA7A])
    snr = truth.column("snr").to_numpy(zero_copy_only=False).astype(np.float64)
    feh = truth.column("feh").to_numpy(zero_copy_only=False).astype(np.float64)
    large = rng.random(n) < config.large_error_fraction
    peculiar = rng.random(n) < config.peculiar_fraction
    columns: dict[str, pa.Array] = {
        "CNAME": truth.column("spectrum_id").combine_chunks(),
        "SNR": pa.array(snr.astype(np.float32)),
    }
    for name, (label, floor, per_snr, _, offset) in LABEL_COLUMNS.items():
        value = truth.column(label).to_numpy(zero_copy_only=False).astype(np.float64)
        if name in ABSOLUTE:
            value = value + feh + SOLAR_ABUNDANCES[ABSOLUTE[name]]
        error = (floor + per_snr / snr) * np.where(large, config.large_error_factor, 1.0)
        # Draws happen whether or not they are used, so scatter=False changes no other column.
        noise = rng.standard_normal(n)
        shift = offset * rng.choice([-1.0, 1.0], n) * rng.uniform(1.0, 2.0, n)
        if config.scatter:
            value = value + error * noise + np.where(peculiar, shift, 0.0)
        null = rng.random(n) < config.null_fraction.get(name, 0.0)
        columns[name] = pa.array(value.astype(np.float32), mask=null)
        columns[f"E_{name}"] = pa.array(error.astype(np.float32), mask=null)
    columns["PECULI"] = pa.array(peculiar)
    return pa.table(columns)


def _fits_bytes(table: pa.Table) -> bytes:
    from astropy.io import fits

    formats = {pa.float32(): "E", pa.bool_(): "L"}
    units = {name: spec[3] for name, spec in LABEL_COLUMNS.items()}
    cols = []
    for name in table.column_names:
        column = table.column(name)
        if column.type == pa.string():
            values = np.array(column.to_pylist(), dtype=str)
            fmt = f"{max(1, values.dtype.itemsize // 4)}A"
        else:
            # FITS floats have no null: a null is NaN, as in Gaia-ESO's tables.
            values = column.to_numpy(zero_copy_only=False)
            fmt = formats[column.type]
        cols.append(fits.Column(name=name, format=fmt, array=values))
    hdu = fits.BinTableHDU.from_columns(cols, name="LABELS")
    # Units go straight into TUNIT, as the catalogue export does: astropy refuses to write dex.
    for i, name in enumerate(table.column_names, start=1):
        unit = units.get(name.removeprefix("E_"))
        if unit:
            hdu.header[f"TUNIT{i}"] = unit
    hdu.header["ORIGIN"] = "speclabel simulate"
    for column, element in ABSOLUTE.items():
        hdu.header[f"SUN_{element.upper()}"] = (SOLAR_ABUNDANCES[element], f"A({element})_sun of {column}")
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buffer)
    return buffer.getvalue()


def catalogue_format(location: str) -> str | None:
    """The format a catalogue file name asks for (``fits``, ``fits.gz``, ``parquet``, ``csv``), or None."""
    lower = location.lower()
    return next((fmt for suffix, fmt in FORMATS.items() if lower.endswith(suffix)), None)


def write_label_catalogue(location: str, table: pa.Table) -> None:
    """Write the catalogue as FITS (by suffix, the Gaia-ESO form), Parquet or CSV, atomically."""
    fmt = catalogue_format(location)
    if fmt is None:
        raise ConfigError(f"label catalogue {location!r}: name it .fits, .fits.gz, .parquet or .csv")
    fs, path = filesystem_and_path(location)
    if fmt.startswith("fits"):
        data = _fits_bytes(table)
        if fmt == "fits.gz":
            import gzip

            data = gzip.compress(data, mtime=0)
        write_bytes_atomic(fs, path, data)
        return
    with atomic_output(fs, path) as out:
        if fmt == "parquet":
            pq.write_table(table, out)
        else:
            pacsv.write_csv(table, out)


def label_mapping_toml(where: str = "E_TEFF < 150 and not PECULI") -> str:
    """The ``[labels]`` and ``[selection]`` of a model.toml that trains on this catalogue: each label
    from its column, absolute abundances back to [X/Fe] with the same solar values, the errors for
    inverse-variance weighting (what a survey writes for its own catalogue; examples/gaia-eso.toml)."""
    lines = ["[train]", 'loss_weighting = "inverse_variance"', "", "[labels]"]
    for column, (label, _, _, unit, _) in LABEL_COLUMNS.items():
        expr = f"{column} - FEH - {SOLAR_ABUNDANCES[ABSOLUTE[column]]:g}" if column in ABSOLUTE else column
        lines.append(f'{label} = {{ expr = "{expr}", error = "E_{column}", unit = "{unit}" }}')
    return "\n".join([*lines, "", "[selection]", f'where = "{where}"', ""])
