"""Small spectra tables in both list encodings, for the contract, arrays and fingerprint tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from speclabel.core import contract


def spectra_table(setup, n=4, *, fixed=True, dtype=pa.float32(), labelled=False):
    rng = np.random.default_rng(0)
    cols = {"spectrum_id": pa.array([f"s{i}" for i in range(n)])}
    for arm in setup.arms:
        flux = rng.uniform(0.5, 1.0, (n, arm.n_pixels))
        ivar = np.full((n, arm.n_pixels), 100.0)
        for name, values in ((arm.flux_column, flux), (arm.ivar_column, ivar)):
            if fixed:
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), dtype), arm.n_pixels)
            else:
                cols[name] = pa.array(list(values), pa.list_(dtype))
    if labelled:
        for label, value in zip(contract.LABEL_NAMES, (5000.0, 3.0, -0.2, 0.1, 0.05), strict=True):
            cols[label] = pa.array([value] * n, pa.float32())
    return pa.table(cols)


def replace_row(table, column, index, values, value_type=pa.float32()):
    rows = table.column(column).to_pylist()
    rows[index] = values
    return table.set_column(
        table.schema.get_field_index(column), column, pa.array(rows, pa.list_(value_type))
    )
