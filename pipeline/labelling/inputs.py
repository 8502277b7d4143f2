"""What a label run reads: input files, row counts, a fingerprint and the duplicate decision.

Before any spectrum is read, the driver makes one cheap pass over the input (:meth:`ParquetInput.open`):

* INPUT (a Parquet file, a directory, a glob, local or object store, or a published spectra store
  with an ``_index.json``, whose live files are taken from the index: those of the run's release
  when one is named, else of every release) becomes a sorted list of files;
* each file's Parquet footer gives its row count, row groups and schema. A file that cannot be
  labelled with the model's setup is refused whole, every row quarantined with the file's reason:
  ``wrong_setup`` when it declares another setup (``speclabel.setup`` in its schema metadata),
  ``wrong_schema`` when it lacks ``spectrum_id`` or a flux column or has non-float flux. A file whose
  footer cannot be read is quarantined as ``corrupt_file`` (one row, no id: its row count is unknown);
* the ``spectrum_id`` column (and ``release``, when the run has no ``--release``) of each accepted file
  is read, nothing else. An id seen more than once keeps its **first occurrence in (sorted file path,
  row order)**; every later occurrence is quarantined as ``duplicate_id``. The decision travels to
  the readers as row indices per row group, so it is exact however Ray splits the work;
* the **input fingerprint** is the sha256 over the files in path order of each file's path, size and
  Parquet footer bytes (schema, row counts, per-row-group offsets and statistics). Rewriting a file
  changes its footer in practice, so a changed input is seen without reading every byte; it is not a
  content hash (``--force`` relabels regardless).

Spectra are then read by Ray tasks, one per slice of a row group (of one actor batch, at most
``MAX_SLICES_PER_ROW_GROUP`` per group), with only the columns the job needs (:func:`read_spectra`),
streamed in batches so that a task's memory does not grow with its row group: the actors share a file
of one large row group (pyarrow's default below ~1 M rows) as they share many small ones.

A run that may reuse the live rows of its release (``LabelOptions.reuse_unchanged``) first calls
:meth:`ParquetInput.carry_unchanged`: rows whose ``(spectrum_id, input_sha256)`` equal a live
catalogue row's are *carried* (their live row is kept) and are never read or sent to the actors;
row groups made only of carried rows are not read at all.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speclabel.core.contract import (
    CORRUPT_FILE,
    INPUT_SHA256,
    WRONG_SCHEMA,
    WRONG_SETUP,
    check_table_columns,
    quarantine_table,
)
from speclabel.core.errors import InputError
from speclabel.core.setups import Setup
from speclabel.core.storage import exists, filesystem_and_path, join, resolve_files
from speclabel.model.io import MODEL_JSON

from ..publish import INDEX, Dataset
from .batch import DUPLICATE, PASS_THROUGH, SOURCE

PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
FITS_EXTENSIONS = (".fits", ".fit", ".fits.gz", ".fit.gz")
_RELEASE_IN_PATH = re.compile(r"/release=([^/]+)/")
READ_BUFFER_BYTES = 4 * 2**20  # per column read: what a read task holds besides its batch
# Slices of one row group each decode (and drop) the rows before them: at most this many slices
# bound that extra decoding to (n - 1) / 2 row groups' worth, small next to labelling the rows.
MAX_SLICES_PER_ROW_GROUP = 32


class SpectraSource(Protocol):
    """What the label job needs from its input; :class:`ParquetInput` is the real one, a benchmark
    may pass a generating source. ``dataset`` yields input rows (contract columns plus ``_source``,
    ``_duplicate``); every row's ``_source`` must be a key of ``rows_by_source``."""

    fingerprint: str
    releases: list[str]

    @property
    def rows_in(self) -> int: ...

    def rows_by_source(self) -> dict[str, int]: ...

    def describe(self) -> dict: ...

    def refused_quarantine(self) -> Iterator[pa.Table]: ...

    def scan_ids(self) -> None: ...

    def all_ids(self) -> list[str]: ...

    def dataset(self, *, read_rows: int, num_cpus: float): ...


@dataclass
class InputFile:
    path: str
    size: int
    rows: int | None  # None when the footer cannot be read
    row_group_rows: tuple[int, ...] = ()
    columns: tuple[str, ...] = ()  # the columns the job reads from this file
    refused: str | None = None  # "code: detail" when the whole file is quarantined
    path_release: str | None = None  # from a hive ``release=<R>`` folder in the path

    def to_manifest(self) -> dict:
        return {
            "path": self.path,
            "size": self.size,
            "rows": self.rows,
            "row_groups": len(self.row_group_rows),
            **({"refused": self.refused} if self.refused else {}),
        }


@dataclass
class ParquetInput:
    """The input of one run, after the driver's pre-pass (see the module docstring)."""

    location: str
    fs: pafs.FileSystem
    files: list[InputFile]
    fingerprint: str
    releases: list[str]  # distinct release values found in the input (column or path)
    duplicates: dict[str, np.ndarray] = field(default_factory=dict)  # path -> row indices
    carried: dict[str, np.ndarray] = field(default_factory=dict)  # path -> row indices kept as they are

    @classmethod
    def open(
        cls, location: str, setup: Setup, *, read_releases: bool = True, release: str | None = None
    ) -> ParquetInput:
        """Footers, fingerprint and releases; enough to tell whether a run is up to date. The ids
        are read by :meth:`scan_ids`, once the run is known to have work to do. ``release``: of a
        spectra store, read only that release's live files."""
        fs, paths = input_files(location, release)
        files = [inspect_file(fs, path, setup) for path in paths]
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{f.path}\x00{f.size}\x00".encode())
            digest.update(footer_bytes(fs, f.path, f.size) or b"unreadable")
        releases: set[str] = set()
        for f in files if read_releases else ():
            if f.refused is not None:
                continue
            if f.path_release:
                releases.add(f.path_release)
            if "release" in f.columns:
                releases |= release_values(fs, f.path)
        return cls(location, fs, files, digest.hexdigest(), sorted(releases))

    def scan_ids(self) -> None:
        """Read the ``spectrum_id`` column of the accepted files and decide the duplicates."""
        ids = []
        for f in self.accepted:
            with self.fs.open_input_file(f.path) as fh:
                ids.append(
                    pq.ParquetFile(fh).read(columns=["spectrum_id"]).column("spectrum_id").cast(pa.string())
                )
        self.duplicates = duplicate_rows(self.accepted, ids)

    def carry_unchanged(self, live: dict[str, str]) -> set[str]:
        """Mark the rows whose ``input_sha256`` equals that of the live row of the same id in
        ``live`` (id -> input_sha256) as carried, and return their ids. Duplicates are never
        carried; files without an ``input_sha256`` column carry nothing (their rows are labelled).
        Call after :meth:`scan_ids`."""
        self.carried = {}
        carried_ids: set[str] = set()
        if not live:
            return carried_ids
        live_table = pa.table({"id": list(live), "sha": list(live.values())})
        for f in self.accepted:
            with self.fs.open_input_file(f.path) as fh:
                parquet = pq.ParquetFile(fh)
                if INPUT_SHA256 not in parquet.schema_arrow.names:
                    continue
                rows = parquet.read(columns=["spectrum_id", INPUT_SHA256])
            ids = rows.column("spectrum_id").cast(pa.string())
            shas = rows.column(INPUT_SHA256).cast(pa.string())
            known = pc.index_in(ids, value_set=live_table.column("id"))
            same = pc.fill_null(pc.equal(shas, pc.take(live_table.column("sha"), known)), False)
            keep = np.array(same.to_numpy(zero_copy_only=False), dtype=bool)
            keep[self.duplicates.get(f.path, np.empty(0, np.int64))] = False
            if keep.any():
                indices = np.flatnonzero(keep)
                self.carried[f.path] = indices
                carried_ids.update(ids.take(pa.array(indices)).to_pylist())
        return carried_ids

    # -- counts -----------------------------------------------------------------------------------

    @property
    def accepted(self) -> list[InputFile]:
        return [f for f in self.files if f.refused is None]

    @property
    def rows_in(self) -> int:
        """Rows of every readable file (accepted or refused): what the run must account for."""
        return sum(f.rows for f in self.files if f.rows is not None)

    def rows_by_source(self) -> dict[str, int]:
        return {f.path: f.rows for f in self.files if f.rows is not None}

    def carried_by_source(self) -> dict[str, int]:
        return {path: len(rows) for path, rows in self.carried.items()}

    def describe(self) -> dict:
        return {
            "location": self.location,
            "fingerprint": self.fingerprint,
            "fingerprint_rule": "sha256 over files in path order of path, size and Parquet footer bytes",
            "files": [f.to_manifest() for f in self.files],
            "duplicates": int(sum(len(v) for v in self.duplicates.values())),
            "carried": int(sum(len(v) for v in self.carried.values())),
        }

    def all_ids(self) -> list[str]:
        """Every labelled-to-be id of the accepted files (first occurrences, no null or empty ids)."""
        ids = []
        for f in self.accepted:
            with self.fs.open_input_file(f.path) as fh:
                column = pq.ParquetFile(fh).read(columns=["spectrum_id"]).column("spectrum_id")
            values = column.cast(pa.string()).to_pylist()
            skip = set(self.duplicates.get(f.path, np.empty(0, np.int64)).tolist())
            ids += [v for i, v in enumerate(values) if v and i not in skip]
        return ids

    # -- reading ----------------------------------------------------------------------------------

    def refused_quarantine(self) -> Iterator[pa.Table]:
        """Quarantine rows (``QUARANTINE_SCHEMA``) for every row of the refused files."""
        for f in self.files:
            if f.refused is None:
                continue
            if f.rows is None:  # unreadable: one row for the file
                yield quarantine_table([None], [f.refused], f.path)
                continue
            ids = None
            if "spectrum_id" in f.columns:
                try:
                    with self.fs.open_input_file(f.path) as fh:
                        ids = pq.ParquetFile(fh).read(columns=["spectrum_id"]).column("spectrum_id")
                        ids = ids.cast(pa.string()).to_pylist()
                except (OSError, pa.ArrowException):
                    ids = None
            ids = ids if ids is not None else [None] * f.rows
            yield quarantine_table(ids, [f.refused] * len(ids), f.path)

    def read_tasks(self, read_rows: int) -> list[dict]:
        """One item per slice of a row group of the accepted files that has rows to label: what
        :func:`read_spectra` reads. A row group is cut into slices of ``read_rows`` rows (one actor
        batch), at most ``MAX_SLICES_PER_ROW_GROUP`` of them, so that the actors share a file of one
        large row group as they share many small ones; each slice becomes one block of the stream."""
        items = []
        for f in self.accepted:
            duplicates = self.duplicates.get(f.path, np.empty(0, np.int64))
            carried = self.carried.get(f.path, np.empty(0, np.int64))
            first = 0
            for group, n in enumerate(f.row_group_rows):
                length = -(-n // min(max(1, -(-n // read_rows)), MAX_SLICES_PER_ROW_GROUP))
                for start in range(0, n, length):
                    rows = min(length, n - start)
                    lo, hi = first + start, first + start + rows
                    skip = carried[(carried >= lo) & (carried < hi)] - lo
                    if len(skip) == rows:
                        continue
                    local = duplicates[(duplicates >= lo) & (duplicates < hi)] - lo
                    items.append(
                        {
                            "path": f.path,
                            "row_group": group,
                            "start": start,
                            "rows": rows,
                            "columns": json.dumps(list(f.columns)),
                            "duplicates": json.dumps([int(i) for i in local]),
                            "carried": json.dumps([int(i) for i in skip]),
                        }
                    )
                first += n
        return items

    def dataset(self, *, read_rows: int, num_cpus: float):
        """A Ray dataset of input rows (contract columns + ``_source`` + ``_duplicate``)."""
        import ray

        items = self.read_tasks(read_rows)
        if not items:
            return None
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_spectra,
            fn_kwargs={"fs": self.fs, "read_rows": read_rows},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=num_cpus,
        )


def read_spectra(items: pa.Table, fs: pafs.FileSystem, read_rows: int) -> Iterator[pa.Table]:
    """Read the row-group slices named by ``items`` (see :meth:`ParquetInput.read_tasks`) in tables
    of at most ``read_rows`` rows, with ``_source`` and ``_duplicate`` added and carried rows left
    out. Rows before a slice are decoded and dropped: Parquet readers cannot seek to a row."""
    for item in items.to_pylist():
        duplicates = np.asarray(json.loads(item["duplicates"]), dtype=np.int64)
        carried = np.asarray(json.loads(item["carried"]), dtype=np.int64)
        begin, end = item["start"], item["start"] + item["rows"]
        with fs.open_input_file(item["path"]) as fh:
            at = 0  # row of the row group at the batch's start
            # Streamed, not pre-buffered: pre-buffering loads a row group's column chunks whole
            # before the first batch, which for a file of one 100k-row group is the whole file.
            parquet = pq.ParquetFile(fh, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
            for batch in parquet.iter_batches(
                batch_size=read_rows, row_groups=[item["row_group"]], columns=json.loads(item["columns"])
            ):
                lo, hi = max(at, begin), min(at + batch.num_rows, end)
                at += batch.num_rows
                if hi <= lo:
                    if at >= end:
                        break
                    continue
                batch = batch.slice(lo - (at - batch.num_rows), hi - lo)
                start, n = lo - begin, hi - lo  # rows of the slice this batch holds
                flagged = np.zeros(n, dtype=bool)
                flagged[duplicates[(duplicates >= start) & (duplicates < start + n)] - start] = True
                wanted = np.ones(n, dtype=bool)
                wanted[carried[(carried >= start) & (carried < start + n)] - start] = False
                if not wanted.any():
                    continue
                table = pa.Table.from_batches([batch])
                table = table.append_column(SOURCE, pa.array([item["path"]] * n, pa.string()))
                table = table.append_column(DUPLICATE, pa.array(flagged))
                yield table if wanted.all() else table.filter(pa.array(wanted))


# -- the pre-pass -------------------------------------------------------------------------------------


def check_inputs(spectra: str, model: str, release: str | None = None) -> None:
    """Fail in a moment on spectra that are not there or a model folder without ``model.json``:
    the command line calls it before Ray's start-up of seconds. :func:`label_spectra` checks
    everything again, the model's integrity included."""
    input_files(spectra, release)
    fs, root = filesystem_and_path(model)
    if not exists(fs, join(root.rstrip("/"), MODEL_JSON)):
        what = (
            "does not exist" if not exists(fs, root) else f"has no {MODEL_JSON}: it is not a model directory"
        )
        raise InputError(f"--model {model} {what}")


def input_files(location: str, release: str | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of INPUT, sorted (see the module docstring)."""
    fs, root = filesystem_and_path(location)
    if exists(fs, join(root.rstrip("/"), INDEX)):
        store = Dataset.open(location)
        releases = sorted(store.index()["releases"])
        if release is not None and release not in releases:
            raise InputError(f"the spectra store {location} has no release {release!r} (it has {releases})")
        files = store.live_files(release)
        if not files:
            which = f"release {release} of " if release is not None else ""
            raise InputError(f"{which}the spectra store {location} has no published rows")
        return store.fs, sorted(files)
    try:
        return resolve_files(location, PARQUET_EXTENSIONS)
    except InputError as exc:
        try:
            _, fits_files = resolve_files(location, FITS_EXTENSIONS)
        except InputError:
            raise exc from None
        raise InputError(
            f"{location} holds {len(fits_files)} FITS files and no Parquet: the label job reads spectra "
            "tables; put the FITS spectra on the setup's grid with `speclabel ingest INPUT --out STORE "
            "--release R` and label the store (`speclabel label --spectra STORE ...`)"
        ) from None


def inspect_file(fs: pafs.FileSystem, path: str, setup: Setup) -> InputFile:
    """A file's footer facts, and whether the file as a whole can be labelled with ``setup``."""
    size = fs.get_file_info(path).size or 0
    release_match = _RELEASE_IN_PATH.search(path)
    path_release = release_match.group(1) if release_match else None
    try:
        with fs.open_input_file(path) as fh:
            parquet = pq.ParquetFile(fh)
            metadata, schema = parquet.metadata, parquet.schema_arrow
    except (OSError, pa.ArrowException) as exc:
        return InputFile(
            path,
            size,
            None,
            refused=f"{CORRUPT_FILE}: not a readable Parquet file: {exc}",
            path_release=path_release,
        )
    rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    present = set(schema.names)
    wanted = ["spectrum_id"]
    for arm in setup.arms:
        wanted += [c for c in (arm.flux_column, arm.ivar_column) if c in present]
    wanted += [c for c in PASS_THROUGH if c in present]
    wanted += ["release"] if "release" in present else []
    columns = tuple(c for c in wanted if c in present)
    refused = None
    try:
        check_table_columns(schema, setup, source=path)
    except InputError as exc:
        declared = (schema.metadata or {}).get(b"speclabel.setup")
        other_setup = declared is not None and declared.decode() != setup.name
        refused = f"{WRONG_SETUP if other_setup else WRONG_SCHEMA}: {exc}"
    return InputFile(path, size, metadata.num_rows, rows, columns, refused, path_release)


def release_values(fs: pafs.FileSystem, path: str) -> set[str]:
    """The distinct non-null values of a file's ``release`` column: from the row-group statistics
    when every row group holds one value (the usual case), else by reading the column."""
    with fs.open_input_file(path) as fh:
        parquet = pq.ParquetFile(fh)
        index = parquet.schema_arrow.get_field_index("release")
        leaf = parquet.metadata.schema.names.index("release") if index >= 0 else -1
        values: set[str] = set()
        for group in range(parquet.metadata.num_row_groups):
            stats = parquet.metadata.row_group(group).column(leaf).statistics if leaf >= 0 else None
            if stats is None or not stats.has_min_max or stats.min != stats.max:
                column = parquet.read(columns=["release"]).column("release").cast(pa.string())
                return {v for v in pc.unique(column).to_pylist() if v}
            values.add(stats.min if isinstance(stats.min, str) else bytes(stats.min).decode())
        return values


def footer_bytes(fs: pafs.FileSystem, path: str, size: int) -> bytes | None:
    """The Parquet footer (file metadata) as stored, or None when the file has none."""
    if size < 12:
        return None
    try:
        with fs.open_input_file(path) as fh:
            fh.seek(size - 8)
            tail = fh.read(8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] != b"PAR1" or length > size - 12:
                return None
            fh.seek(size - 8 - length)
            return fh.read(length)
    except OSError:
        return None


def duplicate_rows(files: list[InputFile], ids: list[pa.ChunkedArray]) -> dict[str, np.ndarray]:
    """Row indices (per file path) of every occurrence of an id after its first one in (sorted
    file path, row order). Null and empty ids are left to validation (``missing_id``)."""
    if not files:
        return {}
    counts = np.array([len(i) for i in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    table = pa.table(
        {
            "id": pa.chunked_array([c for chunked in ids for c in chunked.chunks], pa.string()),
            "pos": pa.array(np.arange(offsets[-1], dtype=np.int64)),
        }
    )
    table = table.filter(pc.greater(pc.fill_null(pc.utf8_length(table.column("id")), 0), 0))
    grouped = table.group_by("id").aggregate([("pos", "min"), ("pos", "count")])
    repeated = grouped.filter(pc.field("pos_count") > 1)
    if repeated.num_rows == 0:
        return {}
    candidates = table.filter(pc.is_in(table.column("id"), value_set=repeated.column("id")))
    later = candidates.filter(
        pc.invert(pc.is_in(candidates.column("pos"), value_set=repeated.column("pos_min")))
    )
    positions = np.sort(later.column("pos").to_numpy())
    which = np.searchsorted(offsets, positions, side="right") - 1
    return {files[i].path: positions[which == i] - offsets[i] for i in np.unique(which)}
