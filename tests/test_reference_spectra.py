"""pipeline.reference_spectra: noise-free reference spectra read from Parquet, every row kept or left
out with its reason."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from forward_data import WINDOW_SETUP, noise_free_survey

from speclabel.core.arrays import spectra_arrays
from speclabel.core.errors import InputError
from speclabel.core.labels import LABEL_NAMES
from speclabel.model.splits import SplitRule
from speclabel.pipeline.reference_spectra import check_reference_spectra, read_reference_spectra

SPLIT = SplitRule(test_fraction=0.2)


def _damaged(table: pa.Table) -> pa.Table:
    """Row 1 repeats row 0's id, row 2 lacks Teff, row 3 has no hr21 flux."""
    ids = table.column("spectrum_id").to_pylist()
    ids[1] = ids[0]
    teff = table.column("teff").to_pylist()
    teff[2] = None
    flux = table.column("flux_hr21").to_pylist()
    flux[3] = None
    table = table.set_column(0, "spectrum_id", pa.array(ids, pa.string()))
    table = table.set_column(table.schema.get_field_index("teff"), "teff", pa.array(teff, pa.float32()))
    column = table.schema.get_field_index("flux_hr21")
    return table.set_column(
        column, table.schema.field(column), pa.array(flux, table.schema.field(column).type)
    )


def test_every_row_is_kept_or_left_out_with_its_reason(tmp_path):
    table = _damaged(noise_free_survey(60, 5))
    folder = tmp_path / "reference"
    folder.mkdir()
    pq.write_table(table.slice(0, 25), folder / "a.parquet")
    pq.write_table(table.slice(25), folder / "b.parquet")
    reference = read_reference_spectra(str(folder), WINDOW_SETUP, LABEL_NAMES, SPLIT)

    ids = np.array(table.column("spectrum_id").to_pylist(), dtype=object)
    test = SPLIT.is_test(ids)
    # The first reason that applies, in the module's order, by hand.
    expected = {"test_split": int(test.sum()), "missing_label": 0, "no_flux": 0, "duplicate": 0}
    for row, reason in ((2, "missing_label"), (3, "no_flux"), (1, "duplicate")):
        if not test[row]:
            expected[reason] += 1
    assert reference.left_out == expected
    assert reference.n_read == 60 == len(reference.library.labels) + sum(expected.values())
    keep = ~test
    keep[[1, 2, 3]] = False
    labels = np.stack([table.column(n).to_numpy(zero_copy_only=False) for n in LABEL_NAMES], 1)
    assert np.array_equal(reference.library.labels, labels[keep].astype(np.float64))
    flux = np.concatenate([spectra_arrays(table, WINDOW_SETUP).flux[a.name] for a in WINDOW_SETUP.arms], 1)
    assert np.array_equal(reference.library.flux, flux[keep]) and reference.library.mask.all()
    assert reference.source["rows_kept"] == keep.sum() and len(reference.source["files_fingerprint"]) == 64
    assert f"60 read, {keep.sum()} kept" in reference.summary()


def test_ivar_zero_masks_a_pixel(tmp_path):
    table = noise_free_survey(60, 5)
    ivar = np.ones((table.num_rows, WINDOW_SETUP.arms[0].n_pixels), np.float32)
    ivar[:, :10] = 0.0
    column = pa.FixedSizeListArray.from_arrays(pa.array(ivar.ravel()), ivar.shape[1])
    pq.write_table(table.append_column("ivar_hr10", column), tmp_path / "ref.parquet")
    reference = read_reference_spectra(str(tmp_path / "ref.parquet"), WINDOW_SETUP, LABEL_NAMES, SPLIT)
    assert not reference.library.mask[:, :10].any() and reference.library.mask[:, 10:].all()


def test_wrong_columns_or_setup_fail_before_any_spectrum_is_read(tmp_path):
    table = noise_free_survey(60, 5)
    pq.write_table(table.drop_columns(["alfe"]), tmp_path / "no_al.parquet")
    with pytest.raises(InputError, match=r"lack the column\(s\) \['alfe'\]"):
        check_reference_spectra(str(tmp_path / "no_al.parquet"), WINDOW_SETUP, LABEL_NAMES)
    declared = table.replace_schema_metadata({"speclabel.setup": "giraffe-hr15n"})
    pq.write_table(declared, tmp_path / "hr15n.parquet")
    with pytest.raises(InputError, match="on setup 'giraffe-hr15n'"):
        check_reference_spectra(str(tmp_path / "hr15n.parquet"), WINDOW_SETUP, LABEL_NAMES)
    few = table.filter(pc.invert(pc.is_in(table.column("spectrum_id"), table.column("spectrum_id")[:40])))
    pq.write_table(few, tmp_path / "few.parquet")
    with pytest.raises(InputError, match="needs at least 22"):
        read_reference_spectra(str(tmp_path / "few.parquet"), WINDOW_SETUP, LABEL_NAMES, SPLIT)
