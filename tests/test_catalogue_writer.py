"""The catalogue writer: partitions, sort order, file sizes, spilling, accounting, republishing."""

import hashlib
import json
import math
import os

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from astropy_healpix import HEALPix
from catalogue_data import LAYOUT, OPTIONS, build_catalogue, label_rows

from speclabel.core.errors import ConfigError, InputError, IntegrityError, UsageError
from speclabel.pipeline.catalogue import CatalogueLayout, CatalogueWriter, read_layout, write_release
from speclabel.pipeline.catalogue.layout import COLUMN_TYPES
from speclabel.pipeline.publish import Dataset


def _live_files(root) -> list[str]:
    return sorted(
        os.path.join(d, f)
        for d, _, files in os.walk(root)
        for f in files
        if "/release=" in d and "/_" not in d
    )


def _expected_sky(table: pa.Table, layout: CatalogueLayout) -> np.ndarray:
    """Sky cells computed independently: HEALPix at the partition order directly, blake2b buckets."""
    ra = table.column("ra").to_numpy(zero_copy_only=False)
    dec = table.column("dec").to_numpy(zero_copy_only=False)
    ids = table.column("spectrum_id").to_pylist()
    coarse = HEALPix(nside=2**layout.sky_order, order="nested")
    sky = np.empty(table.num_rows, dtype=np.int64)
    for i in range(table.num_rows):
        if np.isnan(ra[i]):
            digest = hashlib.blake2b(ids[i].encode(), digest_size=8).digest()
            sky[i] = -1 - int.from_bytes(digest, "little") % layout.hash_buckets
        else:
            sky[i] = coarse.lonlat_to_healpix(ra[i] * u.deg, dec[i] * u.deg)
    return sky


def test_release_is_partitioned_sorted_and_complete(tmp_path):
    root = tmp_path / "cat"
    tables = build_catalogue(root, {"DR1": 3000})
    given = tables["DR1"]
    live = pads.dataset(str(root), partitioning="hive").to_table()
    # Every row given is live exactly once, with its values.
    assert sorted(live.column("spectrum_id").to_pylist()) == sorted(given.column("spectrum_id").to_pylist())
    by_id = dict(zip(live.column("spectrum_id").to_pylist(), live.column("feh").to_pylist(), strict=True))
    assert [by_id[s] for s in given.column("spectrum_id").to_pylist()] == given.column("feh").to_pylist()

    expected_sky = dict(
        zip(given.column("spectrum_id").to_pylist(), _expected_sky(given, LAYOUT), strict=True)
    )
    fine = HEALPix(nside=2**LAYOUT.fine_order, order="nested")
    files = _live_files(root)
    rows_per_cell: dict[int, list[int]] = {}
    for path in files:
        cell = int(path.split("/sky=")[1].split("/")[0])
        meta = pq.read_metadata(path)
        table = pq.read_table(path)
        rows_per_cell.setdefault(cell, []).append(table.num_rows)
        assert table.num_rows <= OPTIONS.max_rows_per_file
        assert all(meta.row_group(i).num_rows <= OPTIONS.row_group_rows for i in range(meta.num_row_groups))
        assert {expected_sky[s] for s in table.column("spectrum_id").to_pylist()} == {cell}
        hp = table.column("healpix")
        if cell >= 0:
            ra, dec = table.column("ra").to_numpy(), table.column("dec").to_numpy()
            assert np.array_equal(hp.to_numpy(), fine.lonlat_to_healpix(ra * u.deg, dec * u.deg))
            assert np.all(np.diff(hp.to_numpy()) >= 0), "rows are sorted by the fine HEALPix index"
        else:
            assert hp.null_count == table.num_rows
            ids = table.column("spectrum_id").to_pylist()
            assert ids == sorted(ids)
        assert "release" not in table.column_names and "sky" not in table.column_names
    # Compaction: each cell has as few files as its row count allows (no tiny files).
    for cell, counts in rows_per_cell.items():
        assert len(counts) == math.ceil(sum(counts) / OPTIONS.max_rows_per_file), (cell, counts)
    assert any(c < 0 for c in rows_per_cell), "rows without a position went to hash buckets"
    assert any(len(c) > 1 for c in rows_per_cell.values()), "some cell needed several files"
    # The layout is stored, and staging is gone.
    assert read_layout(Dataset.open(str(root))) == LAYOUT
    assert json.loads((root / "_catalogue.json").read_text())["sky_order"] == LAYOUT.sky_order
    assert not list((root / "_staging").iterdir())


def test_plain_arrow_types_and_extension_columns_unwrapped(tmp_path):
    table = label_rows("DR1", 50)
    members = np.random.default_rng(0).random((50, 8)).astype(np.float32)
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(members)  # an extension type, as Ray makes
    table = table.drop_columns(["teff_members"]).append_column("teff_members", tensor)
    table = table.set_column(table.column_names.index("snr"), "snr", table.column("snr").cast(pa.float64()))
    write_release(str(tmp_path / "cat"), "DR1", [table], model_id="m", layout=LAYOUT, options=OPTIONS)
    schema = pads.dataset(_live_files(tmp_path / "cat"), format="parquet").schema
    for name, dtype in COLUMN_TYPES.items():
        if name in schema.names:
            assert schema.field(name).type == dtype, name
    assert not any(isinstance(f.type, pa.ExtensionType) for f in schema)
    live = pads.dataset(str(tmp_path / "cat"), partitioning="hive").to_table().sort_by("spectrum_id")
    assert np.allclose(np.stack(live.column("teff_members").to_numpy(zero_copy_only=False)), members)


def test_spills_keep_memory_bounded_and_lose_nothing(tmp_path, monkeypatch):
    spills = []
    original = CatalogueWriter._spill

    def counting_spill(self, cell):
        spills.append(cell)
        original(self, cell)

    monkeypatch.setattr(CatalogueWriter, "_spill", counting_spill)
    dataset = Dataset.open(str(tmp_path / "cat"))
    writer = CatalogueWriter(dataset, "DR1", "20260101T000000Z-aaaaaaaa", LAYOUT, OPTIONS)
    given = label_rows("DR1", 2000)
    for batch in given.to_batches(max_chunksize=100):
        writer.write(batch)
        assert writer._buffered_bytes <= OPTIONS.buffer_bytes
    result = writer.close()
    assert spills, "the buffer limit forced spills"
    assert result.rows == 2000 == sum(result.rows_per_sky.values())
    assert not any("/_spill/" in p for p in dataset.files_under(dataset.staging_dir(writer.run_id)))
    staged = pads.dataset(result.files, format="parquet").to_table()
    assert sorted(staged.column("spectrum_id").to_pylist()) == sorted(given.column("spectrum_id").to_pylist())


def test_republishing_keeps_one_live_row_per_spectrum_and_release(tmp_path):
    root = tmp_path / "cat"
    build_catalogue(root, {"DR1": 600, "DR2": 300}, model_id="m1")
    redo = label_rows("DR1", 700, seed=5, model_id="m2")  # the same ids 0..599 plus 100 new ones
    write_release(str(root), "DR1", [redo], model_id="m2", layout=LAYOUT, options=OPTIONS)
    live = pads.dataset(str(root), partitioning="hive").to_table()
    keys = list(zip(live.column("spectrum_id").to_pylist(), live.column("release").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == 1000
    dr1 = live.filter(pc.field("release") == "DR1")
    assert set(dr1.column("model_id").to_pylist()) == {"m2"}
    assert Dataset.open(str(root)).release_entry("DR1")["model_id"] == "m2"
    assert (root / "_versions" / "release=DR1").exists()


def test_duplicates_are_refused_and_nothing_is_staged(tmp_path):
    dataset = Dataset.open(str(tmp_path / "cat"))
    rows = label_rows("DR1", 30)
    twice = pa.concat_tables([rows, rows.slice(3, 1)])
    writer = CatalogueWriter(dataset, "DR1", "20260101T000000Z-bbbbbbbb", LAYOUT, OPTIONS)
    with pytest.raises(IntegrityError, match="DR1-000000003"), writer:
        writer.write(twice)
    assert dataset.files_under(dataset.staging_dir(writer.run_id)) == []


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    dataset = Dataset.open(str(tmp_path / "cat"))
    with pytest.raises(UsageError, match="release name"):
        CatalogueWriter(dataset, "DR 1/x", "run", LAYOUT, OPTIONS)
    writer = CatalogueWriter(dataset, "DR1", "20260101T000000Z-cccccccc", LAYOUT, OPTIONS)
    rows = label_rows("DR1", 20)
    with pytest.raises(InputError, match="spectrum_id"):
        writer.write(rows.drop_columns(["spectrum_id"]))
    writer.write(rows.slice(0, 10).drop_columns(["object"]))  # the first batch fixes the columns
    with pytest.raises(InputError, match=r"\['object'\]"):
        writer.write(rows.slice(10))
    with pytest.raises(ConfigError, match="shares one layout"):
        CatalogueWriter(dataset, "DR2", "run2", CatalogueLayout(sky_order=2), OPTIONS)


def test_missing_optional_columns_are_filled_with_nulls(tmp_path):
    dataset = Dataset.open(str(tmp_path / "cat"))
    rows = label_rows("DR1", 20)
    with CatalogueWriter(dataset, "DR1", "20260101T000000Z-dddddddd", LAYOUT, OPTIONS) as writer:
        writer.write(rows.slice(0, 10))
        writer.write(rows.slice(10).drop_columns(["object", "snr"]))
    staged = pads.dataset(writer.result.files, format="parquet").to_table().sort_by("spectrum_id")
    assert staged.column("object").null_count == 10 and staged.column("snr").null_count == 10
