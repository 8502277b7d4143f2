"""The labels a model trains on: which labels, from which columns, for which stars.

``[labels]`` in model.toml maps label names (in network output order) to expressions over columns,
with an optional error column (``<label>_err``, used by inverse-variance weighting), unit and
description; ``[selection] where`` cuts stars before training. Both use the ``--where`` language of
``speclabel query`` (:mod:`speclabel.pipeline.catalogue.expr`: parsed into Arrow compute expressions,
never evaluated as Python), which already has arithmetic; a second engine (numexpr, DuckDB) would
parse the same text differently from the queries run on the catalogue later.

The columns come from a separate label catalogue (``--label-catalogue FILE.{fits,parquet,csv}``, rows
keyed by ``--id-column``, matched to the spectra's ``spectrum_id``) or, without one, from the training
table's own scalar columns. :class:`TrainingLabels` is the result: one row per selected star with its
label and error columns, and the accounting of every catalogue row (cut, no id, duplicated id, kept),
which the train job completes with the spectra (:meth:`TrainingLabels.accounting`). A spectrum
without a catalogue row, or whose star a cut removed, is quarantined with that reason.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from speclabel.core.contract import MISSING_LABEL, NOT_SELECTED, reason_code
from speclabel.core.errors import ConfigError, InputError
from speclabel.core.labels import LABEL_NAMES, Label, label_definition
from speclabel.core.storage import filesystem_and_path

from .catalogue.expr import QueryError, parse_value, parse_where, split_conjunction, unknown_column

CATALOGUE_FORMATS = {".fits": "fits", ".fit": "fits", ".fts": "fits", ".parquet": "parquet", ".csv": "csv"}
CATALOGUE_FORMATS |= {".fits.gz": "fits", ".pq": "parquet", ".parq": "parquet", ".csv.gz": "csv"}
SPECTRUM_ID = "spectrum_id"
_LABEL_KEYS = {"expr", "error", "unit", "description"}


@dataclass(frozen=True)
class LabelSpec:
    """One label of ``[labels]``: ``name = { expr = "MG1 - FEH - 7.53", error = "E_MG1", unit = "dex" }``."""

    name: str
    expr: str = ""  # default: the column of the label's name
    error: str | None = None  # an expression too; usually a column
    unit: str | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        label_definition(self.name)  # refuses a name that cannot be a column
        if not self.expr:
            object.__setattr__(self, "expr", self.name)

    @property
    def definition(self) -> Label:
        return label_definition(self.name, self.unit, self.description)

    def to_dict(self) -> dict:
        out = {"name": self.name, "expr": self.expr}
        return out | {k: v for k in ("error", "unit", "description") if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class LabelMapping:
    """The labels to train (in output order) and the selection cut before training."""

    labels: tuple[LabelSpec, ...] = field(default_factory=lambda: tuple(LabelSpec(n) for n in LABEL_NAMES))
    where: str | None = None

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.labels]
        if not names:
            raise ConfigError("[labels] names no label")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"label(s) {repeated} named more than once")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.labels)

    @property
    def definitions(self) -> tuple[Label, ...]:
        return tuple(spec.definition for spec in self.labels)

    @property
    def plain(self) -> bool:
        """Same-named columns, no error mapping beyond ``<label>_err``, no cut: the table as it is."""
        return self.where is None and all(s.expr == s.name and s.error is None for s in self.labels)

    def choose(self, names: Sequence[str]) -> LabelMapping:
        """``--labels a,b``: those labels in that order, as mapped here, else from same-named columns."""
        known = {spec.name: spec for spec in self.labels}
        return LabelMapping(tuple(known.get(n) or LabelSpec(n) for n in names), self.where)

    def to_dict(self) -> dict:
        return {"labels": [s.to_dict() for s in self.labels], "where": self.where}


def label_mapping_from_toml(document: Mapping, *, source: str = "") -> LabelMapping:
    """``[labels]`` and ``[selection]`` of a model.toml document (either may be absent)."""
    where = f" in {source}" if source else ""
    mapping = LabelMapping()
    if "labels" in document:
        specs = []
        for name, value in document["labels"].items():
            entry = {"expr": value} if isinstance(value, str) else value
            if not isinstance(entry, Mapping) or set(entry) - _LABEL_KEYS:
                raise ConfigError(
                    f"[labels] {name}{where}: give an expression string or a table with keys "
                    f"{sorted(_LABEL_KEYS)}, not {value!r}"
                )
            specs.append(LabelSpec(name, **{k: str(v) for k, v in entry.items()}))
        mapping = LabelMapping(tuple(specs))
    selection = document.get("selection", {})
    if set(selection) - {"where"}:
        raise ConfigError(f"[selection]{where} takes only 'where', not {sorted(set(selection) - {'where'})}")
    if selection.get("where"):
        mapping = LabelMapping(mapping.labels, str(selection["where"]))
    return mapping


# -- reading a label catalogue ---------------------------------------------------------------------


def catalogue_format(location: str) -> str:
    lower = location.lower()
    for suffix, kind in sorted(CATALOGUE_FORMATS.items(), key=lambda item: -len(item[0])):
        if lower.endswith(suffix):
            return kind
    raise InputError(
        f"label catalogue {location}: unknown file type; use FITS (.fits), Parquet (.parquet) or CSV (.csv)"
    )


def read_label_catalogue(location: str) -> pa.Table:
    """A label catalogue file as an Arrow table (FITS: the first table HDU; masked values are null)."""
    kind = catalogue_format(location)
    fs, path = filesystem_and_path(location)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path, filesystem=fs)
        with fs.open_input_file(path) as handle:
            data = handle.read()
        if kind == "csv":
            import pyarrow.csv as pacsv

            compressed = location.lower().endswith(".gz")
            stream = pa.input_stream(pa.BufferReader(data), compression="gzip" if compressed else None)
            return pacsv.read_csv(stream)
        return _fits_table(data)
    except FileNotFoundError as exc:
        raise InputError(f"label catalogue {location} does not exist") from exc
    except (OSError, ValueError, pa.ArrowInvalid) as exc:
        raise InputError(f"cannot read the label catalogue {location}: {exc}") from exc


def _fits_table(data: bytes) -> pa.Table:
    from astropy.table import Table

    # Units are not used here, and survey catalogues carry ones the FITS standard lacks ('dex').
    table = Table.read(io.BytesIO(data), format="fits", unit_parse_strict="silent")
    columns = {}
    for name in table.colnames:
        column = table[name]
        if column.ndim != 1:
            continue  # array cells (spectra, flags per line) are no label
        mask = np.asarray(getattr(column, "mask", np.zeros(len(column), bool)), dtype=bool)
        values = np.asarray(column)
        if values.dtype.kind in "SU":
            text = np.char.strip(values.astype(str))
            columns[name] = pa.array(text.tolist(), pa.string(), mask=mask | (text == ""))
        else:
            native = values.astype(values.dtype.newbyteorder("="))
            columns[name] = pa.array(native, mask=mask if mask.any() else None)
    return pa.table(columns)


# -- labels from columns ---------------------------------------------------------------------------


def evaluate(expression: pc.Expression, table: pa.Table) -> pa.Array:
    """``expression`` over every row of ``table`` (an Arrow projection; no Python is evaluated)."""
    result = ds.dataset(table).to_table(columns={"value": expression}).column("value")
    return result.combine_chunks()


@dataclass(frozen=True)
class Cut:
    text: str
    removed: int
    left: int


@dataclass
class TrainingLabels:
    """The selected stars' labels keyed by ``spectrum_id`` and the accounting of the catalogue rows."""

    table: pa.Table  # spectrum_id, then per label its value and <label>_err (float64)
    mapping: LabelMapping
    source: str
    id_column: str
    n_rows: int  # rows of the catalogue
    cuts: list[Cut]
    no_id: int  # rows without an id (null or empty)
    duplicated: dict[str, int]  # id -> rows, for ids on more than one selected row (none used)
    cut_ids: dict[str, str] = field(repr=False)  # id of a removed star -> the cut that removed it

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.mapping.names

    @property
    def columns(self) -> list[str]:
        return self.table.column_names[1:]

    def attach(self, batch: pa.Table) -> pa.Table:
        """``batch`` (spectra) with the label columns of its stars; null where a star has no row."""
        index = pc.index_in(
            batch.column(SPECTRUM_ID).cast(pa.string()), value_set=self.table.column(SPECTRUM_ID)
        )
        for name in self.columns:
            batch = batch.append_column(name, self.table.column(name).take(index))
        return batch

    def explain(self, ids: Sequence[str | None], reasons: np.ndarray) -> np.ndarray:
        """Reasons of rows without labels (``missing_label``) that say why: not in the catalogue, cut, or
        on several catalogue rows."""
        out = reasons.copy()
        for i, sid in enumerate(ids):
            if out[i] is None or reason_code(out[i]) != MISSING_LABEL or sid is None:
                continue
            if sid in self.cut_ids:
                out[i] = f"{NOT_SELECTED}: the selection cut {self.cut_ids[sid]!r} removed its star"
            elif sid in self.duplicated:
                out[i] = (
                    f"{MISSING_LABEL}: {self.duplicated[sid]} rows of {self.source} have "
                    f"{self.id_column} = {sid!r}; which one is this star's is unknown"
                )
            elif not self._has_row(sid):
                out[i] = f"{MISSING_LABEL}: no row of {self.source} has {self.id_column} = {sid!r}"
        return out

    def _has_row(self, sid: str) -> bool:
        if not hasattr(self, "_ids"):
            self._ids = set(self.table.column(SPECTRUM_ID).to_pylist())
        return sid in self._ids

    def accounting(self, spectrum_ids: Iterable[str | None]) -> dict:
        """Every catalogue row and every spectrum accounted for (``training.data.labels`` in model.json)."""
        spectra = {sid for sid in spectrum_ids if sid}
        kept = self.table.column(SPECTRUM_ID).to_pylist()
        matched = sum(1 for sid in kept if sid in spectra)
        return {
            "source": self.source,
            "id_column": self.id_column,
            "mapping": self.mapping.to_dict(),
            "catalogue_rows": self.n_rows,
            "removed_by_cuts": [{"cut": c.text, "removed": c.removed, "left": c.left} for c in self.cuts],
            "without_id": self.no_id,
            "duplicated_id_rows": sum(self.duplicated.values()),
            "kept": len(kept),
            "kept_with_spectrum": matched,
            "kept_without_spectrum": len(kept) - matched,
        }


def training_labels(
    table: pa.Table, mapping: LabelMapping, *, id_column: str = SPECTRUM_ID, source: str = ""
) -> TrainingLabels:
    """Apply the selection and the label mapping to ``table`` (a label catalogue, or the training
    table's scalar columns); see :class:`TrainingLabels`."""
    source = source or "the label catalogue"
    if id_column not in table.column_names:
        raise InputError(unknown_column(id_column, table.column_names, where=f" (the id column) in {source}"))
    n_rows = table.num_rows
    ids = pc.utf8_trim_whitespace(table.column(id_column).cast(pa.string()))
    table = table.append_column("__id", ids)
    schema = table.schema
    cuts, cut_ids = [], {}
    for text in split_conjunction(mapping.where) if mapping.where else []:
        keep = pc.fill_null(evaluate(_parse(parse_where, text, schema, "[selection] where"), table), False)
        removed = table.filter(pc.invert(keep))
        cut_ids.update({sid: text for sid in removed.column("__id").to_pylist() if sid})
        table = table.filter(keep)
        cuts.append(Cut(text, removed.num_rows, table.num_rows))
    values = {SPECTRUM_ID: table.column("__id")}
    for spec in mapping.labels:
        values[spec.name] = evaluate(_parse(parse_value, spec.expr, schema, f"[labels] {spec.name}"), table)
        error = spec.error or (f"{spec.name}_err" if f"{spec.name}_err" in schema.names else None)
        if error is not None:
            what = f"[labels] {spec.name} error"
            values[f"{spec.name}_err"] = evaluate(_parse(parse_value, error, schema, what), table)
    labels = pa.table(values)
    has_id = pc.fill_null(pc.greater(pc.utf8_length(labels.column(SPECTRUM_ID)), 0), False)
    no_id = labels.num_rows - int(pc.sum(has_id).as_py() or 0)
    labels = labels.filter(has_id)
    counts = collections.Counter(labels.column(SPECTRUM_ID).to_pylist())
    duplicated = {sid: n for sid, n in counts.items() if n > 1}
    if duplicated:
        labels = labels.filter(pc.invert(pc.is_in(labels.column(SPECTRUM_ID), pa.array(list(duplicated)))))
    # A star that a cut removed but that also has a kept row is not "removed".
    kept = set(labels.column(SPECTRUM_ID).to_pylist())
    cut_ids = {sid: text for sid, text in cut_ids.items() if sid not in kept and sid not in duplicated}
    return TrainingLabels(labels, mapping, source, id_column, n_rows, cuts, no_id, duplicated, cut_ids)


def _parse(parser, text: str, schema: pa.Schema, what: str) -> pc.Expression:
    try:
        return parser(text, schema)
    except QueryError as exc:
        raise ConfigError(f"{what} = {text!r}: {exc}") from exc


def selection_table(labels: TrainingLabels) -> str:
    """The printed table: how many catalogue rows each cut removed, and what was left."""
    lines = [f"labels: {labels.n_rows} rows in {labels.source} (id column {labels.id_column})"]
    if labels.cuts:
        width = max(len(c.text) for c in labels.cuts)
        lines.append(f"  {'selection cut':<{width}} {'removed':>8} {'left':>8}")
        lines += [f"  {c.text:<{width}} {c.removed:>8} {c.left:>8}" for c in labels.cuts]
    if labels.no_id or labels.duplicated:
        lines.append(
            f"  {labels.no_id} rows without an id, {sum(labels.duplicated.values())} rows of "
            f"{len(labels.duplicated)} ids on several rows (none used)"
        )
    lines.append(f"  {labels.table.num_rows} stars with labels")
    return "\n".join(lines)


def join_table(accounting: dict) -> str:
    """The printed accounting of the join: catalogue rows and spectra on one side only."""
    a = accounting
    cut = sum(c["removed"] for c in a["removed_by_cuts"])
    return (
        f"labels: {a['catalogue_rows']} catalogue rows = {a['kept_with_spectrum']} joined to a spectrum + "
        f"{a['kept_without_spectrum']} without a spectrum + {cut} removed by cuts + "
        f"{a['without_id']} without an id + {a['duplicated_id_rows']} with a duplicated id"
    )
