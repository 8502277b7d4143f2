"""Fingerprints: per-spectrum sha256 and the order-free data fingerprint of a labelled table."""

import numpy as np
import pyarrow as pa
from spectra_tables import spectra_table

from speclabel.core.arrays import row_digests, spectra_arrays
from speclabel.core.fingerprints import DataFingerprint, spectrum_sha256


def test_sha256_is_stable_and_sees_any_change(setup):
    table = spectra_table(setup, n=2)
    arrays = spectra_arrays(table, setup)
    first = spectrum_sha256(arrays, setup)
    assert first == spectrum_sha256(spectra_arrays(spectra_table(setup, n=2, fixed=False), setup), setup)
    arrays.flux["hr21"][1, 100] += 1e-3
    second = spectrum_sha256(arrays, setup)
    assert first[0] == second[0] and first[1] != second[1]
    assert len(first[0]) == 64


def test_fingerprint_is_order_free_mergeable_and_sensitive(small_survey, setup):
    whole = DataFingerprint().add_digests(row_digests(small_survey, setup))
    shuffled = small_survey.take(np.random.default_rng(0).permutation(40))
    parts = (
        DataFingerprint()
        .add_digests(row_digests(shuffled.slice(0, 15), setup))
        .merge(DataFingerprint().add_digests(row_digests(shuffled.slice(15), setup)))
    )
    assert parts.hexdigest == whole.hexdigest and parts.count == 40
    feh = small_survey.column("feh").to_numpy().copy()
    feh[7] += 0.01
    changed = small_survey.set_column(small_survey.schema.get_field_index("feh"), "feh", pa.array(feh))
    assert DataFingerprint().add_digests(row_digests(changed, setup)).hexdigest != whole.hexdigest
