"""The train job's data: one scan accounts for every row; in-memory and streamed rows are the same rows."""

import numpy as np
import pyarrow as pa
import pytest
from train_inputs import BAD_ROWS, faulty_survey, write_in_two_files

from speclabel.core.arrays import row_digests
from speclabel.core.errors import InputError
from speclabel.core.fingerprints import DataFingerprint
from speclabel.model.fit import member_data, sample_weights
from speclabel.model.splits import SplitRule
from speclabel.pipeline.training_data import StreamingRows, resolve_input, scan_in_memory, scan_streaming

SPLIT = SplitRule(test_fraction=0.2, val_fraction=0.25)


@pytest.fixture(scope="module")
def faulty(small_survey):
    return faulty_survey(small_survey)


@pytest.fixture(scope="module")
def faulty_folder(faulty, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-data") / "survey"
    return write_in_two_files(faulty, folder, row_group_size=10)


@pytest.fixture(scope="module")
def in_memory(faulty_folder, setup):
    training_input = resolve_input(str(faulty_folder), setup)
    return training_input, *scan_in_memory(training_input, setup)


def test_scan_accounts_for_every_row_and_quarantines_every_copy_of_a_duplicate(in_memory, faulty, setup):
    training_input, training_set, rows = in_memory
    assert len(training_input.files) == 2 and len(training_input.pieces) == 4  # 20 rows in groups of 10
    assert training_set.n_input == 40 and training_set.n_used == 40 - len(BAD_ROWS)
    expected = {}
    for reason in BAD_ROWS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert training_set.quarantined_by_reason() == expected
    quarantine = training_set.quarantine()
    bad_ids = {faulty.column("spectrum_id")[i].as_py() for i in BAD_ROWS}
    assert set(quarantine.column("spectrum_id").to_pylist()) == bad_ids == set(training_set.excluded_ids)
    good = faulty.filter(pa.array([i not in BAD_ROWS for i in range(40)]))
    assert list(rows.arrays["spectrum_id"]) == good.column("spectrum_id").to_pylist()
    # The fingerprint of the kept digests is the fingerprint of the good rows as a table.
    assert training_set.fingerprint() == DataFingerprint().add_digests(row_digests(good, setup)).hexdigest


def test_the_recorded_location_is_absolute(faulty_folder, setup, monkeypatch):
    monkeypatch.chdir(faulty_folder.parent)
    training_input = resolve_input(faulty_folder.name, setup)
    training_set, _ = scan_in_memory(training_input, setup)
    assert training_set.describe("memory")["location"] == str(faulty_folder)


def test_unreadable_input_is_refused_with_the_file_named(tmp_path, setup):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"broken\.parquet"):
        resolve_input(str(tmp_path), setup)


def _rows_by_id(batches):
    """{label tuple: flux sum} over batches: identifies rows without relying on order."""
    out = {}
    for batch in batches:
        for labels, flux in zip(batch["labels"], batch["flux"], strict=True):
            out[tuple(np.round(labels, 6))] = float(np.asarray(flux, dtype=np.float64).sum())
    return out


@pytest.mark.ray
def test_streamed_rows_are_the_in_memory_rows_in_a_seeded_order(ray_session, in_memory, setup):
    training_input, training_set, rows = in_memory
    streamed_set = scan_streaming(training_input, setup, num_cpus=0.5)
    assert streamed_set.scan.column("reason").to_pylist() == training_set.scan.column("reason").to_pylist()
    assert streamed_set.fingerprint() == training_set.fingerprint()
    assert streamed_set.excluded_ids == training_set.excluded_ids

    streaming = StreamingRows(training_input, setup, streamed_set.excluded_ids)
    train_stream, val_stream = streaming.member(SPLIT, seed=1)
    train_mem, val_mem = member_data(rows.arrays, SPLIT, 1)
    epoch0 = list(train_stream.batches(0, 8, shuffle_seed=123))
    assert sum(len(b["labels"]) for b in epoch0) == len(train_mem)
    assert _rows_by_id(epoch0) == pytest.approx(_rows_by_id(train_mem.batches(0, 8, None)))
    assert _rows_by_id(val_stream.batches(0, 8, None)) == pytest.approx(
        _rows_by_id(val_mem.batches(0, 8, None))
    )
    # The same epoch seed gives the same batches (exact resume); another seed another order.
    again = list(train_stream.batches(0, 8, shuffle_seed=123))
    assert all(np.array_equal(a["flux"], b["flux"]) for a, b in zip(epoch0, again, strict=True))
    other = np.concatenate([b["labels"][:, 0] for b in train_stream.batches(1, 8, shuffle_seed=456)])
    assert not np.array_equal(other, np.concatenate([b["labels"][:, 0] for b in epoch0]))
    test_memory = _rows_by_id(rows.test_batches(SPLIT, 8))
    assert _rows_by_id(streaming.test_batches(SPLIT, 8)) == pytest.approx(test_memory)
    assert len(test_memory) == SPLIT.is_test(rows.arrays["spectrum_id"]).sum() > 0


def test_sample_weights_reach_the_in_memory_and_the_streamed_rows_by_id(in_memory, setup):
    """The job's density weights, by spectrum_id, in every member's batches in both modes."""
    from speclabel.model.training import TrainConfig
    from speclabel.pipeline.training_data import member_rows

    training_input, training_set, rows = in_memory
    label_arrays = training_set.label_arrays()
    ids = label_arrays["spectrum_id"]
    config = TrainConfig(density_weighting=1.0, density_neighbours=3)
    weights = sample_weights(label_arrays, ~SPLIT.is_test(ids), config)
    by_id = dict(zip(ids, weights.tolist(), strict=True))
    train_mem, _ = member_data(rows.weighted(by_id).arrays, SPLIT, 1)
    train_ids, _ = SPLIT.member_masks(rows.arrays["spectrum_id"], 1)
    expected = [by_id[sid] for sid in rows.arrays["spectrum_id"][train_ids]]
    assert train_mem.sample_weight.tolist() == expected and len(set(expected)) > 1
    streaming = StreamingRows(training_input, setup, training_set.excluded_ids).weighted(by_id)
    assert streaming.part(SPLIT, 1, "train").sample_weights == by_id
    # What a streamed train part's Ray Data task decodes from the input's rows:
    streamed = member_rows(
        training_input.read_table(),
        setup=setup,
        split=SPLIT,
        seed=1,
        part="train",
        excluded_ids=training_set.excluded_ids,
        sample_weights=by_id,
    )

    def by_labels(labels, weights):
        return {tuple(np.round(lab, 6)): w for lab, w in zip(labels, weights, strict=True)}

    assert by_labels(streamed["labels"], streamed["sample_weight"]) == by_labels(train_mem.labels, expected)
