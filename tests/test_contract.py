"""The spectra data contract: every validation rule, both list encodings, hashing, model inputs."""

import numpy as np
import pyarrow as pa
import pytest

from speclabel.core import contract
from speclabel.core.arrays import arm_matrix, model_inputs, spectra_arrays
from speclabel.core.errors import InputError
from speclabel.core.fingerprints import spectrum_sha256


def _table(setup, n=4, *, fixed=True, dtype=pa.float32(), labelled=False):
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


def _replace(table, column, index, values, value_type=pa.float32()):
    rows = table.column(column).to_pylist()
    rows[index] = values
    return table.set_column(
        table.schema.get_field_index(column), column, pa.array(rows, pa.list_(value_type))
    )


@pytest.mark.parametrize("fixed", [True, False])
@pytest.mark.parametrize("dtype", [pa.float32(), pa.float64()])
def test_good_tables_pass_in_every_encoding(setup, fixed, dtype):
    table = _table(setup, fixed=fixed, dtype=dtype)
    assert list(contract.validate(table, setup)) == [None] * 4


def test_arm_matrix_matches_numpy(setup):
    table = _table(setup, fixed=False)
    table = _replace(table, "flux_hr10", 2, None)
    table = _replace(table, "flux_hr10", 3, [1.0] * 10)
    matrix, status = arm_matrix(table.column("flux_hr10"), 5601)
    expected = np.array(table.column("flux_hr10").to_pylist()[0], dtype=np.float32)
    assert np.array_equal(matrix[0], expected)
    assert list(status) == [0, 0, 1, 2]
    assert np.isnan(matrix[2]).all() and np.isnan(matrix[3]).all()
    # A sliced fixed-size column keeps its offset.
    fixed = _table(setup).column("flux_hr21").combine_chunks().slice(1, 2)
    sliced, _ = arm_matrix(fixed, 10341)
    assert np.array_equal(sliced[0], np.array(fixed.to_pylist()[0], dtype=np.float32))


def test_each_bad_row_gets_its_specific_reason(setup):
    table = _table(setup, n=8, fixed=False, labelled=True)
    flux = table.column("flux_hr10").to_pylist()
    ivar = table.column("ivar_hr21").to_pylist()
    table = _replace(table, "flux_hr10", 0, flux[0][:-1])  # one pixel short
    nan_flux = list(flux[1])
    nan_flux[10] = float("nan")
    table = _replace(table, "flux_hr10", 1, nan_flux)
    bad_ivar = list(ivar[2])
    bad_ivar[5] = -1.0
    table = _replace(table, "ivar_hr21", 2, bad_ivar)
    table = _replace(table, "flux_hr21", 3, None)
    ids = table.column("spectrum_id").to_pylist()
    ids[4] = "s0"
    table = table.set_column(0, "spectrum_id", pa.array(ids))
    teff = table.column("teff").to_pylist()
    teff[5] = -5.0
    teff[6] = None
    table = table.set_column(table.schema.get_field_index("teff"), "teff", pa.array(teff, pa.float32()))

    reasons = contract.validate(table, setup, labelled=True)
    codes = [None if r is None else contract.reason_code(r) for r in reasons]
    assert codes == [
        contract.WRONG_LENGTH,
        contract.NONFINITE_FLUX,
        contract.NEGATIVE_IVAR,
        contract.MISSING_ARM,
        contract.DUPLICATE_ID,
        contract.LABEL_OUT_OF_RANGE,
        contract.MISSING_LABEL,
        None,
    ]
    assert "5600 values" in reasons[0] and "5601" in reasons[0]
    assert "teff = -5" in reasons[5]


def test_nan_flux_is_allowed_where_the_pixel_is_masked(setup):
    table = _table(setup, n=1, fixed=False)
    flux = table.column("flux_hr10").to_pylist()[0]
    ivar = table.column("ivar_hr10").to_pylist()[0]
    flux[7], ivar[7] = float("nan"), 0.0
    table = _replace(_replace(table, "flux_hr10", 0, flux), "ivar_hr10", 0, ivar)
    assert list(contract.validate(table, setup)) == [None]
    model_flux, good = model_inputs(spectra_arrays(table, setup), setup)
    assert model_flux[0, 7] == 1.0 and not good[0, 7] and good[0, 8]


def test_known_duplicates_from_other_batches(setup):
    table = _table(setup, n=3)
    reasons = contract.validate(table, setup, known_duplicates=np.array([False, True, False]))
    assert [r is None for r in reasons] == [True, False, True]


def test_table_level_problems_raise_input_error(setup):
    table = _table(setup).drop_columns(["flux_hr21"])
    with pytest.raises(InputError, match="flux_hr21"):
        contract.validate(table, setup)
    other = _table(setup).replace_schema_metadata({"speclabel.setup": "uves-580"})
    with pytest.raises(InputError, match="declares setup 'uves-580'"):
        contract.validate(other, setup)
    with pytest.raises(InputError, match="teff"):
        contract.validate(_table(setup), setup, labelled=True)


def test_sha256_is_stable_and_sees_any_change(setup):
    table = _table(setup, n=2)
    arrays = spectra_arrays(table, setup)
    first = spectrum_sha256(arrays, setup)
    assert first == spectrum_sha256(spectra_arrays(_table(setup, n=2, fixed=False), setup), setup)
    arrays.flux["hr21"][1, 100] += 1e-3
    second = spectrum_sha256(arrays, setup)
    assert first[0] == second[0] and first[1] != second[1]
    assert len(first[0]) == 64


def test_quarantine_table_schema():
    q = contract.quarantine_table(["a", "b"], ["duplicate_id: x", "wrong_length: y"], "in.parquet")
    assert q.schema == contract.QUARANTINE_SCHEMA
    assert q.column("reason").to_pylist() == ["duplicate_id", "wrong_length"]
