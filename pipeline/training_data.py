"""Labelled spectra for the train job: one validating scan, then each member's rows in memory or streamed.

:func:`resolve_input` finds the input (a Parquet file, folder, glob or object-store URI) and checks
every file's schema against the contract; :func:`scan_in_memory` or :func:`scan_streaming` then reads
every row once, and :func:`scan_batch` validates it
(``contract.validate`` with labels) and keeps only what the driver needs, its id, reason, labels
and a 32-byte content digest (``model.provenance.row_digests``). The driver then

* quarantines every row of a ``spectrum_id`` that occurs more than once: which label belongs to which
  spectrum is unknown, and excluding *all* its rows makes "excluded ids" an exact row filter that a
  streaming reader can apply batch by batch;
* leaves out the rows whose id a user listed (``speclabel train --exclude``, e.g. the output of
  ``speclabel screen``), with reason code :data:`EXCLUDED`: not quarantined (nothing is wrong with
  them as data), but left out the same way;
* accounts for every input row (``n_input = n_used + quarantined + excluded``), fits nothing itself but hands
  the used rows' ids and labels to ``model.fit.fit_scaler``, and fingerprints the used rows.

Two ways to serve the rows to the members, chosen by the job from the estimated in-memory size:

* :class:`InMemoryRows`: the training arrays of the used rows, read once by the driver; put in the
  Ray object store once, every trial on a node reads the same copy (``model.fit.member_data``).
* :class:`StreamedRows`: a Ray Data pipeline per member and part (train / val / test) that reads the
  Parquet files, keeps the part's rows by the hash split and decodes them in Ray Data tasks, epoch
  after epoch; nothing larger than a few blocks is ever held. Batches are shuffled by row-group order and
  a local shuffle buffer, both seeded by the epoch's seed, with order preserved, so a resumed member
  sees the same batches as an uninterrupted one. Inside a member's Ray Train run the workers read
  its train and val pipelines through ``ray.train.get_dataset_shard`` (:class:`ShardBatches`): the
  row-group order is then the member's own, fixed, and the local buffer is seeded by the epoch.

In streaming mode the scan itself runs as Ray Data tasks; in memory it runs on the table in the
driver. Both give the same accounting, scaler and fingerprint for the same input.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from speclabel.core.arrays import label_matrix, row_digests, training_arrays
from speclabel.core.contract import DUPLICATE_ID, check_table_columns, quarantine_table
from speclabel.core.contract import validate as validate_rows
from speclabel.core.errors import InputError
from speclabel.core.fingerprints import DataFingerprint
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import DEFAULT_SETUP, Setup, get_setup
from speclabel.core.storage import absolute_location, filesystem_and_path, resolve_files
from speclabel.model.fit import member_data
from speclabel.model.splits import SplitRule
from speclabel.model.training import ArrayData

from .training_labels import TrainingLabels

PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
# Bytes per pixel of one spectrum as training arrays: float32 flux + float32 ivar + bool mask.
BYTES_PER_PIXEL = 9
STREAM_PARTS = ("train", "val", "test")
ARRAY_KEYS = ("flux", "mask", "labels", "label_err", "ivar", "snr", "sample_weight")
# The reason code of a row left out because its id is on the --exclude list.
EXCLUDED = "excluded"
ID_LIST_EXTENSIONS = (*PARQUET_EXTENSIONS, ".csv")


@dataclass(frozen=True)
class TrainingInput:
    """The resolved input: Parquet files on one filesystem, their row groups, the columns a row needs.

    Ray Data work over the input runs as one task per row group (:meth:`map_pieces`), not through
    ``ray.data.read_parquet``: in Ray 2.60 that plans a file-listing task with a fixed 1-CPU request,
    which can never start inside trials that hold every CPU of a node (seen on a 2-CPU machine: the
    members waited forever). Row groups are also the unit of the training shuffle.
    """

    location: str
    filesystem: object  # pyarrow.fs.FileSystem
    files: tuple[str, ...]
    columns: tuple[str, ...]
    pieces: tuple[tuple[str, int], ...]  # (file, row group)
    n_rows: int  # from the Parquet footers
    batch_rows: int = 256  # rows decoded at a time inside a row group
    label_names: tuple[str, ...] = LABEL_NAMES  # the model's outputs, in order
    labels: TrainingLabels | None = None  # labels joined by spectrum_id; None: the files' own columns

    def estimated_bytes(self, setup: Setup) -> int:
        """Memory the used rows take as training arrays (the in-memory mode's footprint)."""
        return self.n_rows * setup.n_pixels * BYTES_PER_PIXEL

    def read_table(self) -> pa.Table:
        tables = [
            pq.read_table(f, filesystem=self.filesystem, columns=list(self.columns)) for f in self.files
        ]
        return self._with_labels(pa.concat_tables(tables, promote_options="permissive"))

    def _with_labels(self, table: pa.Table) -> pa.Table:
        return table if self.labels is None else self.labels.attach(table)

    def read_piece(self, path: str, row_group: int) -> Iterator[pa.Table]:
        with self.filesystem.open_input_file(path) as handle:
            reader = pq.ParquetFile(handle)
            for batch in reader.iter_batches(
                batch_size=self.batch_rows, row_groups=[row_group], columns=list(self.columns)
            ):
                yield self._with_labels(pa.Table.from_batches([batch]))

    def map_pieces(self, fn, fn_kwargs: dict, *, num_cpus: float, shuffle_seed: int | None = None):
        """A Ray Data dataset of ``fn(table, **fn_kwargs)`` over every row group, in file order or in a
        seeded random order of row groups."""
        import ray.data

        # One INFO block per dataset execution, i.e. per member epoch: the job prints its own progress.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        pieces = list(self.pieces)
        if shuffle_seed is not None:
            pieces = [pieces[i] for i in np.random.default_rng(shuffle_seed).permutation(len(pieces))]
        items = [{"path": path, "row_group": group} for path, group in pieces]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            _over_pieces,
            fn_kwargs={"input": self, "fn": fn, "fn_kwargs": fn_kwargs},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=num_cpus,
        )
        # This dataset's own context (not the process-wide one): rows in piece order, so that an
        # epoch's batches are the same in every run, and no progress bars.
        dataset.context.execution_options.preserve_order = True
        dataset.context.enable_progress_bars = False
        return dataset


def _over_pieces(items: pa.Table, *, input: TrainingInput, fn, fn_kwargs: dict):
    for path, group in zip(
        items.column("path").to_pylist(), items.column("row_group").to_pylist(), strict=True
    ):
        for table in input.read_piece(path, group):
            yield fn(table, **fn_kwargs)


def scalar_columns(location: str) -> pa.Table:
    """Every training file's columns of plain values (no spectra): what a [labels] mapping without a
    label catalogue computes the labels from."""
    fs, files = resolve_files(location, PARQUET_EXTENSIONS)
    tables = []
    for path in files:
        schema = pq.read_schema(path, filesystem=fs)
        names = [f.name for f in schema if not pa.types.is_nested(f.type)]
        tables.append(pq.read_table(path, filesystem=fs, columns=names))
    return pa.concat_tables(tables, promote_options="permissive")


def input_setup(location: str, name_or_path: str | None = None) -> Setup:
    """``name_or_path`` (a setup name or TOML), else the setup the input's first file declares,
    else the default setup."""
    if name_or_path is not None:
        return get_setup(name_or_path)
    fs, files = resolve_files(location, PARQUET_EXTENSIONS)
    metadata = pq.read_schema(files[0], filesystem=fs).metadata or {}
    declared = metadata.get(b"speclabel.setup")
    return get_setup(declared.decode() if declared else DEFAULT_SETUP)


@dataclass(frozen=True)
class IdList:
    """The spectrum ids of a Parquet or CSV file with a ``spectrum_id`` column (``--exclude``)."""

    source: str
    ids: frozenset[str]

    @classmethod
    def read(cls, location: str) -> IdList:
        if not location.lower().endswith(ID_LIST_EXTENSIONS):
            raise InputError(f"{location}: an id list must be {', '.join(ID_LIST_EXTENSIONS)}")
        fs, path = filesystem_and_path(location)
        try:
            with fs.open_input_file(path) as handle:
                if location.lower().endswith(".csv"):
                    import pyarrow.csv

                    table = pyarrow.csv.read_csv(
                        handle,
                        convert_options=pyarrow.csv.ConvertOptions(column_types={"spectrum_id": pa.string()}),
                    )
                else:
                    table = pq.read_table(handle)
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"cannot read the id list {location}: {exc}") from exc
        if "spectrum_id" not in table.column_names:
            raise InputError(f"{location} has no spectrum_id column (columns: {table.column_names})")
        ids = table.column("spectrum_id").cast(pa.string()).drop_null().to_pylist()
        return cls(absolute_location(location), frozenset(ids))


def resolve_input(
    location: str,
    setup: Setup,
    label_names: tuple[str, ...] = LABEL_NAMES,
    labels: TrainingLabels | None = None,
) -> TrainingInput:
    """The Parquet files at ``location``, each checked to hold a labelled spectra table for ``setup``
    with the columns of ``label_names``, or spectra whose ``labels`` are joined by ``spectrum_id``."""
    if labels is not None:
        label_names = labels.label_names
    fs, files = resolve_files(location, PARQUET_EXTENSIONS)
    columns: list[str] | None = None
    pieces: list[tuple[str, int]] = []
    n_rows = 0
    for path in files:
        try:
            metadata = pq.read_metadata(path, filesystem=fs)
            schema = metadata.schema.to_arrow_schema()
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"cannot read Parquet file {path}: {exc}") from exc
        check_table_columns(schema, setup, labelled=labels is None, source=path, label_names=label_names)
        n_rows += metadata.num_rows
        pieces += [(path, group) for group in range(metadata.num_row_groups)]
        present = set(schema.names)
        wanted = [
            "spectrum_id",
            *(c for arm in setup.arms for c in (arm.flux_column, arm.ivar_column)),
            *(() if labels is not None else (*label_names, *(f"{label}_err" for label in label_names))),
            "snr",
        ]
        # Optional columns are used only when every file has them: one schema for all batches.
        file_columns = [c for c in wanted if c in present]
        columns = file_columns if columns is None else [c for c in columns if c in file_columns]
    return TrainingInput(
        location,
        fs,
        tuple(files),
        tuple(columns or ()),
        tuple(pieces),
        n_rows,
        label_names=tuple(label_names),
        labels=labels,
    )


def scan_schema(label_names: tuple[str, ...]) -> pa.Schema:
    """What the scan keeps of each row: id, reason (null for a good row), labels, content digest."""
    return pa.schema(
        [
            ("spectrum_id", pa.string()),
            ("reason", pa.string()),
            *[(name, pa.float64()) for name in label_names],
            ("digest", pa.binary(32)),
        ]
    )


SCAN_SCHEMA = scan_schema(LABEL_NAMES)  # the paper's five labels


def scan_batch(
    table: pa.Table,
    setup: Setup,
    label_names: tuple[str, ...] = LABEL_NAMES,
    labels: TrainingLabels | None = None,
) -> pa.Table:
    """What the driver keeps of each row (:func:`scan_schema`): the reason is null for a good row.
    ``labels``: where the labels were joined from, to say why a row has none."""
    reasons = validate_rows(table, setup, labelled=True, label_names=label_names)
    if labels is not None:
        reasons = labels.explain(table.column("spectrum_id").to_pylist(), reasons)
    columns = {
        "spectrum_id": table.column("spectrum_id").cast(pa.string()),
        "reason": pa.array(list(reasons), pa.string()),
        **{name: table.column(name).cast(pa.float64()) for name in label_names},
        "digest": pa.array(row_digests(table, setup, label_names=label_names), pa.binary(32)),
    }
    return pa.table(columns, schema=scan_schema(label_names))


@dataclass
class TrainingSet:
    """The outcome of the scan: what is used, what is quarantined and why, and the used rows' content."""

    input: TrainingInput
    setup: Setup
    scan: pa.Table  # SCAN_SCHEMA, reasons final (cross-batch duplicates included)
    excluded_ids: frozenset[str] = field(repr=False)

    @property
    def used(self) -> np.ndarray:
        return np.asarray(self.scan.column("reason").is_null())

    @property
    def n_input(self) -> int:
        return self.scan.num_rows

    @property
    def n_used(self) -> int:
        return int(self.used.sum())

    def _codes(self) -> list[str]:
        return [r.split(":", 1)[0] for r in self.scan.column("reason").drop_null().to_pylist()]

    def quarantined_by_reason(self) -> dict[str, int]:
        codes = [code for code in self._codes() if code != EXCLUDED]
        return dict(sorted(collections.Counter(codes).items()))

    @property
    def n_excluded(self) -> int:
        """Rows left out by the --exclude list (valid rows only: a quarantined one stays quarantined)."""
        return self._codes().count(EXCLUDED)

    @property
    def n_quarantined(self) -> int:
        return self.n_input - self.n_used - self.n_excluded

    def quarantine(self) -> pa.Table:
        reasons = self.scan.column("reason")
        bad = self.scan.filter(
            pc.and_(pc.is_valid(reasons), pc.invert(pc.starts_with(reasons, f"{EXCLUDED}:")))
        )
        return quarantine_table(
            bad.column("spectrum_id").to_pylist(), bad.column("reason").to_pylist(), self.input.location
        )

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.input.label_names

    def label_arrays(self) -> dict[str, np.ndarray]:
        """``spectrum_id`` and ``labels`` of the used rows, as ``model.fit.fit_scaler`` takes them
        (NaN where a row lacks a label)."""
        used = self.scan.filter(pa.array(self.used))
        labels = label_matrix(used, self.label_names)
        return {
            "spectrum_id": np.asarray(used.column("spectrum_id").to_pylist(), dtype=object),
            "labels": labels,
        }

    def label_counts(self, split: SplitRule) -> dict[str, dict[str, int]]:
        """Per label: used rows that have it, and of those the rows outside the common test split,
        which train (or validate) it."""
        arrays = self.label_arrays()
        outside = ~split.is_test(arrays["spectrum_id"])
        present = np.isfinite(arrays["labels"])
        return {
            name: {"rows": int(present[:, k].sum()), "trained": int((present[:, k] & outside).sum())}
            for k, name in enumerate(self.label_names)
        }

    def fingerprint(self) -> str:
        digests = self.scan.column("digest").filter(pa.array(self.used)).to_pylist()
        return DataFingerprint().add_digests(digests).hexdigest

    def describe(self, mode: str) -> dict:
        """The ``training.data`` section of model.json (an absolute location: `speclabel evaluate`
        reads it back from any folder)."""
        return {
            "location": absolute_location(self.input.location),
            "files": len(self.input.files),
            "mode": mode,
            "n_input": self.n_input,
            "n_rows": self.n_used,
            "quarantined": self.quarantined_by_reason(),
            **({"excluded": self.n_excluded} if self.n_excluded else {}),
            "fingerprint": self.fingerprint(),
        }


def finish_scan(
    scan: pa.Table, input: TrainingInput, setup: Setup, exclude: IdList | None = None
) -> TrainingSet:
    """Quarantine every row of a duplicated id (see the module docstring), leave out the valid rows
    listed in ``exclude``, and collect the ids no member may read."""
    ids = scan.column("spectrum_id").to_pylist()
    reasons = scan.column("reason").to_pylist()
    counts = collections.Counter(sid for sid in ids if sid)
    for i, sid in enumerate(ids):
        # The same reason text whether validate saw both copies in one batch or the scan in two.
        first_problem = reasons[i] is None or reasons[i].startswith(f"{DUPLICATE_ID}:")
        if first_problem and counts.get(sid, 0) > 1:
            reasons[i] = (
                f"{DUPLICATE_ID}: spectrum_id {sid!r} occurs {counts[sid]} times in the training data; "
                "which label belongs to which spectrum is unknown, so none of its rows is used"
            )
    if exclude is not None:
        for i, sid in enumerate(ids):
            if reasons[i] is None and sid in exclude.ids:
                reasons[i] = f"{EXCLUDED}: listed in {exclude.source}"
    scan = scan.set_column(scan.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    excluded = frozenset(sid for sid, reason in zip(ids, reasons, strict=True) if reason is not None and sid)
    return TrainingSet(input, setup, scan, excluded)


def scan_in_memory(
    input: TrainingInput, setup: Setup, exclude: IdList | None = None
) -> tuple[TrainingSet, InMemoryRows]:
    """Read the whole input in this process, scan it, and keep the used rows as training arrays."""
    table = input.read_table()
    training_set = finish_scan(
        scan_batch(table, setup, input.label_names, input.labels), input, setup, exclude
    )
    used = table.filter(pa.array(training_set.used))
    arrays = training_arrays(used, setup, label_names=input.label_names)
    return training_set, InMemoryRows(arrays)


def scan_streaming(
    input: TrainingInput, setup: Setup, *, num_cpus: float = 1.0, exclude: IdList | None = None
) -> TrainingSet:
    """Scan the input in Ray Data tasks; only the small per-row results come back to the driver."""
    scanned = input.map_pieces(
        scan_batch,
        {"setup": setup, "label_names": input.label_names, "labels": input.labels},
        num_cpus=num_cpus,
    )
    parts = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b for b in _blocks(scanned)]
    schema = scan_schema(input.label_names)
    scan = pa.concat_tables(parts).cast(schema) if parts else schema.empty_table()
    if scan.num_rows != input.n_rows:
        raise InputError(
            f"the scan of {input.location} returned {scan.num_rows} rows, the Parquet footers say "
            f"{input.n_rows}: rows were lost on the way; nothing was trained"
        )
    return finish_scan(scan, input, setup, exclude)


def _blocks(dataset) -> Iterator[pa.Table]:
    return dataset.iter_batches(batch_size=None, batch_format="pyarrow")


# -- serving rows to the members -------------------------------------------------------------------


@dataclass
class InMemoryRows:
    """The used rows' training arrays (``model.training.training_arrays``), shared by every member."""

    arrays: dict[str, np.ndarray]

    mode = "memory"

    def weighted(self, weights: Mapping[str, float]) -> InMemoryRows:
        """These rows with each row's ``sample_weight``: ``weights`` by spectrum_id."""
        column = np.array([weights[sid] for sid in self.arrays["spectrum_id"]], dtype=np.float64)
        return InMemoryRows({**self.arrays, "sample_weight": column})

    def member(self, split: SplitRule, seed: int) -> tuple[ArrayData, ArrayData]:
        return member_data(self.arrays, split, seed)

    def test_batches(self, split: SplitRule, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        rows = np.flatnonzero(split.is_test(self.arrays["spectrum_id"]))
        for start in range(0, len(rows), batch_size):
            take = rows[start : start + batch_size]
            yield {k: self.arrays[k][take] for k in ARRAY_KEYS if self.arrays.get(k) is not None}


def member_rows(
    table: pa.Table,
    *,
    setup: Setup,
    split: SplitRule,
    seed: int,
    part: str,
    excluded_ids: frozenset[str],
    label_names: tuple[str, ...] = LABEL_NAMES,
    sample_weights: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """The rows of ``table`` in ``part`` of member ``seed``, as training arrays (a Ray Data UDF), with
    their ``sample_weight`` from ``sample_weights`` (by spectrum_id) where given."""
    ids = table.column("spectrum_id").to_pylist()
    usable = np.array([bool(sid) and sid not in excluded_ids for sid in ids], dtype=bool)
    if part == "test":
        keep = split.is_test(ids)
    else:
        train, val = split.member_masks(ids, seed)
        keep = train if part == "train" else val
    kept = table.filter(pa.array(usable & keep))
    arrays = training_arrays(kept, setup, label_names=label_names)
    if sample_weights is not None:
        ids = kept.column("spectrum_id").to_pylist()
        arrays["sample_weight"] = np.array([sample_weights[sid] for sid in ids], dtype=np.float64)
    return {k: arrays[k] for k in ARRAY_KEYS if arrays.get(k) is not None}


@dataclass
class StreamedRows:
    """One part (train / val / test) of one member's rows, read from the input every epoch.

    Implements ``model.training.TrainingData``: ``batches(epoch, batch_size, shuffle_seed)`` (the
    driver's passes: the input reference, the test split). The train job hands :meth:`dataset` to
    each member's Ray Train run, whose workers read it through :class:`ShardBatches`.
    """

    input: TrainingInput
    setup: Setup
    split: SplitRule
    seed: int
    part: str
    excluded_ids: frozenset[str] = field(repr=False)
    num_cpus: float = 0.0  # Ray Data tasks share the CPUs of the trial that iterates them
    shuffle_buffer_rows: int = 1024
    sample_weights: Mapping[str, float] | None = field(default=None, repr=False)  # by spectrum_id

    def __post_init__(self) -> None:
        if self.part not in STREAM_PARTS:
            raise ValueError(f"part must be one of {STREAM_PARTS}, got {self.part!r}")

    def dataset(self, shuffle_seed: int | None = None):
        return self.input.map_pieces(
            member_rows,
            {
                "setup": self.setup,
                "split": self.split,
                "seed": self.seed,
                "part": self.part,
                "excluded_ids": self.excluded_ids,
                "label_names": self.input.label_names,
                "sample_weights": self.sample_weights,
            },
            num_cpus=self.num_cpus,
            shuffle_seed=shuffle_seed,
        )

    def batches(self, epoch: int, batch_size: int, shuffle_seed: int | None) -> Iterator[Mapping]:
        if shuffle_seed is None:
            yield from self.dataset().iter_batches(batch_size=batch_size, batch_format="numpy")
            return
        # Row-group order and a local buffer, not a global shuffle: a global shuffle (or a block-order
        # shuffle, an all-to-all step) would hold the whole member's data at once.
        seed = shuffle_seed % 2**32
        yield from self.dataset(seed).iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=self.shuffle_buffer_rows,
            local_shuffle_seed=seed,
        )


@dataclass
class StreamingRows:
    """Every member's rows served by :class:`StreamedRows` pipelines."""

    input: TrainingInput
    setup: Setup
    excluded_ids: frozenset[str] = field(repr=False)
    num_cpus: float = 0.0
    sample_weights: Mapping[str, float] | None = field(default=None, repr=False)  # by spectrum_id

    mode = "streaming"

    def weighted(self, weights: Mapping[str, float]) -> StreamingRows:
        """These rows with each row's ``sample_weight``: ``weights`` by spectrum_id."""
        return dataclasses.replace(self, sample_weights=dict(weights))

    def part(self, split: SplitRule, seed: int, part: str) -> StreamedRows:
        return StreamedRows(
            self.input,
            self.setup,
            split,
            seed,
            part,
            self.excluded_ids,
            self.num_cpus,
            sample_weights=self.sample_weights,
        )

    def member(self, split: SplitRule, seed: int) -> tuple[StreamedRows, StreamedRows]:
        return self.part(split, seed, "train"), self.part(split, seed, "val")

    def test_batches(self, split: SplitRule, batch_size: int) -> Iterator[Mapping]:
        return self.part(split, 0, "test").batches(0, batch_size, None)


@dataclass
class ShardBatches:
    """A Ray Train worker's shard of a streamed part (``ray.train.get_dataset_shard``) as
    ``model.training.TrainingData``: a local shuffle buffer seeded by the epoch's seed, so that a
    resumed member sees the batches an uninterrupted one would have (the shard preserves order)."""

    shard: object  # ray.data.DataIterator
    shuffle_buffer_rows: int = 1024

    def batches(self, epoch: int, batch_size: int, shuffle_seed: int | None) -> Iterator[Mapping]:
        if shuffle_seed is None:
            return self.shard.iter_batches(batch_size=batch_size, batch_format="numpy")
        return self.shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=self.shuffle_buffer_rows,
            local_shuffle_seed=shuffle_seed % 2**32,
        )
