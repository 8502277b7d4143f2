"""The label job's per-batch steps: plain functions over Arrow tables, with no Ray and no files.

A batch travels through three shapes:

1. *input rows*: a spectra table in the data contract (``pipeline.contract``) plus two columns the
   reader adds: ``_source`` (the input file) and ``_duplicate`` (the driver's pre-pass found an
   earlier row with the same ``spectrum_id`` elsewhere in the input);
2. *prepared rows* (:func:`prepare`): one row per input row with the pass-through columns, the
   validation verdict (``_reason``/``_detail``, null for a good row), ``input_sha256`` and the
   network's inputs (``_flux``: masked pixels at 1.0, ``_mask``: True = good pixel);
3. *output rows* (:func:`output_table`): the union of catalogue rows (``_kind`` = LABELLED),
   quarantine rows (QUARANTINED) and one BATCH_SUMMARY row per batch carrying the batch's population
   saliency sums and which actor made it, all in one schema (:func:`output_schema`) so that a single
   Ray Data stream brings everything to the driver and every row is counted once.

Catalogue column names and types come from ``pipeline.catalogue.layout``; flag bits from
``pipeline.flags``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speclabel.core.arrays import fixed_size_list, model_inputs, spectra_arrays
from speclabel.core.contract import MODEL_ERROR, QUARANTINE_SCHEMA, check_table_columns, reason_code, validate
from speclabel.core.errors import ConfigError
from speclabel.core.fingerprints import spectrum_sha256
from speclabel.core.flags import Flag
from speclabel.core.setups import Setup

from ..catalogue.layout import COLUMN_TYPES, column_type, saliency_column

if TYPE_CHECKING:  # torch stays out of the read/prepare tasks' processes: they never need it
    from speclabel.model.ensemble import Prediction
    from speclabel.model.forward import ForwardModel
    from speclabel.model.saliency import SaliencyAccumulator

# Columns the reader adds to input rows.
SOURCE = "_source"
DUPLICATE = "_duplicate"
# Columns of prepared rows (besides the pass-through and catalogue ones).
REASON = "_reason"
DETAIL = "_detail"
FLUX = "_flux"
MASK = "_mask"
IVAR = "_ivar"  # only when the model has a forward model: chi^2 needs the noise
MASKED_FRACTION = "_masked_fraction"
FLAG_SNR = "_flag_snr"  # the S/N the low_snr flag is decided on (input snr, else estimated)
# Columns of output rows.
KIND = "_kind"
LABELLED, QUARANTINED, BATCH_SUMMARY = 0, 1, 2
ACTOR = "_actor"  # JSON: which actor (node, device, GPU ids, precision) made the batch
BATCH_ROWS = "_batch_rows"
POP_SUM = "_pop_sum"  # population saliency sums of the batch, [labels x pixels] flattened
POP_SUM_ABS = "_pop_sum_abs"
POP_COUNT = "_pop_count"
MAP_PREFIX = "saliency_"  # full saliency map columns: saliency_<label>, list<float32> over the grid

PASS_THROUGH = ("ra", "dec", "snr", "object")
CHI2 = "chi2"

# Internal precision of the Ambrosch et al. (2023) ensemble at high S/N; the default high_std
# thresholds are five times these.
PAPER_PRECISION = {"teff": 24.0, "logg": 0.03, "feh": 0.02, "mgfe": 0.02, "alfe": 0.03}


@dataclass(frozen=True)
class FlagThresholds:
    """When a label row gets a quality flag (see ``pipeline/flags.py``); stored in each run's manifest."""

    low_snr: float = 20.0  # S/N below this: LOW_SNR
    high_std: dict[str, float] = field(default_factory=lambda: {k: 5 * v for k, v in PAPER_PRECISION.items()})
    masked_fraction: float = 0.2  # more masked pixels than this fraction: HEAVILY_MASKED

    def __post_init__(self) -> None:
        if not self.low_snr >= 0 or not 0 <= self.masked_fraction <= 1:
            raise ConfigError(f"flag thresholds need low_snr >= 0 and 0 <= masked_fraction <= 1: {self}")
        bad = {k: v for k, v in self.high_std.items() if not v > 0}
        if bad:
            raise ConfigError(f"high_std thresholds must be positive, got {bad}")

    def to_dict(self) -> dict:
        return asdict(self)


# -- 1 -> 2: validation and model inputs -----------------------------------------------------------


def prepare(table: pa.Table, setup: Setup, with_ivar: bool = False) -> pa.Table:
    """Validate input rows and compute what the actors need (see the module docstring).

    Rows that fail validation keep their row (flux all 1.0, mask all False) so that the stream
    carries them to quarantine; nothing is dropped here. ``with_ivar``: also ``_ivar`` (0 on masked
    pixels), for the forward model's chi^2.
    """
    check_table_columns(table.schema, setup)
    n = table.num_rows
    arrays = spectra_arrays(table, setup)
    duplicates = (
        table.column(DUPLICATE).fill_null(False).to_numpy(zero_copy_only=False)
        if DUPLICATE in table.column_names
        else None
    )
    reasons = validate(table, setup, arrays=arrays, known_duplicates=duplicates)
    flux, good = model_inputs(arrays, setup)
    bad_row = reasons != None  # noqa: E711 (elementwise)
    flux[bad_row] = 1.0
    good[bad_row] = False
    _, ivar = arrays.concatenated(setup)

    columns: dict[str, pa.Array] = {
        "spectrum_id": table.column("spectrum_id").combine_chunks().cast(pa.string())
    }
    for name in PASS_THROUGH:
        dtype = COLUMN_TYPES[name]
        columns[name] = (
            table.column(name).combine_chunks().cast(dtype)
            if name in table.column_names
            else pa.nulls(n, dtype)
        )
    columns[SOURCE] = (
        table.column(SOURCE).combine_chunks().cast(pa.string())
        if SOURCE in table.column_names
        else pa.nulls(n, pa.string())
    )
    columns[REASON] = pa.array([None if r is None else reason_code(r) for r in reasons], pa.string())
    columns[DETAIL] = pa.array(list(reasons), pa.string())
    columns["input_sha256"] = pa.array(spectrum_sha256(arrays, setup), pa.string())
    columns[MASKED_FRACTION] = pa.array(1.0 - good.mean(axis=1, dtype=np.float64), pa.float32())
    has_ivar = all(arrays.ivar[arm.name] is not None for arm in setup.arms)
    columns[FLAG_SNR] = pa.array(
        flag_snr(_float_column(columns["snr"]), flux, ivar if has_ivar else None, good), pa.float32()
    )
    columns[FLUX] = fixed_size_list(flux.astype(np.float32, copy=False))
    columns[MASK] = fixed_size_list(good)
    if with_ivar:
        columns[IVAR] = fixed_size_list(np.where(good, ivar, 0.0).astype(np.float32))
    return pa.table(columns)


def flag_snr(snr: np.ndarray, flux: np.ndarray, ivar: np.ndarray | None, good: np.ndarray) -> np.ndarray:
    """The S/N the low_snr flag uses: the input ``snr`` where given, else the median of
    flux * sqrt(ivar) over the good pixels (NaN without ivar or good pixels)."""
    out = np.asarray(snr, dtype=np.float64).copy()
    missing = ~np.isfinite(out)
    if ivar is None or not missing.any():
        return out
    with np.errstate(invalid="ignore"):
        per_pixel = np.where(good[missing], flux[missing] * np.sqrt(np.clip(ivar[missing], 0, None)), np.nan)
    usable = good[missing].any(axis=1)
    estimate = np.full(per_pixel.shape[0], np.nan)
    if usable.any():
        estimate[usable] = np.nanmedian(per_pixel[usable], axis=1)
    out[missing] = estimate
    return out


def model_batch(prepared: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the good rows and their ``(flux, mask)`` matrices for ``Ensemble.predict``."""
    rows = np.flatnonzero(np.asarray(prepared.column(REASON).is_null()))
    flux = _matrix(prepared.column(FLUX), np.float32)[rows]
    mask = _matrix(prepared.column(MASK), np.bool_)[rows]
    return rows, flux, mask


def forward_checks(
    forward: ForwardModel,
    flux: np.ndarray,
    ivar: np.ndarray,
    mask: np.ndarray,
    labels: np.ndarray,
    label_error: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The forward model's reduced chi^2 (``"total"`` and per arm) of each row at its ``labels``,
    their ``label_error`` propagated into each pixel's variance (``ForwardModel.chi2``)."""
    return forward.chi2(flux, ivar, mask, labels, label_error)


def ivar_batch(prepared: pa.Table, rows: np.ndarray) -> np.ndarray:
    """``_ivar`` of the rows ``rows`` (as :func:`model_batch` picks them) as a float32 matrix."""
    return _matrix(prepared.column(IVAR), np.float32)[rows]


# -- 2 -> 3: catalogue rows, quarantine rows, the batch summary -------------------------------------


@dataclass(frozen=True)
class OutputSpec:
    """What a run writes, which fixes the output schema: the same in every actor of a run."""

    label_names: tuple[str, ...]
    saliency_groups: tuple[str, ...]
    saliency: str | None  # None, "summary" or "full"
    members: bool
    n_pixels: int
    # The setup's arms: the forward model's chi2 columns (chi2, chi2_<arm>), null for a model
    # without a forward model; empty: no such columns.
    arm_names: tuple[str, ...] = ()
    # The calibrated total errors (<label>_err), null for a model without a calibration.
    error_columns: bool = False
    # The labels the run refines (model/refine.py): their network values as <label>_cnn.
    refined_labels: tuple[str, ...] = ()

    @property
    def err_columns(self) -> list[str]:
        return [f"{label}_err" for label in self.label_names] if self.error_columns else []

    @property
    def cnn_columns(self) -> list[str]:
        return [f"{label}_cnn" for label in self.refined_labels]

    @property
    def chi2_columns(self) -> list[str]:
        return [CHI2, *(f"{CHI2}_{arm}" for arm in self.arm_names)] if self.arm_names else []

    @property
    def summary_columns(self) -> list[str]:
        if self.saliency is None:
            return []
        return [
            saliency_column(label, group)
            for label in self.label_names
            for group in (*self.saliency_groups, "peak_wave")
        ]

    @property
    def map_columns(self) -> list[str]:
        return [f"{MAP_PREFIX}{label}" for label in self.label_names] if self.saliency == "full" else []


def catalogue_fields(spec: OutputSpec) -> list[pa.Field]:
    """The catalogue's columns for a run, in order (``healpix`` is added by the writer)."""
    names = ["spectrum_id", *PASS_THROUGH]
    for label in spec.label_names:
        names += [label, f"{label}_std"] + ([f"{label}_members"] if spec.members else [])
    names += ["input_sha256", "flags", *spec.summary_columns, "model_id", "run_id", "processed_at"]
    names += spec.err_columns
    names += spec.chi2_columns
    names += ["ood_score", "extrapolated_labels"]
    names += spec.cnn_columns
    return [pa.field(name, column_type(name)) for name in names]


def output_schema(spec: OutputSpec) -> pa.Schema:
    fields = [pa.field(KIND, pa.int8()), pa.field(SOURCE, pa.string()), *catalogue_fields(spec)]
    fields += [pa.field(REASON, pa.string()), pa.field(DETAIL, pa.string())]
    fields += [pa.field(name, pa.list_(pa.float32())) for name in spec.map_columns]
    fields += [
        pa.field(ACTOR, pa.string()),
        pa.field(BATCH_ROWS, pa.int64()),
        pa.field(POP_SUM, pa.list_(pa.float64())),
        pa.field(POP_SUM_ABS, pa.list_(pa.float64())),
        pa.field(POP_COUNT, pa.int64()),
    ]
    return pa.schema(fields)


def quality_flags(
    prediction: Prediction,
    label_names: tuple[str, ...],
    snr: np.ndarray,
    masked: np.ndarray,
    t: FlagThresholds,
    anomalous: np.ndarray | None = None,
) -> np.ndarray:
    """The ``flags`` bits of each row (int32), see ``core/flags.py``: the model's own (extrapolated,
    out of distribution) and the job's. ``anomalous``: the rows whose chi^2 exceeds the forward
    model's threshold."""
    flags = prediction.model_flags()
    with np.errstate(invalid="ignore"):
        flags[np.asarray(snr) < t.low_snr] |= Flag.LOW_SNR
        for k, name in enumerate(label_names):
            if name in t.high_std:
                flags[prediction.std[:, k] > t.high_std[name]] |= Flag.HIGH_STD
    flags[np.asarray(masked) > t.masked_fraction] |= Flag.HEAVILY_MASKED
    if anomalous is not None:
        flags[np.asarray(anomalous, dtype=bool)] |= Flag.ANOMALOUS_SPECTRUM
    return flags


def label_rows(
    good: pa.Table,
    prediction: Prediction,
    spec: OutputSpec,
    thresholds: FlagThresholds,
    *,
    model_id: str,
    run_id: str,
    processed_at: dt.datetime,
    map_rows: np.ndarray | None = None,
    chi2: dict[str, np.ndarray] | None = None,
    anomalous: np.ndarray | None = None,
    err: np.ndarray | None = None,
) -> pa.Table:
    """Catalogue rows (plus ``_source`` and the full-map columns) for the prepared ``good`` rows.

    ``map_rows``: boolean mask of the rows whose full saliency maps are kept (``spec.saliency ==
    "full"``); other rows get null maps. ``chi2``: :func:`forward_checks` of the rows (None: the
    model has no forward model, the chi2 columns are null); ``anomalous``: rows to flag. ``err``:
    the calibrated total errors ``[N, L]`` (``model.calibration.row_errors``; None: null columns).
    """
    n = good.num_rows
    columns: dict[str, pa.Array] = {"spectrum_id": good.column("spectrum_id")}
    for name in PASS_THROUGH:
        columns[name] = good.column(name)
    for k, label in enumerate(spec.label_names):
        columns[label] = pa.array(prediction.mean[:, k].astype(np.float32))
        columns[f"{label}_std"] = pa.array(prediction.std[:, k].astype(np.float32))
        if spec.members:
            members = np.ascontiguousarray(prediction.members[:, :, k].T, dtype=np.float32)  # [B, M]
            columns[f"{label}_members"] = pa.ListArray.from_arrays(
                np.arange(0, members.size + 1, members.shape[1], dtype=np.int32), pa.array(members.ravel())
            )
    columns["input_sha256"] = good.column("input_sha256")
    columns["flags"] = pa.array(
        quality_flags(
            prediction,
            spec.label_names,
            _float_column(good.column(FLAG_SNR)),
            _float_column(good.column(MASKED_FRACTION)),
            thresholds,
            anomalous,
        )
    )
    if spec.saliency is not None:
        summary = prediction.saliency
        for k, label in enumerate(spec.label_names):
            for g, group in enumerate(summary.groups):
                columns[saliency_column(label, group)] = pa.array(summary.shares[:, k, g].astype(np.float32))
            columns[saliency_column(label, "peak_wave")] = pa.array(
                summary.peak_wave[:, k].astype(np.float32)
            )
    columns["model_id"] = pa.array([model_id] * n, pa.string())
    columns["run_id"] = pa.array([run_id] * n, pa.string())
    columns["processed_at"] = pa.array([processed_at] * n, COLUMN_TYPES["processed_at"])
    if err is not None:
        for k, name in enumerate(spec.err_columns):
            columns[name] = _float32_nullable(err[:, k])
    if chi2 is not None and spec.arm_names:
        columns[CHI2] = _float32_nullable(chi2["total"])
        for arm in spec.arm_names:
            columns[f"{CHI2}_{arm}"] = _float32_nullable(chi2[arm])
    columns["ood_score"] = (
        pa.nulls(n, pa.float32())
        if prediction.ood_score is None
        else pa.array(prediction.ood_score.astype(np.float32), from_pandas=True)  # NaN: null
    )
    columns["extrapolated_labels"] = pa.array(
        extrapolated_labels(prediction.outside_training_range, spec.label_names, n), pa.string()
    )
    for label, name in zip(spec.refined_labels, spec.cnn_columns, strict=True):
        network = prediction.network_mean  # None: the rows were not refined
        columns[name] = (
            pa.nulls(n, pa.float32())
            if network is None
            else pa.array(network[:, spec.label_names.index(label)].astype(np.float32))
        )
    columns[SOURCE] = good.column(SOURCE)
    if spec.saliency == "full":
        keep = np.zeros(n, dtype=bool) if map_rows is None else np.asarray(map_rows, dtype=bool)
        maps = prediction.saliency_maps
        for k, label in enumerate(spec.label_names):
            columns[f"{MAP_PREFIX}{label}"] = _list_rows(maps[:, k, :] if maps is not None else None, keep)
    columns[KIND] = pa.array(np.full(n, LABELLED, dtype=np.int8))
    return pa.table(columns)


def extrapolated_labels(outside: np.ndarray | None, label_names: tuple[str, ...], n: int) -> list[str | None]:
    """Per row, the labels outside the training range, comma-separated in model order ('' when none,
    null when unknown): a plain string that --where, SQL, CSV and FITS all take as it is."""
    if outside is None:
        return [None] * n
    names = np.array(label_names, dtype=object)
    return [",".join(names[row]) for row in np.asarray(outside, dtype=bool)]


def quarantine_rows(bad: pa.Table, reasons: list[str] | None = None) -> pa.Table:
    """Output rows for prepared rows that failed (their ``_reason`` / ``_detail``, or ``reasons``:
    ``"code: detail"`` strings that override them, e.g. ``model_error``)."""
    n = bad.num_rows
    if reasons is None:
        code, detail = bad.column(REASON), bad.column(DETAIL)
    else:
        code = pa.array([reason_code(r) for r in reasons], pa.string())
        detail = pa.array(reasons, pa.string())
    return pa.table(
        {
            KIND: pa.array(np.full(n, QUARANTINED, dtype=np.int8)),
            SOURCE: bad.column(SOURCE),
            "spectrum_id": bad.column("spectrum_id"),
            REASON: code,
            DETAIL: detail,
        }
    )


def nonfinite_label_reasons(prediction: Prediction, label_names: tuple[str, ...]) -> list[str | None]:
    """``model_error`` reasons for rows whose ensemble labels are not all finite."""
    out: list[str | None] = []
    for row in prediction.mean:
        bad = [name for name, value in zip(label_names, row, strict=True) if not np.isfinite(value)]
        out.append(f"{MODEL_ERROR}: the network gave non-finite {', '.join(bad)}" if bad else None)
    return out


def summary_row(n_rows: int, actor: dict, accumulator: SaliencyAccumulator | None) -> pa.Table:
    """The BATCH_SUMMARY row of one batch: rows seen, the actor's identity, population sums."""
    columns = {
        KIND: pa.array([BATCH_SUMMARY], pa.int8()),
        ACTOR: pa.array([json.dumps(actor, sort_keys=True)], pa.string()),
        BATCH_ROWS: pa.array([n_rows], pa.int64()),
    }
    if accumulator is not None:
        columns[POP_SUM] = pa.array([accumulator.sum.ravel()], pa.list_(pa.float64()))
        columns[POP_SUM_ABS] = pa.array([accumulator.sum_abs.ravel()], pa.list_(pa.float64()))
        columns[POP_COUNT] = pa.array([accumulator.count], pa.int64())
    return pa.table(columns)


def output_table(parts: list[pa.Table], schema: pa.Schema) -> pa.Table:
    """Tables with some of ``schema``'s columns as one table of exactly ``schema`` (nulls elsewhere)."""
    conformed = []
    for part in parts:
        if part.num_rows == 0:
            continue
        columns = [
            part.column(f.name).cast(f.type)
            if f.name in part.column_names
            else pa.nulls(part.num_rows, f.type)
            for f in schema
        ]
        conformed.append(pa.Table.from_arrays(columns, schema=schema))
    return pa.concat_tables(conformed) if conformed else schema.empty_table()


# -- the driver's side: splitting the stream --------------------------------------------------------


def split_output(batch: pa.Table, spec: OutputSpec) -> tuple[pa.Table, pa.Table, pa.Table | None, pa.Table]:
    """(catalogue rows, quarantine rows in ``QUARANTINE_SCHEMA``, full maps or None, summary rows)."""
    kind = batch.column(KIND)
    labelled = batch.filter(pc.equal(kind, LABELLED))
    quarantined = batch.filter(pc.equal(kind, QUARANTINED))
    summaries = batch.filter(pc.equal(kind, BATCH_SUMMARY))
    catalogue = labelled.select([f.name for f in catalogue_fields(spec)])
    quarantine = pa.Table.from_arrays(
        [
            quarantined.column("spectrum_id"),
            quarantined.column(REASON),
            quarantined.column(DETAIL),
            quarantined.column(SOURCE),
        ],
        schema=QUARANTINE_SCHEMA,
    )
    maps = None
    if spec.map_columns:
        selected = labelled.filter(pc.is_valid(labelled.column(spec.map_columns[0])))
        maps = selected.select(["spectrum_id", *spec.map_columns])
    return catalogue, quarantine, maps, summaries


def summary_accumulator(summaries: pa.Table, n_labels: int, n_pixels: int) -> SaliencyAccumulator:
    """The sum of the population saliency sums carried by BATCH_SUMMARY rows (exact: float64 sums)."""
    from speclabel.model.saliency import SaliencyAccumulator

    total = SaliencyAccumulator.empty(n_labels, n_pixels)
    sums = summaries.column(POP_SUM).combine_chunks()
    sums_abs = summaries.column(POP_SUM_ABS).combine_chunks()
    counts = summaries.column(POP_COUNT).fill_null(0).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(np.asarray(sums.is_valid())):
        total.sum += sums[i].values.to_numpy().reshape(n_labels, n_pixels)
        total.sum_abs += sums_abs[i].values.to_numpy().reshape(n_labels, n_pixels)
        total.count += int(counts[i])
    return total


# -- helpers ----------------------------------------------------------------------------------------


def _matrix(column: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    size = arr.type.list_size
    values = arr.values.slice(arr.offset * size, len(arr) * size).to_numpy(zero_copy_only=False)
    return values.reshape(len(arr), size).astype(dtype, copy=False)


def _float32_nullable(values: np.ndarray) -> pa.Array:
    """float32 with null where not finite (a row or arm without good pixels has no chi^2)."""
    values = np.asarray(values, dtype=np.float64)
    return pa.array(values.astype(np.float32), mask=~np.isfinite(values))


def _float_column(column) -> np.ndarray:
    return column.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)


def _list_rows(matrix: np.ndarray | None, keep: np.ndarray) -> pa.ListArray:
    """Rows of ``matrix`` where ``keep`` as list<float32>, null elsewhere."""
    n = keep.shape[0]
    lengths = np.zeros(n, dtype=np.int32)
    values = np.empty(0, np.float32)
    if matrix is not None and keep.any():
        lengths[keep] = matrix.shape[1]
        values = np.ascontiguousarray(matrix[keep], dtype=np.float32).ravel()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=pa.array(~keep))
