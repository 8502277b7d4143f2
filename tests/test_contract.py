"""The spectra data contract: every validation rule, both list encodings, masked pixels."""

import numpy as np
import pyarrow as pa
import pytest
from spectra_tables import replace_row, spectra_table

from speclabel.core import contract
from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.errors import InputError


@pytest.mark.parametrize("fixed", [True, False])
@pytest.mark.parametrize("dtype", [pa.float32(), pa.float64()])
def test_good_tables_pass_in_every_encoding(setup, fixed, dtype):
    table = spectra_table(setup, fixed=fixed, dtype=dtype)
    assert list(contract.validate(table, setup)) == [None] * 4


def test_each_bad_row_gets_its_specific_reason(setup):
    table = spectra_table(setup, n=8, fixed=False, labelled=True)
    flux = table.column("flux_hr10").to_pylist()
    ivar = table.column("ivar_hr21").to_pylist()
    table = replace_row(table, "flux_hr10", 0, flux[0][:-1])  # one pixel short
    nan_flux = list(flux[1])
    nan_flux[10] = float("nan")
    table = replace_row(table, "flux_hr10", 1, nan_flux)
    bad_ivar = list(ivar[2])
    bad_ivar[5] = -1.0
    table = replace_row(table, "ivar_hr21", 2, bad_ivar)
    table = replace_row(table, "flux_hr21", 3, None)
    ids = table.column("spectrum_id").to_pylist()
    ids[4] = "s0"
    table = table.set_column(0, "spectrum_id", pa.array(ids))
    teff = table.column("teff").to_pylist()
    teff[5] = -5.0
    teff[7] = None  # a row lacking one label is good: it trains the others
    table = table.set_column(table.schema.get_field_index("teff"), "teff", pa.array(teff, pa.float32()))
    for name in contract.LABEL_NAMES:  # row 6 lacks every label
        values = table.column(name).to_pylist()
        values[6] = None if name != "feh" else float("nan")
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.float32()))

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
    assert "none of the labels teff, logg, feh, mgfe, alfe" in reasons[6]


def test_a_label_set_of_the_model_is_what_a_labelled_row_is_checked_for(setup):
    table = spectra_table(setup, n=3, fixed=True, labelled=True).drop_columns(["mgfe", "alfe"])
    table = table.append_column("cafe", pa.array([0.1, None, None], pa.float32()))
    with pytest.raises(InputError, match="mgfe"):
        contract.validate(table, setup, labelled=True)
    reasons = contract.validate(table, setup, labelled=True, label_names=("cafe",))
    assert (
        reasons.tolist() == [None, reasons[1], reasons[2]]
        and contract.reason_code(reasons[1]) == "missing_label"
    )
    assert contract.validate(table, setup, labelled=True, label_names=("teff", "cafe")).tolist() == [None] * 3


def test_nan_flux_is_allowed_where_the_pixel_is_masked(setup):
    table = spectra_table(setup, n=1, fixed=False)
    flux = table.column("flux_hr10").to_pylist()[0]
    ivar = table.column("ivar_hr10").to_pylist()[0]
    flux[7], ivar[7] = float("nan"), 0.0
    table = replace_row(replace_row(table, "flux_hr10", 0, flux), "ivar_hr10", 0, ivar)
    assert list(contract.validate(table, setup)) == [None]
    model_flux, good = model_inputs(spectra_arrays(table, setup), setup)
    assert model_flux[0, 7] == 1.0 and not good[0, 7] and good[0, 8]


def test_known_duplicates_from_other_batches(setup):
    table = spectra_table(setup, n=3)
    reasons = contract.validate(table, setup, known_duplicates=np.array([False, True, False]))
    assert [r is None for r in reasons] == [True, False, True]


def test_table_level_problems_raise_input_error(setup):
    table = spectra_table(setup).drop_columns(["flux_hr21"])
    with pytest.raises(InputError, match="flux_hr21"):
        contract.validate(table, setup)
    other = spectra_table(setup).replace_schema_metadata({"speclabel.setup": "uves-580"})
    with pytest.raises(InputError, match="declares setup 'uves-580'"):
        contract.validate(other, setup)
    with pytest.raises(InputError, match="teff"):
        contract.validate(spectra_table(setup), setup, labelled=True)


def test_quarantine_table_schema():
    q = contract.quarantine_table(["a", "b"], ["duplicate_id: x", "wrong_length: y"], "in.parquet")
    assert q.schema == contract.QUARANTINE_SCHEMA
    assert q.column("reason").to_pylist() == ["duplicate_id", "wrong_length"]
