"""The plan (driver, between the passes): from the scan's metadata only, the files of one star
grouped by its id, Parquet rows whose id was seen before marked as duplicates, and the stars and row
groups packed into tasks (the package docstring says why this rather than a group-by)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa

from speclabel.core import contract

from .options import IngestOptions

TASK_SCHEMA = pa.schema(
    [
        ("task", pa.int32()),
        ("kind", pa.string()),
        ("spectrum_id", pa.string()),
        ("paths", pa.list_(pa.string())),
        ("row_group", pa.int32()),
        ("row_offset", pa.int64()),
        ("n_rows", pa.int64()),
        ("duplicate_rows", pa.list_(pa.int32())),
    ]
)


@dataclass
class Plan:
    tasks: list[pa.Table]  # one TASK_SCHEMA table per task
    rejected: pa.Table  # quarantine rows of files refused by the scan
    spectra_in: int  # stars (FITS) + rows (Parquet) the tasks will account for


def make_plan(scan: pa.Table, options: IngestOptions) -> Plan:
    """Group FITS files by star, mark duplicate Parquet ids, and pack the work into tasks."""
    rows = scan.to_pylist()
    rejected = [r for r in rows if r["reason"] is not None]
    stars: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["reason"] is None and r["kind"] == "fits":
            stars[r["spectrum_id"]].append(r["path"])
    tasks: list[list[dict]] = []
    star_ids = sorted(stars)
    for start in range(0, len(star_ids), options.stars_per_task):
        tasks.append(
            [
                {"kind": "fits", "spectrum_id": sid, "paths": sorted(stars[sid])}
                for sid in star_ids[start : start + options.stars_per_task]
            ]
        )
    # Parquet rows: the first occurrence of an id wins, and FITS stars come first.
    seen = set(star_ids)
    n_rows = 0
    for r in sorted(
        (r for r in rows if r["reason"] is None and r["kind"] == "parquet"), key=lambda r: r["path"]
    ):
        offset = 0
        for group, size in enumerate(r["row_groups"]):
            duplicates = []
            for k, sid in enumerate(r["ids"][offset : offset + size]):
                if sid is None:
                    continue
                if sid in seen:
                    duplicates.append(k)
                seen.add(sid)
            tasks.append(
                [
                    {
                        "kind": "parquet",
                        "paths": [r["path"]],
                        "row_group": group,
                        "row_offset": offset,
                        "n_rows": size,
                        "duplicate_rows": duplicates,
                    }
                ]
            )
            offset += size
        n_rows += offset
    tables = []
    for number, units in enumerate(tasks):
        tables.append(pa.Table.from_pylist([{**u, "task": number} for u in units], schema=TASK_SCHEMA))
    quarantine = contract.quarantine_table(
        [None] * len(rejected), [r["reason"] for r in rejected], [r["path"] for r in rejected]
    )
    return Plan(tables, quarantine, len(star_ids) + n_rows)
