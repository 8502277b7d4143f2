"""Ingest's plan (pipeline/ingest/plan.py): star files grouped, duplicate Parquet ids marked, tasks packed."""

import pyarrow as pa

from speclabel.core import contract
from speclabel.pipeline.ingest import SCAN_SCHEMA, IngestOptions, make_plan


def test_plan_groups_star_files_and_marks_later_duplicate_ids():
    rows = [
        {"path": "/d/a_hr21.fits", "kind": "fits", "spectrum_id": "A"},
        {"path": "/d/a_hr10.fits", "kind": "fits", "spectrum_id": "A"},
        {"path": "/d/b.fits", "kind": "fits", "spectrum_id": "B"},
        {"path": "/d/bad.fits", "kind": "fits", "reason": "corrupt_file: no END card"},
        {
            "path": "/d/x.parquet",
            "kind": "parquet",
            "ids": ["P1", "A", "P2", "P1", "P3"],
            "row_groups": [3, 2],
        },
        {"path": "/d/w.parquet", "kind": "parquet", "ids": ["P3", "P4"], "row_groups": [2]},
    ]
    scan = pa.Table.from_pylist(rows, schema=SCAN_SCHEMA)
    plan = make_plan(scan, IngestOptions(release="T", stars_per_task=1))
    units = [t.to_pylist() for t in plan.tasks]
    assert [u[0]["task"] for u in units] == list(range(5))
    assert units[0][0]["spectrum_id"] == "A" and units[0][0]["paths"] == ["/d/a_hr10.fits", "/d/a_hr21.fits"]
    assert units[1][0]["paths"] == ["/d/b.fits"]
    # w.parquet sorts first, so its P3 wins; in x.parquet "A" is a FITS star, P1 repeats, P3 was seen.
    assert [(u[0]["paths"], u[0]["row_group"], u[0]["duplicate_rows"]) for u in units[2:]] == [
        (["/d/w.parquet"], 0, []),
        (["/d/x.parquet"], 0, [1]),
        (["/d/x.parquet"], 1, [0, 1]),
    ]
    assert units[4][0]["row_offset"] == 3
    assert plan.spectra_in == 2 + 7
    assert plan.rejected.column("reason").to_pylist() == [contract.CORRUPT_FILE]
