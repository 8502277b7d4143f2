"""Pass 1 of ingest: the input files (listed, fingerprinted) and what a header or footer says of each.

A FITS file's primary header (its first 2880-byte blocks) names the star it belongs to
(:func:`.fits_formats.spectrum_id`: CNAME, else OBJECT, else the file name); a Parquet file's schema,
row groups and ``spectrum_id`` column say what its rows are. Nothing is decoded here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.metadata import version

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speclabel.core import contract
from speclabel.core.errors import InputError, SpeclabelError
from speclabel.core.fingerprints import files_fingerprint
from speclabel.core.setups import Setup
from speclabel.core.storage import filesystem_and_path, resolve_files

from ..fits_formats import GZIP_MAGIC, Unusable, is_fits_path, read_primary_header, spectrum_id
from .options import IngestOptions

PARQUET_EXTENSIONS = (".parquet",)
INPUT_EXTENSIONS = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", *PARQUET_EXTENSIONS)

SCAN_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("kind", pa.string()),
        ("spectrum_id", pa.string()),
        ("id_source", pa.string()),
        ("ids", pa.list_(pa.string())),
        ("row_groups", pa.list_(pa.int64())),
        ("sha256", pa.string()),
        ("reason", pa.string()),
    ]
)


@dataclass
class InputFile:
    path: str
    size: int
    mtime_ns: int | None

    @property
    def kind(self) -> str:
        return "fits" if is_fits_path(self.path) else "parquet"


def list_inputs(location: str, store: str | None = None) -> tuple[pafs.FileSystem, list[InputFile]]:
    """FITS and Parquet files at a file, directory (recursive) or glob; files inside ``store`` are skipped."""
    fs, paths = resolve_files(location, INPUT_EXTENSIONS)
    if store is not None:
        _, store_root = filesystem_and_path(store)
        paths = [p for p in paths if not p.startswith(store_root.rstrip("/") + "/")]
        if not paths:
            raise InputError(f"no input files at {location!r} outside the store {store!r}")
    infos = fs.get_file_info(paths)
    return fs, [InputFile(i.path, int(i.size or 0), i.mtime_ns) for i in infos]


def input_fingerprint(files: list[InputFile], setup: Setup, options: IngestOptions) -> str:
    return files_fingerprint(
        ((f.path, f.size, f.mtime_ns) for f in files),
        speclabel=version("speclabel"),
        setup=setup.to_dict(),
        options=options.fingerprint_fields(),
    )


def file_sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path, compression=None) as stream:
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def scan_block(block: pa.Table, *, fs: pafs.FileSystem, setup: Setup) -> pa.Table:
    """Pass 1 over a block of file paths: the star of each FITS file, the ids of each Parquet file."""
    rows = []
    for path in block.column("path").to_pylist():
        row = dict.fromkeys(SCAN_SCHEMA.names)
        row["path"] = path
        try:
            if is_fits_path(path):
                row["kind"] = "fits"
                try:
                    with _open_fits_stream(fs, path) as stream:
                        header = read_primary_header(stream.read)
                except (OSError, ValueError, EOFError) as exc:
                    raise Unusable(contract.CORRUPT_FILE, f"cannot read the primary header: {exc}") from exc
                row["spectrum_id"], row["id_source"] = spectrum_id(header, path)
            else:
                row["kind"] = "parquet"
                row.update(_scan_parquet(fs, path, setup))
        except Unusable as exc:
            row["reason"] = f"{exc.reason}: {exc.detail}"
            row["sha256"] = _sha256_or_none(fs, path)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCAN_SCHEMA)


def _open_fits_stream(fs: pafs.FileSystem, path: str):
    """A stream of the FITS bytes, gunzipped when the file is gzip (by content, not by name)."""
    with fs.open_input_stream(path, compression=None) as probe:
        magic = probe.read(len(GZIP_MAGIC))
    return fs.open_input_stream(path, compression="gzip" if magic == GZIP_MAGIC else None)


def _scan_parquet(fs: pafs.FileSystem, path: str, setup: Setup) -> dict:
    try:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            try:
                contract.check_table_columns(parquet.schema_arrow, setup, source=path)
            except SpeclabelError as exc:
                raise Unusable(contract.WRONG_SCHEMA, str(exc)) from exc
            ids = parquet.read(columns=["spectrum_id"]).column(0).cast(pa.string()).to_pylist()
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise Unusable(contract.CORRUPT_FILE, f"not a readable Parquet file: {exc}") from exc
    return {"ids": ids, "row_groups": sizes, "sha256": file_sha256(fs, path)}


def _sha256_or_none(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        return file_sha256(fs, path)
    except OSError:
        return None
