"""The ingest job (driver): check and list the inputs, run the scan and the tasks on Ray Data with
progress lines, account for every input (the package docstring's step 4), and publish the release."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speclabel.core import contract
from speclabel.core.errors import IntegrityError
from speclabel.core.faults import fault_point, planned_fault
from speclabel.core.reporting import QUIET, Reporter
from speclabel.core.setups import Setup
from speclabel.core.storage import check_writable_folder, join

from ..lock import DEFAULT_LOCK_TIMEOUT_S
from ..publish import Dataset, new_run_id
from .options import IngestOptions
from .plan import Plan, make_plan
from .scan import InputFile, input_fingerprint, list_inputs, scan_block
from .task import QUARANTINED, SUMMARY_SCHEMA, USED, TaskContext, ingest_block, write_parquet

log = logging.getLogger(__name__)

Listing = tuple[pafs.FileSystem, list[InputFile]]


@dataclass
class IngestReport:
    store: str
    release: str
    run_id: str
    skipped: bool = False
    counts: dict = field(default_factory=dict)
    quarantine_by_reason: dict = field(default_factory=dict)
    quarantine_dir: str | None = None
    timings_s: dict = field(default_factory=dict)


def check_locations(location: str, store: str) -> Listing:
    """The input files at ``location`` (outside ``store``), after checking that the store can be written.

    Needs no Ray: the command line calls it before starting Ray, so that a mistyped path fails in a
    moment with :class:`InputError` instead of after Ray's start-up.
    """
    check_writable_folder(store, "spectra store")
    return list_inputs(location, store)


class PassProgress:
    """Progress lines of one pass over Ray Data: how much of ``total`` its finished blocks hold."""

    def __init__(self, reporter: Reporter, what: str, total: int, unit: str):
        self.reporter, self.what, self.total, self.unit = reporter, what, total, unit
        self.done = self.refused = 0
        reporter.start(what)

    def add(self, done: int, refused: int, final: bool = False) -> None:
        self.done += done
        self.refused += refused
        extra = f"{self.refused} quarantined" if self.refused else ""
        self.reporter.progress(self.what, self.done, self.total, self.unit, extra, final=final)

    def finish(self) -> None:
        self.add(0, 0, final=True)


def scan_counts(batch: pa.Table) -> tuple[int, int]:
    """Files a scan block looked at, and how many of them it refused."""
    return batch.num_rows, batch.num_rows - batch.column("reason").null_count


def task_counts(batch: pa.Table) -> tuple[int, int]:
    """Spectra (stars and Parquet rows) the tasks of a summary block finished, and those quarantined."""
    totals = batch.filter(pc.is_null(batch.column("path")))
    stored = pc.sum(totals.column("spectra_stored")).as_py() or 0
    quarantined = pc.sum(totals.column("spectra_quarantined")).as_py() or 0
    return stored + quarantined, quarantined


def _blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    return [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)] or [
        table
    ]


def _collect(dataset, progress: PassProgress, counts) -> pa.Table | None:
    tables = []
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        tables.append(batch)
        progress.add(*counts(batch))
    progress.finish()
    return pa.concat_tables(tables) if tables else None


def run_ingest(
    location: str,
    store: str,
    setup: Setup,
    options: IngestOptions,
    *,
    force: bool = False,
    reporter: Reporter = QUIET,
    listing: Listing | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> IngestReport:
    """Ingest the files at ``location`` into release ``options.release`` of the spectra store ``store``.

    Needs a running Ray (``ray.init()``); the CLI starts a local one when none is connected.
    ``reporter`` gets the progress lines of the scan and of the ingest pass; ``listing`` is what
    :func:`check_locations` returned, when the caller checked the locations already.
    ``SPECLABEL_FAULT=ingest.publish`` (see :mod:`speclabel.core.faults`) fails just before publishing.
    """
    import ray.data

    fault = planned_fault()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    input_fs, files = listing if listing is not None else check_locations(location, store)
    fingerprint = input_fingerprint(files, setup, options)
    ds = Dataset.open(store)
    entry = ds.release_entry(options.release)
    if entry is not None and entry.get("input_fingerprint") == fingerprint and not force:
        return IngestReport(store, options.release, entry["run_id"], skipped=True)
    timings["list"] = time.perf_counter() - clock

    run_id = new_run_id()
    what = f"ingest {options.release}"
    with ds.lock(run_id, stale_after_s=lock_timeout_s) as lock:
        for action in ds.recover():
            log.info("recovered: %s", action)
        clock = time.perf_counter()
        paths = pa.table({"path": [f.path for f in files]})
        scan = _collect(
            ray.data.from_arrow(_blocks(paths, options.files_per_scan_task)).map_batches(
                scan_block,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={"fs": input_fs, "setup": setup},
            ),
            PassProgress(reporter, f"{what} scan", len(files), "files"),
            scan_counts,
        )
        plan = make_plan(scan, options)
        timings["scan"] = time.perf_counter() - clock

        clock = time.perf_counter()
        ctx = TaskContext(
            input_fs=input_fs,
            store_fs=ds.fs,
            setup=setup,
            options=options,
            run_id=run_id,
            staging_dir=ds.staged_release_dir(run_id, options.release),
            quarantine_dir=ds.quarantine_dir(options.release, run_id),
        )
        if plan.rejected.num_rows:
            write_parquet(ds.fs, join(ctx.quarantine_dir, "part-scan.parquet"), plan.rejected)
        progress = PassProgress(reporter, what, plan.spectra_in, "spectra")
        summary = (
            _collect(
                ray.data.from_arrow(plan.tasks).map_batches(
                    ingest_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"ctx": ctx}
                ),
                progress,
                task_counts,
            )
            if plan.tasks
            else None
        )
        summary = summary if summary is not None else SUMMARY_SCHEMA.empty_table()
        timings["ingest"] = time.perf_counter() - clock

        clock = time.perf_counter()
        report, inputs = _account(files, scan, plan, summary, ctx, ds)
        write_parquet(ds.fs, ds.inputs_table_path(options.release, run_id), inputs)
        timings["account"] = time.perf_counter() - clock
        manifest = {
            "job": "ingest",
            "speclabel_version": version("speclabel"),
            "started_at": started_at,
            "input": location,
            "setup": setup.to_dict(),
            "options": options.fingerprint_fields(),
            "counts": report.counts,
            "quarantine": {
                "dir": ds.relative(ctx.quarantine_dir),
                "by_reason": report.quarantine_by_reason,
            },
            "inputs_table": ds.relative(ds.inputs_table_path(options.release, run_id)),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        lock.check()  # a run whose lock was taken over (it stalled past the timeout) must not publish
        fault_point("ingest.publish", fault, release=options.release)
        ds.publish(
            options.release,
            run_id,
            manifest,
            {
                "job": "ingest",
                "input_fingerprint": fingerprint,
                "setup": setup.name,
                "spectra": report.counts["spectra_stored"],
            },
        )
    report.run_id = run_id
    report.timings_s = timings
    return report


def _account(
    files: list[InputFile], scan: pa.Table, plan: Plan, summary: pa.Table, ctx: TaskContext, ds: Dataset
) -> tuple[IngestReport, pa.Table]:
    """Check that every input is accounted for, and tabulate each input file's outcome."""
    outcome: dict[str, tuple[str, str | None]] = {}
    sha: dict[str, str | None] = {}
    for r in scan.to_pylist():
        sha[r["path"]] = r["sha256"]
        if r["reason"] is not None:
            outcome[r["path"]] = (QUARANTINED, contract.reason_code(r["reason"]))
    stored = spectra_quarantined = 0
    quarantine_rows = plan.rejected.num_rows
    for r in summary.to_pylist():
        if r["path"] is None:  # a task's counts
            stored += r["spectra_stored"]
            spectra_quarantined += r["spectra_quarantined"]
            quarantine_rows += r["quarantine_rows"]
            continue
        if r["sha256"] is not None:
            sha[r["path"]] = r["sha256"]
        # A Parquet file is read by one task per row group: it is used when any of them stored from it.
        if outcome.get(r["path"], (None,))[0] != USED:
            outcome[r["path"]] = (r["outcome"], r["reason"])

    paths = [f.path for f in files]
    unaccounted = [p for p in paths if p not in outcome]
    if unaccounted or len(outcome) != len(paths):
        raise IntegrityError(f"accounting check failed: no outcome for input files {unaccounted[:5]}")
    if stored + spectra_quarantined != plan.spectra_in:
        raise IntegrityError(
            f"accounting check failed: {plan.spectra_in} spectra planned, but {stored} stored + "
            f"{spectra_quarantined} quarantined"
        )
    staged = _staged_rows(ds, ctx)
    row_reasons = _quarantine_reasons(ds, ctx)
    if staged != stored or sum(row_reasons.values()) != quarantine_rows:
        raise IntegrityError(
            f"accounting check failed: tasks reported {stored} store rows and {quarantine_rows} quarantine "
            f"rows, the run's folders hold {staged} and {sum(row_reasons.values())}"
        )
    quarantined_files = sum(1 for state, _ in outcome.values() if state == QUARANTINED)
    counts = {
        "files_in": len(paths),
        "files_used": len(paths) - quarantined_files,
        "files_quarantined": quarantined_files,
        "fits_files": sum(1 for f in files if f.kind == "fits"),
        "parquet_files": sum(1 for f in files if f.kind == "parquet"),
        "spectra_in": plan.spectra_in,
        "spectra_stored": stored,
        "spectra_quarantined": spectra_quarantined,
        "quarantine_rows": quarantine_rows,
    }
    inputs = pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "kind": pa.array([f.kind for f in files], pa.string()),
            "size": pa.array([f.size for f in files], pa.int64()),
            "mtime_ns": pa.array([f.mtime_ns for f in files], pa.int64()),
            "sha256": pa.array([sha.get(p) for p in paths], pa.string()),
            "outcome": pa.array([outcome[p][0] for p in paths], pa.string()),
            "reason": pa.array([outcome[p][1] for p in paths], pa.string()),
        }
    )
    report = IngestReport(
        ds.location,
        ctx.options.release,
        ctx.run_id,
        counts=counts,
        quarantine_by_reason=dict(sorted(row_reasons.items())),
        quarantine_dir=ctx.quarantine_dir,
    )
    return report, inputs


def _staged_rows(ds: Dataset, ctx: TaskContext) -> int:
    """Rows in the staged part files; debris of killed task attempts (hidden temp files) is removed."""
    total = 0
    for path in ds.files_under(ctx.staging_dir):
        if path.rsplit("/", 1)[-1].startswith("."):
            ds.fs.delete_file(path)
            continue
        with ds.fs.open_input_file(path) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def _quarantine_reasons(ds: Dataset, ctx: TaskContext) -> Counter:
    reasons: Counter = Counter()
    for path in ds.files_under(ctx.quarantine_dir):
        if path.rsplit("/", 1)[-1].startswith("."):
            continue
        with ds.fs.open_input_file(path) as fh:
            reasons.update(pq.read_table(fh, columns=["reason"]).column(0).to_pylist())
    return reasons
