"""The spectra data contract: columns, Arrow schemas, row validation and content hashes.

A *spectra table* has one row per spectrum: ``spectrum_id`` (unique string), ``flux_<arm>`` for each
arm of the setup (list or fixed_size_list of float32/float64 of the arm's length), optional
``ivar_<arm>`` (inverse variance, 0 = masked pixel) and optional ``ra``, ``dec``, ``snr``, ``object``,
``release``. A *labelled* table adds label columns (by default the paper's five; a model may name
others) and optional ``<label>_err``. A labelled row may lack some labels (null or NaN: that label is
not trained on it); a row with none of them is quarantined (``missing_label``).

Validation never raises for a bad row: it returns one reason per row (``None`` = good) so that jobs
can route bad rows to quarantine and account for every input row. Problems with the table as a whole
(a missing flux column, no ``spectrum_id``) raise :class:`~.errors.InputError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .arrays import SpectraArrays, spectra_arrays
from .errors import InputError
from .labels import LABEL_NAMES, label_definition
from .setups import Setup

OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "ra": pa.float64(),
    "dec": pa.float64(),
    "snr": pa.float32(),
    "object": pa.string(),
    "release": pa.string(),
}

# Quarantine reason codes (stable strings: scripts filter on them).
MISSING_ID = "missing_id"
DUPLICATE_ID = "duplicate_id"
MISSING_ARM = "missing_arm"
WRONG_LENGTH = "wrong_length"
NONFINITE_FLUX = "nonfinite_flux"
NONFINITE_IVAR = "nonfinite_ivar"
NEGATIVE_IVAR = "negative_ivar"
MISSING_LABEL = "missing_label"
LABEL_OUT_OF_RANGE = "label_out_of_range"
NOT_SELECTED = "not_selected"  # a training row whose star the [selection] cut of model.toml removed
# A validated row whose labels the model could not compute (e.g. non-finite network output).
MODEL_ERROR = "model_error"

# Quarantine reason codes for whole input files (speclabel ingest); MISSING_ARM is shared with rows.
CORRUPT_FILE = "corrupt_file"  # not readable as FITS/Parquet, or truncated
DECODE_ERROR = "decode_error"  # readable, but decoding failed unexpectedly (detail has the error)
UNKNOWN_FORMAT = "unknown_format"  # FITS, but no registered layout matches
MISSING_WCS = "missing_wcs"  # no usable wavelength solution
WRONG_UNITS = "wrong_units"  # the wavelength unit is not a length
BAD_WAVELENGTHS = "bad_wavelengths"  # wavelengths not monotonic, or not finite
MISSING_ERROR = "missing_error"  # no error, variance or ivar to weight the pixels with
WRONG_SETUP = "wrong_setup"  # the header names a setup this setup has no arm for
WRONG_RESOLUTION = "wrong_resolution"  # declared resolving power far from the arm's
NO_OVERLAP = "no_overlap"  # wavelengths miss every arm (or cover too little of one)
NO_GOOD_PIXELS = "no_good_pixels"  # nothing unmasked left on the arm's grid
DUPLICATE = "duplicate"  # another file of the same star and arm has a higher S/N
WRONG_SCHEMA = "wrong_schema"  # a Parquet file that does not follow the spectra contract

QUARANTINE_SCHEMA = pa.schema(
    [
        ("spectrum_id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("source", pa.string()),
    ]
)


def spectra_schema(setup: Setup, *, labelled: bool = False, with_errors: bool = False) -> pa.Schema:
    """The schema speclabel writes for spectra tables (fixed-size float32 lists per arm)."""
    fields = [pa.field("spectrum_id", pa.string(), nullable=False)]
    for arm in setup.arms:
        fields.append(pa.field(arm.flux_column, pa.list_(pa.float32(), arm.n_pixels)))
        fields.append(pa.field(arm.ivar_column, pa.list_(pa.float32(), arm.n_pixels)))
    fields += [pa.field(name, dtype) for name, dtype in OPTIONAL_COLUMNS.items()]
    if labelled:
        fields += [pa.field(name, pa.float32()) for name in LABEL_NAMES]
        if with_errors:
            fields += [pa.field(f"{name}_err", pa.float32()) for name in LABEL_NAMES]
    return pa.schema(fields, metadata={"speclabel.setup": setup.name})


# A simulated survey's truth may say which spectra were given a defect on purpose
# (`speclabel simulate --defects`): the defect's kind, null for a clean spectrum. `speclabel
# evaluate` reports how many of each kind the screening flagged.
DEFECT_COLUMN = "defect"

# Columns the spectra store adds to the contract. The store's files carry no ``release`` column: the
# release is the hive partition (``release=<R>/``), and a column of the same name inside the files
# would clash with it when the store is read as a dataset.
INPUT_SHA256 = "input_sha256"
SOURCE_FILES = "source_files"


def store_schema(setup: Setup) -> pa.Schema:
    """The schema of the spectra store's files: the contract plus content hash and source files."""
    base = spectra_schema(setup)
    fields = [f for f in base if f.name != "release"]
    fields += [
        pa.field(INPUT_SHA256, pa.string(), nullable=False),
        pa.field(SOURCE_FILES, pa.list_(pa.string())),
    ]
    return pa.schema(fields, metadata=base.metadata)


def required_columns(
    setup: Setup, *, labelled: bool = False, label_names: Sequence[str] = LABEL_NAMES
) -> list[str]:
    cols = ["spectrum_id", *(arm.flux_column for arm in setup.arms)]
    return cols + list(label_names) if labelled else cols


def check_table_columns(
    schema: pa.Schema,
    setup: Setup,
    *,
    labelled: bool = False,
    source: str = "",
    label_names: Sequence[str] = LABEL_NAMES,
) -> None:
    """Raise :class:`InputError` naming what is missing when a table cannot follow the contract."""
    where = f" in {source}" if source else ""
    required = required_columns(setup, labelled=labelled, label_names=label_names)
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise InputError(
            f"spectra table{where} lacks required column(s) {missing} for setup {setup.name!r} "
            f"(it has {schema.names})"
        )
    for arm in setup.arms:
        for col in (arm.flux_column, arm.ivar_column):
            if col not in schema.names:
                continue
            dtype = schema.field(col).type
            if not (
                pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)
            ):
                raise InputError(f"column {col}{where} must be a list of floats, not {dtype}")
            if not pa.types.is_floating(dtype.value_type):
                raise InputError(
                    f"column {col}{where} must hold float32 or float64 values, not {dtype.value_type}"
                )
    declared = (schema.metadata or {}).get(b"speclabel.setup")
    if declared is not None and declared.decode() != setup.name:
        raise InputError(
            f"spectra table{where} declares setup {declared.decode()!r} but the job uses {setup.name!r}: "
            "the wavelength grids differ; ingest the spectra for this setup first"
        )


def validate(
    table: pa.Table,
    setup: Setup,
    *,
    labelled: bool = False,
    arrays: SpectraArrays | None = None,
    known_duplicates: np.ndarray | None = None,
    label_names: Sequence[str] = LABEL_NAMES,
) -> np.ndarray:
    """One reason per row (``"code: detail"``), or ``None`` for a good row.

    The first problem found is reported. Duplicates: later rows with an id already seen in this
    table are duplicates; ``known_duplicates`` (a boolean mask) marks rows that a job found to be
    duplicates of rows in other batches.
    """
    check_table_columns(table.schema, setup, labelled=labelled, label_names=label_names)
    arrays = arrays if arrays is not None else spectra_arrays(table, setup)
    n = table.num_rows
    reasons = np.full(n, None, dtype=object)

    def flag(mask: np.ndarray, message) -> None:
        for i in np.flatnonzero(mask & (reasons == None)):  # noqa: E711 (elementwise)
            reasons[i] = message(i) if callable(message) else message

    ids = table.column("spectrum_id").combine_chunks()
    id_null = np.asarray(ids.is_null()) | (np.asarray(pc.fill_null(pc.utf8_length(ids), 0)) == 0)
    flag(id_null, f"{MISSING_ID}: spectrum_id is null or empty")
    id_values = ids.to_pylist()
    seen: set[str] = set()
    dup = np.zeros(n, dtype=bool)
    for i, sid in enumerate(id_values):
        if sid is None:
            continue
        if sid in seen:
            dup[i] = True
        seen.add(sid)
    if known_duplicates is not None:
        dup |= known_duplicates
    flag(dup, lambda i: f"{DUPLICATE_ID}: spectrum_id {id_values[i]!r} occurs more than once in the input")

    for arm in setup.arms:
        status = arrays.status[arm.name]
        flag(status == 1, f"{MISSING_ARM}: {arm.flux_column} is null")
        lengths = None
        if (status == 2).any():
            dtype = table.schema.field(arm.flux_column).type
            lengths = (
                np.full(n, dtype.list_size)
                if pa.types.is_fixed_size_list(dtype)
                else pc.list_value_length(table.column(arm.flux_column).combine_chunks()).to_numpy(
                    zero_copy_only=False
                )
            )
        flag(
            status == 2,
            lambda i, arm=arm, lengths=lengths: (
                f"{WRONG_LENGTH}: {arm.flux_column} has {lengths[i]} values, "
                f"the {setup.name} grid of arm {arm.name} has {arm.n_pixels}"
            ),
        )
        ivar = arrays.ivar[arm.name]
        if ivar is not None:
            ivar_status = arrays.ivar_status[arm.name]
            flag(
                ivar_status == 2,
                f"{WRONG_LENGTH}: {arm.ivar_column} does not match the length of {arm.flux_column}",
            )
            with np.errstate(invalid="ignore"):
                flag(
                    (ivar_status == 0) & ~np.isfinite(ivar).all(axis=1),
                    f"{NONFINITE_IVAR}: {arm.ivar_column}",
                )
                flag((ivar_status == 0) & (ivar < 0).any(axis=1), f"{NEGATIVE_IVAR}: {arm.ivar_column} < 0")
            # Non-finite flux is allowed where the pixel is masked (ivar == 0), as in survey products.
            used = ivar != 0
        else:
            used = np.ones(arrays.flux[arm.name].shape, dtype=bool)
        bad_flux = (~np.isfinite(arrays.flux[arm.name]) & used).any(axis=1) & (status == 0)
        flag(bad_flux, f"{NONFINITE_FLUX}: {arm.flux_column} has NaN or inf at unmasked pixels")

    if labelled:
        present = np.zeros(n, dtype=bool)
        for name in label_names:
            values = table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()
            present |= np.isfinite(values)
            lo, hi = label_definition(name).physical_range
            with np.errstate(invalid="ignore"):
                outside = (values < lo) | (values > hi)
            flag(
                outside,
                lambda i, name=name, values=values, lo=lo, hi=hi: (
                    f"{LABEL_OUT_OF_RANGE}: {name} = {values[i]:g} outside [{lo:g}, {hi:g}]"
                ),
            )
        # A row lacking some labels still trains the others; one with none has nothing to teach.
        flag(~present, f"{MISSING_LABEL}: none of the labels {', '.join(label_names)} is present")
    return reasons


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


def quarantine_table(spectrum_ids, reasons, source: str | list[str]) -> pa.Table:
    """Quarantine rows for the given ids and ``"code: detail"`` reasons."""
    reasons = list(reasons)
    sources = source if isinstance(source, list) else [source] * len(reasons)
    return pa.table(
        {
            "spectrum_id": pa.array(list(spectrum_ids), pa.string()),
            "reason": pa.array([reason_code(r) for r in reasons], pa.string()),
            "detail": pa.array(reasons, pa.string()),
            "source": pa.array(sources, pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )
