"""Population saliency sums stored beside a catalogue release, for the evaluation's saliency maps.

A labelling run can store the merged :class:`~speclabel.model.saliency.SaliencyAccumulator` of all
the spectra it labelled, one file per writer (workers merge by addition)::

    CATALOGUE/_saliency/release=<R>/run=<run>/population-<part>.npz

Each file holds ``sum`` and ``sum_abs`` ([n_labels, n_pixels] float64), ``count`` (int64), ``labels``
(the label names, in row order) and ``setup`` (the setup as JSON: the pixel grid of the maps). The
``.npz`` suffix keeps them apart from the full-map Parquet files in the same folder, and they are
read with ``allow_pickle=False``: nothing in a catalogue can execute code.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np

from ...model.saliency import SaliencyAccumulator
from ..errors import IntegrityError
from ..publish import Dataset
from ..setups import Setup
from ..storage import write_bytes_atomic

PREFIX = "population-"
SUFFIX = ".npz"


def run_saliency_dir(dataset: Dataset, release: str, run_id: str) -> str:
    return dataset.path("_saliency", f"release={release}", f"run={run_id}")


def saliency_file_bytes(accumulator: SaliencyAccumulator, labels, setup: Setup) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        **accumulator.to_arrays(),
        labels=np.array(list(labels), dtype=str),
        setup=np.array(json.dumps(setup.to_dict())),
    )
    return buffer.getvalue()


def write_run_saliency(
    dataset: Dataset,
    release: str,
    run_id: str,
    accumulator: SaliencyAccumulator,
    labels,
    setup: Setup,
    *,
    part="0",
) -> str:
    """Store one writer's population sums of a run; returns the file's path."""
    path = f"{run_saliency_dir(dataset, release, run_id)}/{PREFIX}{part}{SUFFIX}"
    write_bytes_atomic(dataset.fs, path, saliency_file_bytes(accumulator, labels, setup))
    return path


def read_run_saliency(
    dataset: Dataset, release: str, run_id: str, labels
) -> tuple[SaliencyAccumulator, Setup] | None:
    """The merged population sums of a run, rows in the order of ``labels``; None when it stored none."""
    folder = run_saliency_dir(dataset, release, run_id)
    files = [
        p
        for p in dataset._files_under(folder)
        if p.rsplit("/", 1)[-1].startswith(PREFIX) and p.endswith(SUFFIX)
    ]
    merged, setup = None, None
    for path in files:
        accumulator, file_setup = _read_file(dataset, path, labels)
        if setup is not None and not setup.same_grid(file_setup):
            raise IntegrityError(
                f"check 'saliency grid': {path} is on another grid than the run's other files"
            )
        setup = file_setup
        merged = accumulator if merged is None else merged.merge(accumulator)
    return None if merged is None else (merged, setup)


def _read_file(dataset: Dataset, path: str, labels) -> tuple[SaliencyAccumulator, Setup]:
    with dataset.fs.open_input_stream(path) as fh:
        data = fh.read()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("sum", "sum_abs", "count", "labels", "setup")}
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise IntegrityError(
            f"check 'saliency file': {path} is not a population saliency file: {exc}"
        ) from exc
    stored = [str(s) for s in arrays["labels"]]
    missing = [n for n in labels if n not in stored]
    if missing:
        raise IntegrityError(f"check 'saliency labels': {path} holds labels {stored}, not {missing}")
    order = [stored.index(n) for n in labels]
    setup = Setup.from_dict(json.loads(str(arrays["setup"])))
    accumulator = SaliencyAccumulator.from_arrays(
        {"sum": arrays["sum"][order], "sum_abs": arrays["sum_abs"][order], "count": arrays["count"]}
    )
    if accumulator.sum.shape[1] != setup.n_pixels:
        raise IntegrityError(
            f"check 'saliency grid': {path} has maps of {accumulator.sum.shape[1]} pixels, its setup "
            f"{setup.name!r} has {setup.n_pixels}"
        )
    return accumulator, setup
