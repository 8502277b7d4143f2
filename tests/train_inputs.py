"""Inputs for the train job's tests: a labelled survey with known bad rows, written as Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# (row, what is wrong with it) in faulty_survey(); rows 2, 3, 5 and 25 share two ids.
BAD_ROWS = {2: "duplicate_id", 3: "duplicate_id", 5: "duplicate_id", 25: "duplicate_id"}
BAD_ROWS |= {7: "nonfinite_flux", 9: "missing_label"}

TINY_MODEL_TOML = """
[arch]
conv_channels = [2, 2]
kernel_size = 5
pool_size = 8
dense_units = [8]
dropout = 0.1

[train]
epochs = {epochs}
batch_size = 8

[ensemble]
n_members = {members}

[ensemble.split]
test_fraction = 0.2
val_fraction = 0.25
"""


def faulty_survey(table: pa.Table) -> pa.Table:
    """The 40-row ``small_survey`` with the problems of :data:`BAD_ROWS`."""
    ids = table.column("spectrum_id").to_pylist()
    ids[3], ids[25] = ids[5], ids[2]  # one duplicate inside a file, one across files
    table = table.set_column(table.schema.get_field_index("spectrum_id"), "spectrum_id", pa.array(ids))
    flux_type = table.schema.field("flux_hr10").type
    n_pixels = flux_type.list_size
    flux = table.column("flux_hr10").combine_chunks().flatten().to_numpy().reshape(-1, n_pixels).copy()
    ivar = table.column("ivar_hr10").combine_chunks().flatten().to_numpy().reshape(-1, n_pixels)
    flux[7, int(np.flatnonzero(ivar[7] > 0)[0])] = np.nan  # NaN at a pixel that is not masked
    flux_array = pa.FixedSizeListArray.from_arrays(pa.array(flux.ravel(), flux_type.value_type), n_pixels)
    table = table.set_column(table.schema.get_field_index("flux_hr10"), "flux_hr10", flux_array)
    for name in ("teff", "logg", "feh", "mgfe", "alfe"):  # row 9 has no label at all
        values = table.column(name).to_pylist()
        values[9] = None
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.float32()))
    return table


def write_in_two_files(table: pa.Table, folder: Path, row_group_size: int = 8) -> Path:
    """Rows 0-19 and 20-39 in two files of several row groups each; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), folder / "part-a.parquet", row_group_size=row_group_size)
    pq.write_table(table.slice(half), folder / "part-b.parquet", row_group_size=row_group_size)
    return folder


def tiny_model_toml(path: Path, *, epochs: int, members: int) -> Path:
    path.write_text(TINY_MODEL_TOML.format(epochs=epochs, members=members))
    return path
