"""labelling/inputs.py: the pre-pass (files, footers, fingerprint, duplicates, carried rows) and the
read tasks, with bounded memory and batch-sized blocks for a file of one large row group."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speclabel.core.arrays import spectra_arrays
from speclabel.core.contract import spectra_schema
from speclabel.core.fingerprints import spectrum_sha256
from speclabel.core.setups import Setup
from speclabel.pipeline.labelling import batch as B
from speclabel.pipeline.labelling.inputs import (
    ParquetInput,
    duplicate_rows,
    footer_bytes,
    inspect_file,
    read_spectra,
)
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk


@pytest.fixture(scope="module")
def survey(tiny_setup):
    return simulate_chunk(tiny_setup, SurveyConfig(n=12, seed=5, chunk_size=12), 0)


def test_duplicates_keep_the_first_occurrence_by_path_then_row(tmp_path):
    from speclabel.pipeline.labelling.inputs import InputFile

    files = [InputFile("a.parquet", 0, 4), InputFile("b.parquet", 0, 5)]
    ids = [
        pa.chunked_array([["x", "y", "x", None]]),
        pa.chunked_array([["z", "y", "", "x"], [""]]),
    ]
    found = duplicate_rows(files, ids)
    assert found["a.parquet"].tolist() == [2]
    assert found["b.parquet"].tolist() == [1, 3]


def test_prepass_refuses_whole_files_and_fingerprints_footers(tiny_setup, survey, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(survey, folder / "a.parquet")
    other = Setup.from_dict({**tiny_setup.to_dict(), "name": "other-setup"})
    pq.write_table(survey.cast(spectra_schema(other, labelled=True)), folder / "b.parquet")
    (folder / "c.parquet").write_bytes(b"not parquet at all")
    pq.write_table(survey.select(["spectrum_id", "ra", "dec"]), folder / "d.parquet")  # no flux at all
    source = ParquetInput.open(str(folder), tiny_setup)
    refused = {f.path.rsplit("/", 1)[1]: f.refused for f in source.files}
    assert refused["a.parquet"] is None
    assert refused["b.parquet"].startswith("wrong_setup: ") and "other-setup" in refused["b.parquet"]
    assert refused["c.parquet"].startswith("corrupt_file: ")
    assert refused["d.parquet"].startswith("wrong_schema: ") and "flux_blue" in refused["d.parquet"]
    assert source.rows_in == 3 * survey.num_rows and source.releases == ["SIM"]
    quarantined = pa.concat_tables(source.refused_quarantine())
    assert quarantined.num_rows == 2 * survey.num_rows + 1
    assert (
        quarantined.column("spectrum_id").to_pylist()[: survey.num_rows]
        == survey.column("spectrum_id").to_pylist()
    )
    assert sorted(set(quarantined.column("reason").to_pylist())) == [
        "corrupt_file",
        "wrong_schema",
        "wrong_setup",
    ]

    again = ParquetInput.open(str(folder), tiny_setup)
    assert again.fingerprint == source.fingerprint
    changed = survey.set_column(
        survey.schema.get_field_index("teff"), "teff", pa.array(np.zeros(12, np.float32))
    )
    pq.write_table(changed, folder / "a.parquet")
    assert ParquetInput.open(str(folder), tiny_setup).fingerprint != source.fingerprint
    info = inspect_file(source.fs, str(folder / "a.parquet"), tiny_setup)
    assert footer_bytes(source.fs, info.path, info.size) is not None


def test_release_values_from_statistics_or_the_column(tmp_path):
    from speclabel.core.storage import filesystem_and_path
    from speclabel.pipeline.labelling.inputs import release_values

    fs, _ = filesystem_and_path(str(tmp_path))
    table = pa.table({"spectrum_id": ["a", "b", "c", "d"], "release": ["DR1", "DR1", "DR2", None]})
    pq.write_table(table, tmp_path / "grouped.parquet", row_group_size=2)  # groups: {DR1}, {DR2, null}
    assert release_values(fs, str(tmp_path / "grouped.parquet")) == {"DR1", "DR2"}
    pq.write_table(table.slice(1, 2), tmp_path / "mixed.parquet")  # one group holding DR1 and DR2
    assert release_values(fs, str(tmp_path / "mixed.parquet")) == {"DR1", "DR2"}


def test_unchanged_rows_are_carried_and_never_read(tiny_setup, tmp_path):
    """reuse_unchanged: rows equal (id and content hash) to a live row are left out of the read; a
    row group made only of such rows is not read at all; duplicates are never carried."""
    survey = simulate_chunk(tiny_setup, SurveyConfig(n=9, seed=4, chunk_size=9), 0)
    survey = pa.concat_tables([survey, survey.slice(0, 1)])  # row 9 repeats row 0 exactly
    sha = spectrum_sha256(spectra_arrays(survey, tiny_setup), tiny_setup)
    assert sha[9] == sha[0]
    pq.write_table(
        survey.append_column("input_sha256", pa.array(sha)), tmp_path / "in.parquet", row_group_size=4
    )
    ids = survey.column("spectrum_id").to_pylist()
    live = {ids[i]: sha[i] for i in range(8)}
    live[ids[5]] = sha[6]  # spectrum 5 changed since it was labelled; 8 is new
    source = ParquetInput.open(str(tmp_path / "in.parquet"), tiny_setup)
    source.scan_ids()
    assert source.carry_unchanged(live) == {ids[i] for i in (0, 1, 2, 3, 4, 6, 7)}
    (path,) = source.rows_by_source()
    assert source.carried[path].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert source.carried_by_source() == {path: 7}
    items = source.read_tasks(read_rows=3)
    # group 0 (rows 0-3) is not read, nor group 1's last slice (row 7): carried rows only
    assert [(item["row_group"], item["start"]) for item in items] == [(1, 0), (2, 0)]
    rows = pa.concat_tables(read_spectra(pa.Table.from_pylist(items), source.fs, read_rows=3))
    assert rows.column("spectrum_id").to_pylist() == [ids[5], ids[8], ids[9]]
    assert rows.column(B.DUPLICATE).to_pylist() == [False, False, True]
    assert source.carry_unchanged({}) == set() and source.carried == {}


def _one_row_group(path, rows: int, pixels: int) -> int:
    """A file of ``rows`` small spectra in ONE row group (pyarrow's default below ~1 M rows);
    returns its decoded size in bytes."""
    values = np.random.default_rng(0).random(rows * pixels, dtype=np.float32)
    flux = pa.FixedSizeListArray.from_arrays(pa.array(values), pixels)
    table = pa.table({"spectrum_id": pa.array([f"s{i}" for i in range(rows)]), "flux": flux, "ivar": flux})
    pq.write_table(table, path, row_group_size=rows, compression="zstd")
    return table.nbytes


def _peak_bytes_reading(path, read_rows: int) -> int:
    """Peak Arrow memory of :func:`read_spectra` over the whole file, on a fresh memory pool."""
    from speclabel.core.storage import filesystem_and_path

    fs, _ = filesystem_and_path(str(path))
    rows = pq.ParquetFile(path).metadata.num_rows
    columns = '["spectrum_id", "flux", "ivar"]'
    item = {"path": str(path), "row_group": 0, "start": 0, "rows": rows, "columns": columns}
    items = pa.Table.from_pylist([{**item, "duplicates": "[3]", "carried": "[]"}])
    pool, previous = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        rows = 0
        for table in read_spectra(items, fs, read_rows=read_rows):
            assert table.num_rows <= read_rows
            rows += table.num_rows
            del table
    finally:
        pa.set_memory_pool(previous)
    assert rows == pq.ParquetFile(path).metadata.num_rows
    return pool.max_memory()


def test_reading_a_file_of_one_large_row_group_holds_a_bounded_amount(tmp_path):
    """100k rows in one row group: the read task's peak does not grow with the row group (a
    pre-buffered read would hold the whole row group, here ~the whole file)."""
    _one_row_group(tmp_path / "small.parquet", 20_000, 64)
    small = _peak_bytes_reading(tmp_path / "small.parquet", read_rows=128)
    big_size = _one_row_group(tmp_path / "big.parquet", 100_000, 64)
    big = _peak_bytes_reading(tmp_path / "big.parquet", read_rows=128)
    assert big < big_size / 2
    assert big < 1.5 * small + 2**20


@pytest.mark.ray
def test_a_file_of_one_row_group_reaches_the_actors_in_batch_sized_blocks(tiny_setup, ray_session, tmp_path):
    from speclabel.pipeline.labelling.job import prepared_blocks

    survey = simulate_chunk(tiny_setup, SurveyConfig(n=70, seed=6, chunk_size=70), 0)
    pq.write_table(survey, tmp_path / "one.parquet")  # one row group of 70 rows
    source = ParquetInput.open(str(tmp_path / "one.parquet"), tiny_setup)
    source.scan_ids()
    tasks = source.read_tasks(read_rows=16)
    assert [(t["start"], t["rows"]) for t in tasks] == [(0, 14), (14, 14), (28, 14), (42, 14), (56, 14)]
    blocks = prepared_blocks(source, tiny_setup, batch_size=16, cpus=1.0).materialize()
    sizes = [meta.num_rows for bundle in blocks.iter_internal_ref_bundles() for meta in bundle.metadata]
    assert sum(sizes) == 70 and max(sizes) <= 16 and len(sizes) >= 5
    rows = blocks.to_arrow_refs()
    ids = pa.concat_tables(ray_session.get(rows)).column("spectrum_id").to_pylist()
    assert sorted(ids) == sorted(survey.column("spectrum_id").to_pylist())


def test_row_group_slices_read_back_every_row_once_with_its_duplicate_flag(survey, tiny_setup, tmp_path):
    pq.write_table(survey, tmp_path / "one.parquet")  # one row group of 12 rows
    source = ParquetInput.open(str(tmp_path / "one.parquet"), tiny_setup)
    (path,) = source.rows_by_source()
    source.duplicates = {path: np.array([7])}
    items = source.read_tasks(read_rows=5)
    assert [(t["start"], t["rows"]) for t in items] == [(0, 4), (4, 4), (8, 4)]
    rows = pa.concat_tables(read_spectra(pa.Table.from_pylist(items), source.fs, read_rows=3))
    assert rows.column("spectrum_id").to_pylist() == survey.column("spectrum_id").to_pylist()
    assert rows.column(B.DUPLICATE).to_pylist() == [i == 7 for i in range(12)]
    assert rows.column("flux_blue").equals(survey.column("flux_blue"))
    # a row group of many batches is cut into at most MAX_SLICES_PER_ROW_GROUP slices
    source.duplicates = {}
    source.files[0].row_group_rows = (1000,)
    slices = source.read_tasks(read_rows=1)
    assert len(slices) <= 32 and sum(t["rows"] for t in slices) == 1000
