"""Arrow columns to numpy: arm matrices of both list encodings, with the status of each row."""

import numpy as np
from spectra_tables import replace_row, spectra_table

from speclabel.core.arrays import arm_matrix


def test_arm_matrix_matches_numpy(setup):
    table = spectra_table(setup, fixed=False)
    table = replace_row(table, "flux_hr10", 2, None)
    table = replace_row(table, "flux_hr10", 3, [1.0] * 10)
    matrix, status = arm_matrix(table.column("flux_hr10"), 5601)
    expected = np.array(table.column("flux_hr10").to_pylist()[0], dtype=np.float32)
    assert np.array_equal(matrix[0], expected)
    assert list(status) == [0, 0, 1, 2]
    assert np.isnan(matrix[2]).all() and np.isnan(matrix[3]).all()
    # A sliced fixed-size column keeps its offset.
    fixed = spectra_table(setup).column("flux_hr21").combine_chunks().slice(1, 2)
    sliced, _ = arm_matrix(fixed, 10341)
    assert np.array_equal(sliced[0], np.array(fixed.to_pylist()[0], dtype=np.float32))
