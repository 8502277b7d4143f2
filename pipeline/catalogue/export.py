"""Query results out of Arrow: Parquet, CSV and FITS files, and a readable terminal table.

FITS output is a binary table with ``TUNIT`` keywords (K for Teff, dex for log g and the abundances,
deg for positions, Angstrom for saliency peak wavelengths), so TOPCAT and astropy show units. FITS has
no nulls for floats or timestamps: null floats become NaN, null integers get a ``TNULL`` value, null
strings become empty, timestamps become ISO 8601 strings and list columns (per-member labels)
fixed-length vectors padded with NaN.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from speclabel.core.errors import UsageError
from speclabel.core.labels import LABELS
from speclabel.core.storage import atomic_output, exists, filesystem_and_path

from .layout import SALIENCY_PREFIX

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".fits": "fits", ".fit": "fits"}


def column_unit(name: str) -> str | None:
    """The physical unit of a catalogue column, as a FITS ``TUNIT`` string; None if unitless."""
    for label in LABELS:
        if name in (label.name, f"{label.name}_std", f"{label.name}_members"):
            return label.unit
    if name in ("ra", "dec", "cone_distance"):
        return "deg"
    if name.startswith(SALIENCY_PREFIX) and name.endswith("_peak_wave"):
        return "Angstrom"
    return None


def output_format(path: str) -> str:
    for suffix, fmt in FORMATS.items():
        if path.lower().endswith(suffix):
            return fmt
    raise UsageError(f"cannot tell the output format of {path!r}: name it .parquet, .csv or .fits")


def write_table(table: pa.Table, path: str, *, overwrite: bool = False) -> str:
    """Write ``table`` to a local path or URI in the format its suffix names; returns the format.

    The file appears complete or not at all (written beside the target and moved into place)."""
    fmt = output_format(path)
    fs, target = filesystem_and_path(path)
    if not overwrite and exists(fs, target):
        raise UsageError(f"{path} exists; choose another name or pass --overwrite")
    if fmt == "parquet":
        with atomic_output(fs, target) as out:
            pq.write_table(table, out, compression="zstd")
    elif fmt == "csv":
        with atomic_output(fs, target) as out:
            pacsv.write_csv(csv_ready(table), out)
    else:
        data = fits_bytes(table)
        with atomic_output(fs, target) as out:
            out.write(data)
    return fmt


def csv_ready(table: pa.Table) -> pa.Table:
    """List columns as text (``[1.5, 2.5]``), which CSV can hold; everything else as it is."""
    for i, f in enumerate(table.schema):
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type):
            text = [
                None if v is None else "[" + ", ".join(repr(x) for x in v) + "]"
                for v in table.column(i).to_pylist()
            ]
            table = table.set_column(i, f.name, pa.array(text, pa.string()))
    return table


def fits_bytes(table: pa.Table) -> bytes:
    """``table`` as a FITS file (empty primary HDU + one binary table HDU named LABELS)."""
    from astropy.io import fits
    from astropy.table import MaskedColumn, Table

    out = Table()
    for f, column in zip(table.schema, table.columns, strict=True):
        out[f.name] = _fits_column(f.type, column, MaskedColumn)
    hdu = fits.table_to_hdu(out)
    hdu.name = "LABELS"
    # Units go straight into TUNIT: astropy refuses to write function units such as dex.
    for i, name in enumerate(table.column_names, start=1):
        unit = column_unit(name)
        if unit:
            hdu.header[f"TUNIT{i}"] = unit
    hdu.header["ORIGIN"] = "speclabel"
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buffer)
    return buffer.getvalue()


def _fits_column(dtype: pa.DataType, column: pa.ChunkedArray, masked_column):
    if pa.types.is_floating(dtype):
        return (
            column.cast(pa.float64() if pa.types.is_float64(dtype) else pa.float32())
            .fill_null(np.nan)
            .to_numpy()
        )
    if pa.types.is_boolean(dtype) and column.null_count:
        # astropy writes a masked logical as T; FITS has no null there that readers agree on, so a
        # nullable boolean is 0/1 in a 16-bit integer column with TNULL.
        column = column.cast(pa.int16())
    if pa.types.is_integer(column.type) or pa.types.is_boolean(column.type):
        values = column.fill_null(False if pa.types.is_boolean(column.type) else 0).to_numpy(
            zero_copy_only=False
        )
        if column.null_count:
            return masked_column(values, mask=column.is_null().to_numpy(zero_copy_only=False))
        return values
    if pa.types.is_timestamp(dtype):
        text = pc.strftime(column, format="%Y-%m-%dT%H:%M:%S", locale="C")
        return np.array(text.fill_null("").to_pylist(), dtype=str)
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        rows = column.to_pylist()
        width = max((len(r) for r in rows if r is not None), default=1)
        matrix = np.full((len(rows), max(width, 1)), np.nan, dtype=np.float64)
        for i, r in enumerate(rows):
            if r is not None:
                matrix[i, : len(r)] = [np.nan if v is None else v for v in r]
        return matrix.astype(np.float32) if pa.types.is_float32(dtype.value_type) else matrix
    return np.array(column.cast(pa.string()).fill_null("").to_pylist(), dtype=str)


def format_table(table: pa.Table, *, total: int | None = None, more: bool = False) -> str:
    """A readable fixed-width rendering for the terminal, with a line saying what is shown
    (``more``: the result has rows beyond these, of a number not counted)."""
    import pandas as pd

    frame = table.to_pandas()
    with pd.option_context("display.max_colwidth", 40, "display.width", 250):
        text = frame.to_string(index=False, float_format=_float) if len(frame) else "(no rows)"
    shown = f"{table.num_rows} row{'s' * (table.num_rows != 1)}"
    if total is not None and total > table.num_rows:
        shown += f" of {total} (use --limit N or --out FILE for more)"
    elif more:
        shown += "; more follow: use LIMIT N, or --out FILE for all"
    return f"{text}\n({shown})"


def _float(value: float) -> str:
    return f"{value:.6g}"
