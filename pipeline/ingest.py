"""``speclabel ingest``: survey spectrum files (FITS, contract Parquet) into the spectra store, on Ray Data.

The job runs in two passes over the input files:

1. **scan** (Ray Data, a map over file names): reads each FITS file's primary header only (its first
   2880-byte blocks) to name the star it belongs to (:func:`.fits_formats.spectrum_id`: CNAME, else
   OBJECT, else the file name), and each Parquet file's schema, row groups and ``spectrum_id`` column.
2. **plan** (driver): the per-setup files of one star are grouped by that id; Parquet rows whose id was
   seen before are marked as duplicates; the stars and row groups are packed into tasks.
3. **ingest** (Ray Data, a map over tasks, streaming): each task reads its files, decodes them
   (:mod:`.fits_formats`), puts every arm on the setup's grid (:mod:`.resample`, :mod:`.normalise`),
   keeps the highest-S/N file per star and arm, writes one part file of store rows into the run's
   staging folder and one quarantine file, and returns one summary row per input file.
4. **publish** (driver): every input is checked to be accounted for (files in = files used + files
   quarantined; spectra in = stored + quarantined; rows on disk = rows reported), the manifest and
   its table of input files (size, mtime, sha256, outcome) are written, and the release is published
   through :class:`.publish.Dataset`.

Why this plan rather than decoding every file and then ``groupby(spectrum_id)``: grouping needs only
header metadata, so the shuffle moves a few hundred bytes per file instead of the decoded arrays
(~100 KB per arm), and the ingest pass is a plain streaming map whose memory does not grow with the
survey. All files of a star land in the same task, so duplicates and missing arms are decided there.

Re-ingesting the same files (same paths, sizes and modification times) with the same setup, options
and speclabel version into the same release is a no-op unless forced: the input fingerprint is
stored in the release's index entry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from importlib.metadata import version

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speclabel.core import contract
from speclabel.core.arrays import fixed_size_list, spectra_arrays
from speclabel.core.errors import ConfigError, InputError, IntegrityError, SpeclabelError
from speclabel.core.faults import fault_point, planned_fault
from speclabel.core.fingerprints import files_fingerprint, spectrum_sha256
from speclabel.core.layout import check_release_name
from speclabel.core.setups import Arm, Setup
from speclabel.core.storage import atomic_output, filesystem_and_path, join, resolve_files

from .fits_formats import (
    GZIP_MAGIC,
    SpectrumMeta,
    Unusable,
    decode,
    is_fits_path,
    read_primary_header,
    spectrum_id,
)
from .lock import DEFAULT_LOCK_TIMEOUT_S
from .normalise import NORMALISED_MODES, ContinuumConfig, is_normalised, normalise
from .publish import Dataset, new_run_id
from .resample import (
    angstrom_per_unit,
    arm_edges,
    convert_medium,
    pixel_edges,
    resample,
    to_rest_frame,
)

log = logging.getLogger(__name__)

PARQUET_EXTENSIONS = (".parquet",)
INPUT_EXTENSIONS = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", *PARQUET_EXTENSIONS)
MISSING_ARM_MODES = ("quarantine", "mask")

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
class IngestOptions:
    """What ingest does to each spectrum; everything but the task sizes is part of the input fingerprint."""

    release: str
    normalised: str = "auto"  # auto | yes | no (see pipeline.normalise)
    default_medium: str = "air"  # medium of wavelengths whose file does not declare one
    missing_arm: str = "quarantine"  # quarantine | mask: a star without a file for some arm
    rv_shift: bool = True  # shift to the rest frame by the header's radial velocity
    min_arm_coverage: float = 0.5  # of an arm, for a file whose header names no setup
    resolution_tolerance: float = 0.25  # |SPEC_RES / arm R - 1| above this is another instrument
    continuum: ContinuumConfig = field(default_factory=ContinuumConfig)
    stars_per_task: int = 256
    files_per_scan_task: int = 512

    def __post_init__(self) -> None:
        check_release_name(self.release)
        if self.normalised not in NORMALISED_MODES:
            raise ConfigError(f"normalised must be one of {NORMALISED_MODES}, not {self.normalised!r}")
        if self.missing_arm not in MISSING_ARM_MODES:
            raise ConfigError(f"missing_arm must be one of {MISSING_ARM_MODES}, not {self.missing_arm!r}")
        if self.default_medium not in ("air", "vacuum"):
            raise ConfigError(f"default_medium must be air or vacuum, not {self.default_medium!r}")

    def fingerprint_fields(self) -> dict:
        fields = asdict(self)
        for layout_only in ("stars_per_task", "files_per_scan_task"):
            fields.pop(layout_only)
        return fields


# -- one FITS file, one star ----------------------------------------------------------------------


@dataclass
class PreparedArm:
    """One file's spectrum on one arm of the setup's grid."""

    path: str
    arm: str
    flux: np.ndarray  # float32, NaN where masked
    ivar: np.ndarray  # float32, 0 where masked
    snr: float
    normalised_input: bool
    meta: SpectrumMeta


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def choose_arm(meta: SpectrumMeta, wave: np.ndarray, setup: Setup, options: IngestOptions) -> Arm:
    """The arm a file belongs to: the one its header's SETUP (or DISPELEM) names, else by coverage."""
    arms = {_key(arm.name): arm for arm in setup.arms}
    low, high = float(wave[0]), float(wave[-1])
    named = None
    if meta.setup:
        named = arms.get(_key(meta.setup))
        if named is None:
            instrument = f" of {meta.instrument}" if meta.instrument else ""
            raise Unusable(
                contract.WRONG_SETUP,
                f"header SETUP = {meta.setup!r}{instrument}; setup {setup.name} has arms "
                f"{[a.name for a in setup.arms]}",
            )
    elif meta.dispelem:
        named = arms.get(_key(meta.dispelem))  # DISPELEM is often a grating name: only a hint
    if named is not None:
        if named.overlap(low, high) <= 0:
            raise Unusable(
                contract.NO_OVERLAP,
                f"header names arm {named.name} ({named.wave_start:.1f}-{named.wave_end:.1f} Å) but the "
                f"wavelengths span {low:.1f}-{high:.1f} Å ({setup.medium}, rest frame)",
            )
        return named
    best = max(setup.arms, key=lambda arm: arm.overlap(low, high))
    coverage = best.overlap(low, high)
    if coverage < options.min_arm_coverage:
        raise Unusable(
            contract.NO_OVERLAP,
            f"wavelengths {low:.1f}-{high:.1f} Å ({setup.medium}, rest frame) cover {coverage:.0%} of arm "
            f"{best.name} at most; a file whose header names no setup must cover "
            f"{options.min_arm_coverage:.0%} of an arm of {setup.name}",
        )
    return best


def measured_snr(flux: np.ndarray, ivar: np.ndarray) -> float:
    good = (ivar > 0) & np.isfinite(flux)
    return float(np.median(np.abs(flux[good]) * np.sqrt(ivar[good]))) if good.any() else 0.0


def prepare_file(path: str, data: bytes, setup: Setup, options: IngestOptions) -> PreparedArm:
    """Decode one FITS file and put it on its arm's grid; raises :class:`Unusable` with the reason."""
    raw = decode(data)
    wave = raw.wave * angstrom_per_unit(raw.wave_unit)  # the decoder checked that the unit is a length
    wave = convert_medium(wave, raw.medium or options.default_medium, setup.medium)
    meta = raw.meta
    in_rest_frame = (meta.frame or "").strip().upper() == "SOURCE"
    if options.rv_shift and meta.rv_kms is not None and not in_rest_frame:
        wave = to_rest_frame(wave, meta.rv_kms)
    arm = choose_arm(meta, wave, setup, options)
    if meta.resolution and abs(meta.resolution / arm.resolution - 1.0) > options.resolution_tolerance:
        instrument = f" ({meta.instrument})" if meta.instrument else ""
        raise Unusable(
            contract.WRONG_RESOLUTION,
            f"SPEC_RES = {meta.resolution:g}{instrument}, arm {arm.name} has R = {arm.resolution:g}",
        )
    normalised_input = is_normalised(options.normalised, raw.flux, raw.ivar, raw.flux_unit, meta.normalised)
    lower, upper = pixel_edges(wave)
    flux, ivar = resample(lower, upper, raw.flux, raw.ivar, *arm_edges(arm))
    if not normalised_input:
        result = normalise(arm.wave, flux, ivar, options.continuum)
        if result is None:
            raise Unusable(
                contract.NO_GOOD_PIXELS,
                f"{int((ivar > 0).sum())} unmasked pixels on arm {arm.name}: too few to fit a continuum",
            )
        flux, ivar = result
    if not (ivar > 0).any():
        raise Unusable(contract.NO_GOOD_PIXELS, f"no unmasked pixel on arm {arm.name} after resampling")
    snr = meta.snr if meta.snr is not None else measured_snr(raw.flux, raw.ivar)
    return PreparedArm(
        path, arm.name, flux.astype(np.float32), ivar.astype(np.float32), snr, normalised_input, meta
    )


@dataclass
class StarResult:
    spectrum_id: str
    arms: dict[str, PreparedArm]  # the kept file per arm (empty when nothing is stored)
    quarantine: list[tuple[str, str]]  # (reason "code: detail", source path)

    @property
    def stored(self) -> bool:
        return bool(self.arms)


def assemble_star(
    star_id: str, files: list[tuple[str, bytes | Unusable]], setup: Setup, options: IngestOptions
) -> StarResult:
    """The arms of one star from its files: best S/N per arm, duplicates and missing arms quarantined."""
    quarantine: list[tuple[str, str]] = []
    by_arm: dict[str, list[PreparedArm]] = defaultdict(list)
    for path, data in files:
        try:
            if isinstance(data, Unusable):
                raise data
            prepared = prepare_file(path, data, setup, options)
        except Unusable as exc:
            quarantine.append((f"{exc.reason}: {exc.detail}", path))
            continue
        except Exception as exc:  # a bug or an astropy corner case must not end the run
            log.exception("unexpected error decoding %s", path)
            quarantine.append((f"{contract.DECODE_ERROR}: {type(exc).__name__}: {exc}", path))
            continue
        by_arm[prepared.arm].append(prepared)
    kept: dict[str, PreparedArm] = {}
    for arm in setup.arms:
        candidates = by_arm.get(arm.name, [])
        if not candidates:
            continue
        best = max(candidates, key=lambda p: p.snr if np.isfinite(p.snr) else -np.inf)
        kept[arm.name] = best
        for other in candidates:
            if other is not best:
                quarantine.append(
                    (
                        f"{contract.DUPLICATE}: a second {arm.name} spectrum of {star_id} "
                        f"(S/N {other.snr:.1f}); kept {best.path} (S/N {best.snr:.1f})",
                        other.path,
                    )
                )
    missing = [arm.name for arm in setup.arms if arm.name not in kept]
    if kept and missing and options.missing_arm == "quarantine":
        for prepared in kept.values():
            quarantine.append(
                (
                    f"{contract.MISSING_ARM}: {star_id} has no usable {'/'.join(missing)} spectrum, so its "
                    f"{prepared.arm} spectrum is not stored (--missing-arm quarantine)",
                    prepared.path,
                )
            )
        kept = {}
    return StarResult(star_id, kept, quarantine)


def star_table(stars: list[StarResult], setup: Setup) -> pa.Table:
    """Store rows (without ``input_sha256``) for stars with something to store; missing arms masked."""
    stars = [s for s in stars if s.stored]
    columns: dict[str, pa.Array] = {"spectrum_id": pa.array([s.spectrum_id for s in stars], pa.string())}
    for arm in setup.arms:
        flux = np.full((len(stars), arm.n_pixels), np.nan, dtype=np.float32)
        ivar = np.zeros((len(stars), arm.n_pixels), dtype=np.float32)
        for k, star in enumerate(stars):
            if arm.name in star.arms:
                flux[k] = star.arms[arm.name].flux
                ivar[k] = star.arms[arm.name].ivar
        columns[arm.flux_column] = fixed_size_list(flux, pa.float32())
        columns[arm.ivar_column] = fixed_size_list(ivar, pa.float32())
    # Position, name and S/N come from the first arm (in setup order) that the star has.
    first = [next(star.arms[a.name] for a in setup.arms if a.name in star.arms) for star in stars]
    columns["ra"] = pa.array([p.meta.ra for p in first], pa.float64())
    columns["dec"] = pa.array([p.meta.dec for p in first], pa.float64())
    columns["snr"] = pa.array([p.snr for p in first], pa.float32())
    columns["object"] = pa.array([p.meta.object for p in first], pa.string())
    columns[contract.SOURCE_FILES] = pa.array(
        [[s.arms[a.name].path for a in setup.arms if a.name in s.arms] for s in stars], pa.list_(pa.string())
    )
    return _finish_store_table(columns, setup)


def _finish_store_table(columns: dict[str, pa.Array], setup: Setup) -> pa.Table:
    """Add ``input_sha256`` (of the stored flux and ivar) and order the columns as the store schema."""
    schema = contract.store_schema(setup)
    n = len(columns["spectrum_id"])
    arrays = spectra_arrays(pa.table(columns), setup)
    columns[contract.INPUT_SHA256] = pa.array(spectrum_sha256(arrays, setup) if n else [], pa.string())
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def split_invalid(table: pa.Table, setup: Setup) -> tuple[pa.Table, list[int], np.ndarray]:
    """Rows of a store table that pass :func:`contract.validate`, the indices that do not, and reasons."""
    reasons = contract.validate(table, setup)
    good = np.array([r is None for r in reasons], dtype=bool)
    return table.filter(pa.array(good)), list(np.flatnonzero(~good)), reasons


# -- Parquet pass-through -------------------------------------------------------------------------


def pass_through(
    table: pa.Table, source: str, row_offset: int, duplicate_rows: list[int], setup: Setup
) -> tuple[pa.Table, pa.Table]:
    """Validated store rows and quarantine rows for one batch of a contract Parquet file.

    Other columns (labels, ...) are not carried. An input without ``ivar_<arm>`` gets ivar 1 at finite
    flux (its weights are unknown) and 0 elsewhere.
    """
    contract.check_table_columns(table.schema, setup, source=source)
    arrays = spectra_arrays(table, setup)
    known = np.zeros(table.num_rows, dtype=bool)
    known[list(duplicate_rows)] = True
    reasons = contract.validate(table, setup, arrays=arrays, known_duplicates=known)
    good = np.array([r is None for r in reasons], dtype=bool)
    bad = np.flatnonzero(~good)
    quarantine = contract.quarantine_table(
        table.column("spectrum_id").take(pa.array(bad, pa.int64())).to_pylist(),
        [f"{reasons[i]} (row {row_offset + i})" for i in bad],
        source,
    )
    kept = table.filter(pa.array(good))
    columns: dict[str, pa.Array] = {
        "spectrum_id": kept.column("spectrum_id").combine_chunks().cast(pa.string())
    }
    for arm in setup.arms:
        flux = arrays.flux[arm.name][good]
        ivar = arrays.ivar[arm.name]
        ivar = np.isfinite(flux).astype(np.float32) if ivar is None else ivar[good]
        columns[arm.flux_column] = fixed_size_list(flux, pa.float32())
        columns[arm.ivar_column] = fixed_size_list(ivar, pa.float32())
    for name, dtype in contract.OPTIONAL_COLUMNS.items():
        if name == "release":
            continue
        columns[name] = (
            kept.column(name).combine_chunks().cast(dtype)
            if name in kept.column_names
            else pa.nulls(kept.num_rows, dtype)
        )
    columns[contract.SOURCE_FILES] = pa.array([[source]] * kept.num_rows, pa.list_(pa.string()))
    return _finish_store_table(columns, setup), quarantine


# -- pass 1: scan ---------------------------------------------------------------------------------


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


# -- plan -----------------------------------------------------------------------------------------


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


# -- pass 2: ingest -------------------------------------------------------------------------------


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


def _write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
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
            _write_parquet(
                ctx.store_fs, join(ctx.staging_dir, part_name(ctx.run_id, task)), output.store_rows
            )
        if output.quarantine_rows.num_rows:
            _write_parquet(
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


# -- the job --------------------------------------------------------------------------------------


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


def _blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    return [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)] or [
        table
    ]


def _collect(dataset) -> pa.Table:
    tables = list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(tables) if tables else None


def run_ingest(
    location: str,
    store: str,
    setup: Setup,
    options: IngestOptions,
    *,
    force: bool = False,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> IngestReport:
    """Ingest the files at ``location`` into release ``options.release`` of the spectra store ``store``.

    Needs a running Ray (``ray.init()``); the CLI starts a local one when none is connected.
    """
    import ray.data

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    input_fs, files = list_inputs(location, store)
    fingerprint = input_fingerprint(files, setup, options)
    ds = Dataset.open(store)
    entry = ds.release_entry(options.release)
    if entry is not None and entry.get("input_fingerprint") == fingerprint and not force:
        return IngestReport(store, options.release, entry["run_id"], skipped=True)
    timings["list"] = time.perf_counter() - clock

    run_id = new_run_id()
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
            )
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
            staging_dir=join(ds.staging_dir(run_id), f"release={options.release}"),
            quarantine_dir=ds.quarantine_dir(options.release, run_id),
        )
        if plan.rejected.num_rows:
            _write_parquet(ds.fs, join(ctx.quarantine_dir, "part-scan.parquet"), plan.rejected)
        summary = (
            _collect(
                ray.data.from_arrow(plan.tasks).map_batches(
                    ingest_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"ctx": ctx}
                )
            )
            if plan.tasks
            else None
        )
        summary = summary if summary is not None else SUMMARY_SCHEMA.empty_table()
        timings["ingest"] = time.perf_counter() - clock

        clock = time.perf_counter()
        report, inputs = _account(files, scan, plan, summary, ctx, ds)
        _write_parquet(ds.fs, ds.inputs_table_path(options.release, run_id), inputs)
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
        lock.check()
        fault_point("ingest.publish", planned_fault(), release=options.release)
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
