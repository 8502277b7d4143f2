"""Write label rows into a catalogue's staging area in its partitioned, sorted layout.

:class:`CatalogueWriter` takes label rows as Arrow tables, any number of them in any order, and
writes ``_staging/<run>/release=<R>/sky=<k>/part-<run>-<n>.parquet``: one folder per sky cell, files
of up to ``max_rows_per_file`` rows, rows in each file sorted by the fine ``healpix`` index (then
``spectrum_id``), row groups of ``row_group_rows``. Memory stays bounded for a release of any size:
rows are buffered per sky cell; a cell whose buffer reaches a file's worth of rows is written out
directly, and when all buffers together pass ``buffer_bytes`` the largest is spilled to a scratch
file under ``_staging/<run>/_spill/``. :meth:`CatalogueWriter.close` then compacts each cell's spills
and remainder into full-size sorted files (reading at most one file's worth of rows at a time) and
checks that every row given was written.

The staged files become live only through :meth:`speclabel.pipeline.publish.Dataset.publish`;
:func:`write_release` does lock, recover, write and publish in one call.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from speclabel.core.errors import ConfigError, InputError, IntegrityError, UsageError
from speclabel.core.layout import check_release_name
from speclabel.core.storage import join

from ..publish import Dataset, new_run_id
from .layout import HEALPIX, SKY, CatalogueLayout, ensure_layout, normalise, read_layout

SORT_KEYS = [(HEALPIX, "ascending"), ("spectrum_id", "ascending")]


@dataclass(frozen=True)
class WriteOptions:
    """File sizes and memory of a write; they do not change what readers see."""

    max_rows_per_file: int = 500_000  # ~50-150 MB of Parquet with saliency summaries
    row_group_rows: int = 50_000  # the unit a cone search can skip inside a file
    buffer_bytes: int = 256 * 2**20  # rows held in memory before the largest cell is spilled
    compression: str = "zstd"

    def __post_init__(self) -> None:
        if self.max_rows_per_file < 1 or self.row_group_rows < 1 or self.buffer_bytes < 1:
            raise ConfigError(f"write options must be positive: {self}")


@dataclass
class WriteResult:
    """What a writer staged: the numbers a run's manifest records."""

    release: str
    run_id: str
    rows: int
    files: list[str]
    bytes: int
    rows_per_sky: dict[int, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "release": self.release,
            "rows": self.rows,
            "files": len(self.files),
            "bytes": self.bytes,
            "rows_per_sky": {str(k): v for k, v in sorted(self.rows_per_sky.items())},
        }


class CatalogueWriter:
    """Stage one run's label rows for one release (see the module docstring).

    Use as a context manager (``close`` on success, ``abort`` on an exception) or call
    :meth:`write` and then :meth:`close` or :meth:`abort`. ``writer_id`` lets several writers (e.g.
    one per Ray worker) stage files for the same run without name clashes.
    """

    def __init__(
        self,
        dataset: Dataset,
        release: str,
        run_id: str,
        layout: CatalogueLayout | None = None,
        options: WriteOptions | None = None,
        writer_id: str | None = None,
    ) -> None:
        if writer_id is not None and not re.fullmatch(r"[A-Za-z0-9]+", writer_id):
            raise UsageError(f"writer_id must be letters and digits, got {writer_id!r}")
        self.dataset = dataset
        self.release = check_release_name(release)
        self.run_id = run_id
        self.layout = ensure_layout(dataset, layout or read_layout(dataset) or CatalogueLayout())
        self.options = options or WriteOptions()
        self.writer_id = writer_id
        self.schema: pa.Schema | None = None
        self.result: WriteResult | None = None
        self._buffers: dict[int, list[pa.Table]] = {}
        self._buffered_rows: dict[int, int] = {}
        self._buffered_bytes = 0
        self._spills: dict[int, list[str]] = {}
        self._rows_in = 0
        self._files: list[str] = []
        self._rows_per_sky: dict[int, int] = {}
        self._bytes = 0
        self._counter = 0
        self._closed = False

    # -- paths ------------------------------------------------------------------------------------

    @property
    def staged_release(self) -> str:
        return join(self.dataset.staging_dir(self.run_id), f"release={self.release}")

    @property
    def spill_dir(self) -> str:
        return join(self.dataset.staging_dir(self.run_id), "_spill", self.writer_id or "main")

    def _next_name(self, prefix: str) -> str:
        self._counter += 1
        number = f"{self._counter:05d}" if self.writer_id is None else f"{self.writer_id}_{self._counter:05d}"
        return f"{prefix}-{self.run_id}-{number}.parquet"

    # -- writing ----------------------------------------------------------------------------------

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        """Add label rows (one table or record batch; ``release`` and ``sky`` columns are ignored)."""
        if self._closed:
            raise IntegrityError("write() after close() or abort(): the run's files are already final")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if table.num_rows == 0:
            return
        if "spectrum_id" not in table.column_names or table.column("spectrum_id").null_count:
            raise InputError("label rows need a non-null spectrum_id (rows without one belong in quarantine)")
        sky, fine = self.layout.assign(table)
        table = normalise(table)
        if HEALPIX in table.column_names:
            table = table.drop_columns([HEALPIX])
        table = table.add_column(1, HEALPIX, fine)
        table = self._conform(table)
        self._rows_in += table.num_rows
        order = np.argsort(sky, kind="stable")
        cells, starts = np.unique(sky[order], return_index=True)
        for cell, indices in zip(cells, np.split(order, starts[1:]), strict=True):
            # take() gives each cell its own buffers, so spilling a cell really frees its memory.
            self._buffer(int(cell), table.take(indices))
        while self._buffered_bytes > self.options.buffer_bytes:
            self._spill(max(self._buffers, key=lambda c: sum(t.nbytes for t in self._buffers[c])))

    def _conform(self, table: pa.Table) -> pa.Table:
        """One schema per run: the first table's. Later tables may lack optional columns (filled
        with nulls) but not bring new ones, which the files written before could not hold."""
        if self.schema is None:
            self.schema = table.schema
            return table
        extra = [name for name in table.column_names if name not in self.schema.names]
        if extra:
            raise InputError(
                f"label rows bring column(s) {extra} that earlier rows of run {self.run_id} lacked; "
                "every batch of a run must have the same columns"
            )
        columns = []
        for f in self.schema:
            if f.name in table.column_names:
                columns.append(table.column(f.name).cast(f.type))
            else:
                columns.append(pa.nulls(table.num_rows, f.type))
        return pa.Table.from_arrays(columns, schema=self.schema)

    def _buffer(self, cell: int, rows: pa.Table) -> None:
        self._buffers.setdefault(cell, []).append(rows)
        self._buffered_rows[cell] = self._buffered_rows.get(cell, 0) + rows.num_rows
        self._buffered_bytes += rows.nbytes
        if self._buffered_rows[cell] >= self.options.max_rows_per_file:
            rest = self._write_full_files(cell, self._take_buffer(cell))
            if rest.num_rows:
                self._buffer(cell, rest)

    def _take_buffer(self, cell: int) -> pa.Table:
        tables = self._buffers.pop(cell, [])
        self._buffered_rows.pop(cell, None)
        self._buffered_bytes -= sum(t.nbytes for t in tables)
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def _spill(self, cell: int) -> None:
        rows = self._take_buffer(cell)
        path = join(self.spill_dir, f"sky={cell}", self._next_name("spill"))
        self.dataset.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.dataset.fs.open_output_stream(path) as out:
            pq.write_table(rows, out, compression="lz4")  # scratch: fast beats small
        self._spills.setdefault(cell, []).append(path)

    def _write_full_files(self, cell: int, rows: pa.Table) -> pa.Table:
        """Write sorted files of exactly max_rows_per_file rows; return the rows left over."""
        limit = self.options.max_rows_per_file
        if rows.num_rows < limit:
            return rows
        rows = rows.sort_by(SORT_KEYS)
        full = rows.num_rows // limit * limit
        for start in range(0, full, limit):
            self._write_file(cell, rows.slice(start, limit))
        return rows.slice(full)

    def _write_file(self, cell: int, rows: pa.Table) -> None:
        rows = rows.sort_by(SORT_KEYS)
        if pc.count_distinct(rows.column("spectrum_id")).as_py() != rows.num_rows:
            counts = rows.group_by("spectrum_id").aggregate([("spectrum_id", "count")])
            dup = counts.filter(pc.field("spectrum_id_count") > 1).column("spectrum_id")[0].as_py()
            raise IntegrityError(
                f"spectrum_id {dup!r} occurs more than once in run {self.run_id} of release "
                f"{self.release}: a catalogue holds one row per spectrum and release "
                "(duplicates belong in quarantine)"
            )
        path = join(self.staged_release, f"{SKY}={cell}", self._next_name("part"))
        self.dataset.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        metadata = {
            b"speclabel.catalogue": json.dumps(
                {"release": self.release, "run_id": self.run_id, **self.layout.to_dict()}
            ).encode()
        }
        with self.dataset.fs.open_output_stream(path) as out:
            pq.write_table(
                rows.replace_schema_metadata(metadata),
                out,
                row_group_size=self.options.row_group_rows,
                compression=self.options.compression,
            )
        self._files.append(path)
        self._rows_per_sky[cell] = self._rows_per_sky.get(cell, 0) + rows.num_rows
        self._bytes += self.dataset.fs.get_file_info(path).size

    # -- finishing --------------------------------------------------------------------------------

    def close(self) -> WriteResult:
        """Write what is buffered and spilled as final files and check the row count; on failure
        everything this writer staged is removed."""
        if self._closed:
            if self.result is None:
                raise IntegrityError(f"run {self.run_id} was aborted")
            return self.result
        try:
            self._compact()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.result = WriteResult(
            self.release, self.run_id, self._rows_in, list(self._files), self._bytes, dict(self._rows_per_sky)
        )
        return self.result

    def _compact(self) -> None:
        for cell in sorted(set(self._buffers) | set(self._spills)):
            pending = [self._take_buffer(cell)] if cell in self._buffers else []
            pending_rows = sum(t.num_rows for t in pending)
            for path in self._spills.get(cell, []):
                with self.dataset.fs.open_input_file(path) as fh:
                    piece = pq.read_table(fh)
                pending.append(piece)
                pending_rows += piece.num_rows
                if pending_rows >= self.options.max_rows_per_file:
                    rest = self._write_full_files(cell, pa.concat_tables(pending))
                    pending, pending_rows = [rest], rest.num_rows
            if pending_rows:
                self._write_file(cell, pa.concat_tables(pending))
        self._delete_spills()
        written = sum(self._rows_per_sky.values())
        if written != self._rows_in:
            raise IntegrityError(
                f"catalogue writer of run {self.run_id} was given {self._rows_in} rows but wrote {written}"
            )

    def abort(self) -> None:
        """Drop everything this writer staged (the run's staging folder for this release)."""
        self._closed = True
        self._buffers.clear()
        self._buffered_bytes = 0
        self._delete_spills()
        for path in self._files:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.dataset.fs.delete_file(path)

    def _delete_spills(self) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.dataset.fs.delete_dir(self.spill_dir)
        self._spills.clear()

    def __enter__(self) -> CatalogueWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_release(
    location: str | Dataset,
    release: str,
    tables: Iterable[pa.Table | pa.RecordBatch],
    *,
    model_id: str,
    run_id: str | None = None,
    layout: CatalogueLayout | None = None,
    options: WriteOptions | None = None,
    manifest: dict | None = None,
    index_fields: dict | None = None,
) -> WriteResult:
    """Write and publish one release of label rows in one step: lock, recover what a crashed run
    left, stage, publish (replacing the release's live rows and keeping the old ones under
    ``_versions/``). ``model_id`` goes into the release's index entry, where readers select by it."""
    dataset = location if isinstance(location, Dataset) else Dataset.open(location)
    run_id = run_id or new_run_id()
    with dataset.lock(run_id):
        dataset.recover()
        with CatalogueWriter(dataset, release, run_id, layout, options) as writer:
            for table in tables:
                writer.write(table)
        result = writer.result
        dataset.publish(
            release,
            run_id,
            {**(manifest or {}), "catalogue": result.summary(), "layout": writer.layout.to_dict()},
            {"model_id": model_id, "rows": result.rows, **(index_fields or {})},
        )
    return result
