"""What an evaluation compares: predicted labels (with ensemble std), true labels and S/N, row by row.

Two sources give the same :class:`Evaluation`:

* :func:`from_model`: a model directory and the rows of its common test split (``model.splits``) in
  the data it was trained on (``model.json``: ``training.data.location``) or in any labelled spectra
  table. Rows are streamed in batches through ``Ensemble.predict``, which also adds every saliency
  map to a :class:`~speclabel.model.saliency.SaliencyAccumulator` for the population maps. Rows
  that fail the data contract are refused with a reason (quarantine), and counted.
* :func:`from_catalogue`: the label catalogue that ``speclabel label`` wrote, joined on
  ``spectrum_id`` with a table of true labels. Matched and unmatched rows on both sides are counted.
  The population saliency comes from the sums the label job stored beside the release
  (``_population_saliency/release=<R>/run=<run>/``, :mod:`.population`) when there are any, else
  from the per-spectrum summary columns ``sal_<label>_<group>``.

From a model, each row also gets its trust flags (``extrapolated``, ``out_of_distribution``) and
``ood_score``, and a bounded sample of the rows (:data:`MAP_ROWS`, chosen by a hash of
``spectrum_id``) keeps its penultimate-layer embedding for the report's map; a catalogue has
``flags`` and ``ood_score`` as columns, and no embeddings.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from speclabel.core.arrays import label_matrix, model_inputs, spectra_arrays
from speclabel.core.contract import DEFECT_COLUMN, check_table_columns, quarantine_table, validate
from speclabel.core.errors import InputError, IntegrityError
from speclabel.core.setups import Setup
from speclabel.core.storage import resolve_files
from speclabel.model.ood import ReferenceSample
from speclabel.model.saliency import SaliencyAccumulator

from ..catalogue import open_catalogue
from ..catalogue.layout import label_columns, saliency_column

log = logging.getLogger(__name__)

MAP_ROWS = 3000  # rows whose embeddings are kept for the map (t-SNE grows faster than linearly)


@dataclass
class Evaluation:
    """Predicted and true labels of the same spectra, and where they came from.

    ``predicted``, ``true``, ``std`` and ``err`` are ``[n, n_labels]`` float64 in the order of
    ``labels``; ``std`` (the ensemble std), ``err`` (the calibrated total error, ``model.calibration``:
    NaN where unknown) and ``snr`` may be absent. ``saliency`` is the population sum of the
    saliency maps (label order of ``labels``) and ``saliency_row_shares`` the mean per-spectrum share
    of |gradient| in each line-window group, ``{label: {group: share}}``: a catalogue may offer only
    the latter. ``source`` says what was evaluated; ``rows`` accounts for every input row.
    """

    labels: tuple[str, ...]
    spectrum_id: np.ndarray
    predicted: np.ndarray
    true: np.ndarray
    std: np.ndarray | None
    snr: np.ndarray | None
    setup: Setup
    source: dict
    rows: dict
    saliency: SaliencyAccumulator | None = None
    saliency_row_shares: dict[str, dict[str, float]] | None = None
    quarantine: pa.Table | None = field(default=None, repr=False)
    err: np.ndarray | None = None
    flags: np.ndarray | None = None  # [n] int32 quality flags (core.flags), where known
    ood_score: np.ndarray | None = None  # [n] float64, NaN where the model has no reference
    # The map's sample: row positions [m] and their embeddings [m, D] (in the model's reference
    # space, model/ood.py, when it has one; else the members' penultimate activations).
    embedding_rows: np.ndarray | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)
    # [n] object: the kind of defect the truth says a spectrum was given (None: clean); absent
    # unless the truth table has a ``defect`` column (``speclabel simulate --defects``).
    defect: np.ndarray | None = None
    # [n, n_labels] float64: the network's labels where ``predicted`` holds refined ones
    # (model/refine.py), NaN for labels the refinement left as they were; None: nothing refined.
    network: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.spectrum_id)
        for name in ("predicted", "true", "std", "err", "network"):
            value = getattr(self, name)
            if value is not None and value.shape != (n, len(self.labels)):
                raise ValueError(f"{name} has shape {value.shape}, expected {(n, len(self.labels))}")
        if self.snr is not None and self.snr.shape != (n,):
            raise ValueError(f"snr has shape {self.snr.shape}, expected {(n,)}")

    @property
    def n(self) -> int:
        return len(self.spectrum_id)


# -- a model and its test split ---------------------------------------------------------------------


def training_data_location(info: dict) -> str | None:
    """Where ``model.json`` says the model's training data came from, if it says."""
    data = info.get("training", {}).get("data", {})
    return data.get("location") if isinstance(data, dict) else None


def from_model(
    model_location: str,
    data: str | None = None,
    *,
    batch_rows: int = 256,
    saliency: bool = True,
) -> Evaluation:
    """The model's common test split of ``data`` (default: its training data), labelled by the model."""
    from speclabel.model.calibration import model_calibration, prediction_errors
    from speclabel.model.io import load_model
    from speclabel.model.splits import SplitRule

    ensemble = load_model(model_location)
    # A model with reference spectra is evaluated as the label job labels: refined, with the
    # refined labels' calibration.
    refinement = ensemble.refinement
    calibration = model_calibration(ensemble.info) if refinement is None else refinement.calibration
    training = ensemble.info.get("training", {})
    if "split" not in training:
        raise IntegrityError(
            f"check 'test split': model.json of {model_location} records no training split "
            "(training.split), so its held-out test rows are unknown"
        )
    split = SplitRule.from_dict(training["split"])
    recorded = training_data_location(ensemble.info)
    location = data or recorded
    if not location:
        raise InputError(
            f"model.json of {model_location} records no training data location (training.data.location); "
            "give the labelled spectra with --data"
        )
    if data is None:
        _check_recorded_data(model_location, recorded)
    setup = ensemble.setup
    labels = ensemble.label_names
    accumulator = SaliencyAccumulator.empty(len(labels), setup.n_pixels) if saliency else None
    parts: dict[str, list] = {
        "id": [],
        "mean": [],
        "std": [],
        "err": [],
        "true": [],
        "snr": [],
        "flags": [],
        "ood": [],
        "network": [],
    }
    sample = ReferenceSample(MAP_ROWS)
    refused_ids, refused_reasons, refused_sources = [], [], []
    seen: set[str] = set()
    read = in_split = 0
    has_snr = False
    for path, batch in _batches(location, setup, labels, batch_rows):
        read += batch.num_rows
        has_snr = has_snr or "snr" in batch.column_names
        table = batch.filter(split.is_test(batch.column("spectrum_id")))
        if not table.num_rows:
            continue
        in_split += table.num_rows
        ids = table.column("spectrum_id").to_pylist()
        known = np.array([sid in seen for sid in ids])  # duplicates of rows in earlier batches
        seen.update(s for s in ids if s is not None)
        arrays = spectra_arrays(table, setup)
        reasons = validate(
            table, setup, labelled=True, arrays=arrays, known_duplicates=known, label_names=labels
        )
        good = np.array([r is None for r in reasons])
        for i in np.flatnonzero(~good):
            refused_ids.append(ids[i])
            refused_reasons.append(reasons[i])
            refused_sources.append(path)
        if not good.any():
            continue
        flux, mask = model_inputs(arrays, setup)
        prediction = ensemble.predict(
            flux[good], mask[good], accumulator=accumulator, embedding=True, ood=True
        )
        ivar = None  # only the refinement and the calibration's bound need it
        if (refinement is not None or calibration is not None) and all(
            arrays.ivar[arm.name] is not None for arm in setup.arms
        ):
            ivar = np.where(mask, arrays.concatenated(setup)[1], 0.0)[good]
        if refinement is not None:
            if ivar is None:
                raise InputError(
                    f"model {ensemble.model_id} refines its labels by a fit to the spectra, which needs "
                    f"their ivar; {path} has none"
                )
            prediction = refinement.apply(prediction, flux[good], ivar, mask[good])
            network = np.full_like(prediction.mean, np.nan)
            network[:, refinement.kept] = prediction.network_mean[:, refinement.kept]
            parts["network"].append(network)
        table = table.filter(pa.array(good))
        kept_ids = [ids[i] for i in np.flatnonzero(good)]
        sample.add(
            kept_ids,
            prediction.embedding if ensemble.ood is None else ensemble.ood.project(prediction.embedding),
        )
        parts["flags"].append(prediction.model_flags())
        parts["ood"].append(
            prediction.ood_score if prediction.ood_score is not None else np.full(len(kept_ids), np.nan)
        )
        parts["id"] += kept_ids
        parts["mean"].append(prediction.mean)
        parts["std"].append(prediction.std)
        if calibration is not None:
            parts["err"].append(
                prediction_errors(calibration, ensemble.forward, prediction, ivar, mask[good]).err
            )
        parts["true"].append(label_matrix(table, labels))
        parts["snr"].append(_optional_column(table, "snr"))
    if not in_split:
        raise InputError(
            f"none of the {read} rows of {location} falls in the test split of model "
            f"{ensemble.model_id} (rule {split.test_salt!r}, fraction {split.test_fraction:g})"
        )
    n_labels = len(labels)
    quarantined = Counter(r.split(":", 1)[0] for r in refused_reasons)
    embedding_rows, embedding = sample.in_order()
    log.info("evaluate: %d test-split rows of %d read, %d refused", in_split, read, len(refused_ids))
    return Evaluation(
        labels=tuple(labels),
        spectrum_id=np.array(parts["id"], dtype=object),
        predicted=_stack(parts["mean"], n_labels),
        true=_stack(parts["true"], n_labels),
        std=_stack(parts["std"], n_labels) if ensemble.n_members > 1 else None,
        err=_stack(parts["err"], n_labels) if calibration is not None else None,
        snr=np.concatenate(parts["snr"]) if has_snr and parts["snr"] else None,
        setup=setup,
        source={
            "mode": "model",
            "model": model_location,
            "model_id": ensemble.model_id,
            "n_members": ensemble.n_members,
            "data": location,
            "training_data": recorded,
            "split": split.to_dict(),
            # The calibration was fitted on the test split of the training data: on those rows
            # its numbers are in-sample (bench/trust_calibration.py scores it cross-fitted).
            "calibration": None if calibration is None else calibration.fitted_on.get("rows"),
            "refined": None if refinement is None else list(refinement.config.kept),
        },
        rows={
            "read": read,
            "test_split": in_split,
            "evaluated": len(parts["id"]),
            "quarantined": len(refused_ids),
            "quarantine_reasons": dict(sorted(quarantined.items())),
        },
        saliency=accumulator if accumulator is not None and accumulator.count else None,
        quarantine=quarantine_table(refused_ids, refused_reasons, refused_sources) if refused_ids else None,
        flags=np.concatenate(parts["flags"]) if parts["flags"] else np.zeros(0, np.int32),
        ood_score=np.concatenate(parts["ood"]) if parts["ood"] else np.zeros(0),
        embedding_rows=embedding_rows,
        embedding=embedding,
        network=_stack(parts["network"], n_labels) if refinement is not None else None,
    )


def _check_recorded_data(model_location: str, recorded: str) -> None:
    """The training data model.json names is there; else what to do. Models written before the
    location was recorded absolute hold the path as given to `speclabel train`, relative to the
    folder it ran in, which is unknown from here."""
    try:
        resolve_files(recorded, (".parquet",))
    except InputError as exc:
        relative = "://" not in recorded and not os.path.isabs(recorded)
        where = " (relative to the folder `speclabel train` ran in)" if relative else ""
        raise InputError(
            f"{exc}: model.json of {model_location} names it as the training data{where}; "
            "give the labelled spectra with --data"
        ) from exc


def _batches(location: str, setup: Setup, labels, batch_rows: int) -> Iterator[tuple[str, pa.Table]]:
    """``(file, rows)`` of every Parquet file at ``location``, reading only the columns evaluation uses."""
    fs, files = resolve_files(location, (".parquet",))
    wanted = [
        "spectrum_id",
        *(c for arm in setup.arms for c in (arm.flux_column, arm.ivar_column)),
        *labels,
        "snr",
    ]
    for path in files:
        with fs.open_input_file(path) as fh:
            parquet = pq.ParquetFile(fh)
            schema = parquet.schema_arrow
            check_table_columns(schema, setup, labelled=True, source=path, label_names=labels)
            columns = [c for c in wanted if c in schema.names]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                yield path, pa.Table.from_batches([batch])


def _optional_column(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()


def _stack(parts: list[np.ndarray], n_labels: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, n_labels))


# -- a catalogue and a truth table ------------------------------------------------------------------


def read_truth(location: str, labels) -> pa.Table:
    """``spectrum_id``, the true labels found among ``labels``, ``snr`` and ``defect`` (the kind of an
    injected defect, ``speclabel simulate --defects``; when present) of a Parquet file, folder or
    glob; other columns (e.g. the spectra of a simulated survey) are not read."""
    fs, files = resolve_files(location, (".parquet",))
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    names = dataset.schema.names
    if "spectrum_id" not in names:
        raise InputError(f"truth table {location} has no spectrum_id column (it has {names})")
    wanted = [n for n in ("spectrum_id", *labels, "snr", DEFECT_COLUMN) if n in names]
    if len(wanted) == 1 + ("snr" in wanted) + (DEFECT_COLUMN in wanted):
        raise InputError(
            f"truth table {location} has none of the label columns {list(labels)} (it has {names})"
        )
    table = dataset.to_table(columns=wanted)
    if table.column("spectrum_id").null_count:
        raise InputError(f"truth table {location} has rows without a spectrum_id")
    _check_unique(table.column("spectrum_id"), f"truth table {location}", "")
    return table


def _check_unique(ids: pa.ChunkedArray, what: str, hint: str) -> None:
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pa.table({"spectrum_id": ids}).group_by("spectrum_id").aggregate([("spectrum_id", "count")])
    duplicated = counts.filter(pc.field("spectrum_id_count") > 1)
    example = duplicated.column("spectrum_id")[0].as_py()
    raise InputError(
        f"check 'one row per spectrum': {what} has {duplicated.num_rows} spectrum_id(s) on more than "
        f"one row, e.g. {example!r}{hint}"
    )


def from_catalogue(
    catalogue: str,
    truth: str,
    *,
    setup: Setup,
    releases: list[str] | None = None,
    model_id: str | None = None,
    where: str | None = None,
) -> Evaluation:
    """Catalogue rows (selected like ``speclabel query``) joined with true labels on ``spectrum_id``.

    ``setup``: the instrument setup of the labelled spectra: its line windows and the grid of the
    stored population saliency maps.
    """
    cat = open_catalogue(catalogue)
    schema = cat.schema(releases, model_id)
    truth_table = read_truth(truth, label_columns(schema.names))
    labels = tuple(n for n in label_columns(schema.names) if n in truth_table.column_names)
    with_std = all(f"{n}_std" in schema.names for n in labels)
    with_err = all(f"{n}_err" in schema.names for n in labels)
    sal_columns = [c for c in schema.names if c.startswith("sal_")]
    columns = ["spectrum_id", "release", *labels]
    columns += [f"{n}_std" for n in labels] if with_std else []
    columns += [f"{n}_err" for n in labels] if with_err else []
    columns += ["snr"] if "snr" in schema.names else []
    columns += [c for c in ("flags", "ood_score") if c in schema.names]
    refined = [n for n in labels if f"{n}_cnn" in schema.names]  # a model with reference spectra
    columns += [f"{n}_cnn" for n in refined]
    rows = cat.query(where, columns=columns + sal_columns, releases=releases, model_id=model_id)
    _check_unique(
        rows.column("spectrum_id"),
        f"the selected rows of catalogue {catalogue}",
        "; it holds several releases of these spectra: choose one with --release",
    )
    positions = pc.index_in(rows.column("spectrum_id"), value_set=truth_table.column("spectrum_id"))
    matched = np.asarray(positions.is_valid())
    n_matched = int(matched.sum())
    if not n_matched:
        raise InputError(
            f"none of the {rows.num_rows} selected catalogue rows has a spectrum_id in {truth} "
            f"({truth_table.num_rows} rows): is it the truth for this catalogue?"
        )
    joined = rows.filter(pa.array(matched))
    truth_rows = truth_table.take(positions.filter(pa.array(matched)))
    snr = None
    if "snr" in joined.column_names:
        snr = _optional_column(joined, "snr")
    elif "snr" in truth_rows.column_names:
        snr = _optional_column(truth_rows, "snr")
    selected_releases = sorted(pc.unique(rows.column("release")).to_pylist())
    runs = cat.runs(selected_releases or None, model_id) if selected_releases else []
    accumulator = _catalogue_saliency(cat, runs, labels, setup)
    return Evaluation(
        labels=labels,
        spectrum_id=np.array(joined.column("spectrum_id").to_pylist(), dtype=object),
        predicted=label_matrix(joined, labels),
        true=label_matrix(truth_rows, labels),
        std=label_matrix(joined, [f"{n}_std" for n in labels]) if with_std else None,
        err=label_matrix(joined, [f"{n}_err" for n in labels]) if with_err else None,
        snr=snr,
        setup=setup,
        source={
            "mode": "catalogue",
            "catalogue": catalogue,
            "truth": truth,
            "releases": selected_releases,
            "runs": [{"release": r.release, "run_id": r.run_id, "model_id": r.model_id} for r in runs],
            "model_id": model_id,
            "where": where,
        },
        rows={
            "catalogue": rows.num_rows,
            "truth": truth_table.num_rows,
            "matched": n_matched,
            "unmatched_catalogue": rows.num_rows - n_matched,
            "unmatched_truth": truth_table.num_rows - n_matched,
            "evaluated": n_matched,
        },
        saliency=accumulator,
        saliency_row_shares=None if accumulator is not None else _row_shares(joined, labels, setup),
        flags=joined.column("flags").fill_null(0).to_numpy().astype(np.int32)
        if "flags" in joined.column_names
        else None,
        ood_score=_optional_column(joined, "ood_score") if "ood_score" in joined.column_names else None,
        defect=np.array(truth_rows.column(DEFECT_COLUMN).to_pylist(), dtype=object)
        if DEFECT_COLUMN in truth_rows.column_names
        else None,
        # _optional_column gives NaN for a label without a _cnn column: one the model did not refine.
        network=np.stack([_optional_column(joined, f"{n}_cnn") for n in labels], axis=1) if refined else None,
    )


def _row_shares(rows: pa.Table, labels, setup: Setup) -> dict[str, dict[str, float]] | None:
    """Mean over rows of each ``sal_<label>_<group>`` summary column that the catalogue has."""
    out = {}
    for label in labels:
        shares = {}
        for group in setup.line_windows:
            column = saliency_column(label, group)
            if column in rows.column_names:
                values = rows.column(column).cast(pa.float64()).fill_null(np.nan).to_numpy()
                if np.isfinite(values).any():
                    shares[group] = float(np.nanmean(values))
        if shares:
            out[label] = shares
    return out or None


def _catalogue_saliency(cat, runs, labels, setup: Setup) -> SaliencyAccumulator | None:
    """The population saliency sums the label job stored for the selected runs, merged (none: None)."""
    from .population import read_run_saliency

    merged = None
    for run in runs:
        accumulator = read_run_saliency(cat.dataset, run.release, run.run_id, labels, setup)
        if accumulator is not None:
            merged = accumulator if merged is None else merged.merge(accumulator)
    return merged
