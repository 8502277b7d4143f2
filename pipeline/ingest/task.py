"""Pass 2 of ingest (Ray Data, a map over the plan's tasks, streaming): each task reads its files,
prepares them (:mod:`.prepare`), writes one part file of store rows into the run's staging folder
and one quarantine file, and returns one summary row per input file it read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speclabel.core import contract
from speclabel.core.setups import Setup
from speclabel.core.storage import atomic_output, join

from ..fits_formats import Unusable
from .options import IngestOptions
from .prepare import StarResult, assemble_star, pass_through, split_invalid, star_table

# One row per input file a task read (path set), plus one per task with its counts (path null).
SUMMARY_SCHEMA = pa.schema(
    [
        ("task", pa.int32()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("spectra_stored", pa.int64()),
        ("spectra_quarantined", pa.int64()),
        ("quarantine_rows", pa.int64()),
    ]
)
USED, QUARANTINED = "used", "quarantined"


@dataclass(frozen=True)
class TaskContext:
    """What every ingest task needs besides its units (sent once to each task)."""

    input_fs: pafs.FileSystem
    store_fs: pafs.FileSystem
    setup: Setup
    options: IngestOptions
    run_id: str
    staging_dir: str  # _staging/<run>/release=<R>
    quarantine_dir: str  # _quarantine/release=<R>/run=<run>


def part_name(run_id: str, task: int) -> str:
    return f"part-{run_id}-{task:06d}.parquet"


def _read(fs: pafs.FileSystem, path: str) -> tuple[bytes | Unusable, str | None]:
    try:
        with fs.open_input_stream(path, compression=None) as stream:
            data = stream.read()
    except OSError as exc:
        return Unusable(contract.CORRUPT_FILE, f"cannot read the file: {exc}"), None
    return data, hashlib.sha256(data).hexdigest()


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    with atomic_output(fs, path) as out:
        pq.write_table(table, out)


@dataclass
class TaskOutput:
    store_rows: pa.Table
    quarantine_rows: pa.Table
    files: list[dict]  # {"path", "sha256", "outcome", "reason"} per input file the task read
    spectra_quarantined: int  # stars and Parquet rows of this task with nothing stored


def ingest_task(units: pa.Table, ctx: TaskContext) -> TaskOutput:
    """Process one task's units: store rows, quarantine rows and one outcome per input file."""
    setup = ctx.setup
    stored: list[pa.Table] = []
    quarantine: list[pa.Table] = []
    files: list[dict] = []
    spectra_quarantined = 0
    stars: list[StarResult] = []
    for unit in units.to_pylist():
        if unit["kind"] == "fits":
            loaded = [(path, *_read(ctx.input_fs, path)) for path in unit["paths"]]
            star = assemble_star(unit["spectrum_id"], [(p, d) for p, d, _ in loaded], setup, ctx.options)
            stars.append(star)
            refused = {source: contract.reason_code(reason) for reason, source in star.quarantine}
            for path, _, sha in loaded:
                outcome = QUARANTINED if path in refused else USED
                files.append({"path": path, "sha256": sha, "outcome": outcome, "reason": refused.get(path)})
            if star.quarantine:
                quarantine.append(
                    contract.quarantine_table(
                        [star.spectrum_id] * len(star.quarantine),
                        [reason for reason, _ in star.quarantine],
                        [source for _, source in star.quarantine],
                    )
                )
            spectra_quarantined += not star.stored
        else:
            (path,) = unit["paths"]
            try:
                with ctx.input_fs.open_input_file(path) as handle:
                    table = pq.ParquetFile(handle).read_row_group(unit["row_group"])
            except (OSError, ValueError) as exc:  # changed or damaged since the scan
                reason = (
                    f"{contract.CORRUPT_FILE}: row group {unit['row_group']} ({unit['n_rows']} rows): {exc}"
                )
                quarantine.append(contract.quarantine_table([None], [reason], path))
                spectra_quarantined += unit["n_rows"]
                files.append(
                    {"path": path, "sha256": None, "outcome": QUARANTINED, "reason": contract.CORRUPT_FILE}
                )
                continue
            rows, refused_rows = pass_through(table, path, unit["row_offset"], unit["duplicate_rows"], setup)
            stored.append(rows)
            quarantine.append(refused_rows)
            spectra_quarantined += refused_rows.num_rows
            files.append({"path": path, "sha256": None, "outcome": USED, "reason": None})
    if stars:
        table = star_table(stars, setup)
        good, bad, reasons = split_invalid(table, setup)
        stored.append(good)
        if bad:  # defensive: rows built here should always pass the contract
            sources = table.column(contract.SOURCE_FILES).to_pylist()
            quarantine.append(
                contract.quarantine_table(
                    table.column("spectrum_id").take(pa.array(bad, pa.int64())).to_pylist(),
                    [reasons[i] for i in bad],
                    [", ".join(sources[i]) for i in bad],
                )
            )
            refused_paths = {p: contract.reason_code(reasons[i]) for i in bad for p in sources[i]}
            for entry in files:
                if entry["path"] in refused_paths:
                    entry["outcome"], entry["reason"] = QUARANTINED, refused_paths[entry["path"]]
            spectra_quarantined += len(bad)
    store_rows = pa.concat_tables(stored) if stored else contract.store_schema(setup).empty_table()
    refused_rows = pa.concat_tables(quarantine) if quarantine else contract.QUARANTINE_SCHEMA.empty_table()
    return TaskOutput(store_rows, refused_rows, files, spectra_quarantined)


def ingest_block(block: pa.Table, *, ctx: TaskContext) -> pa.Table:
    """Pass 2 UDF: run each task in the block, write its part and quarantine files, return a summary."""
    summary = []
    tasks = block.column("task").to_numpy()
    for task in (int(t) for t in np.unique(tasks)):
        output = ingest_task(block.filter(pa.array(tasks == task)), ctx)
        # Names depend on the task number only, so a retried task overwrites its own files.
        if output.store_rows.num_rows:
            write_parquet(ctx.store_fs, join(ctx.staging_dir, part_name(ctx.run_id, task)), output.store_rows)
        if output.quarantine_rows.num_rows:
            write_parquet(
                ctx.store_fs, join(ctx.quarantine_dir, f"part-{task:06d}.parquet"), output.quarantine_rows
            )
        summary += [{"task": task, **entry} for entry in output.files]
        summary.append(
            {
                "task": task,
                "spectra_stored": output.store_rows.num_rows,
                "spectra_quarantined": output.spectra_quarantined,
                "quarantine_rows": output.quarantine_rows.num_rows,
            }
        )
    return pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)
