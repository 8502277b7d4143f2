"""The population saliency sums a labelling run stored beside its release, read for the report.

``speclabel label`` (``pipeline.labelling.outputs.population_table``) stores, per published run,
the merged :class:`~speclabel.model.saliency.SaliencyAccumulator` of every spectrum it labelled::

    CATALOGUE/_population_saliency/release=<R>/run=<run>/*.parquet

one row per label: ``label``, ``count``, ``wave`` (the model's grid, Angstrom), ``mean``,
``mean_abs`` (float32, for plotting) and the exact float64 ``sum`` and ``sum_abs`` they came from.
The report uses the exact sums; files of one run merge by addition, like the accumulators.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from speclabel.core.errors import IntegrityError
from speclabel.core.setups import Setup
from speclabel.model.saliency import SaliencyAccumulator

from ..publish import Dataset


def read_run_saliency(
    dataset: Dataset, release: str, run_id: str, labels, setup: Setup
) -> SaliencyAccumulator | None:
    """The run's population sums, rows in the order of ``labels``; None when the run stored none.

    ``setup`` must be the grid the maps are on: a run labelled on another grid is refused, since its
    window masks would point at the wrong pixels.
    """
    folder = dataset.population_saliency_dir(release, run_id)
    merged = None
    for path in (p for p in dataset.files_under(folder) if p.endswith(".parquet")):
        with dataset.fs.open_input_file(path) as fh:
            table = pq.read_table(fh, columns=["label", "count", "wave", "sum", "sum_abs"])
        stored = table.column("label").to_pylist()
        missing = [n for n in labels if n not in stored]
        if missing:
            raise IntegrityError(f"check 'saliency labels': {path} holds labels {stored}, not {missing}")
        rows = [stored.index(n) for n in labels]
        wave = np.asarray(table.column("wave")[rows[0]].as_py())
        if wave.shape != setup.wave.shape or not np.allclose(wave, setup.wave, rtol=0, atol=1e-6):
            raise IntegrityError(
                f"check 'saliency grid': {path} holds maps on a grid of {wave.size} pixels "
                f"({wave[0]:.2f}-{wave[-1]:.2f} Å), not on setup {setup.name!r} ({setup.n_pixels} pixels); "
                "give the setup the catalogue was labelled with (--setup)"
            )
        accumulator = SaliencyAccumulator(
            np.stack([np.asarray(table.column("sum")[i].as_py(), np.float64) for i in rows]),
            np.stack([np.asarray(table.column("sum_abs")[i].as_py(), np.float64) for i in rows]),
            int(table.column("count")[rows[0]].as_py()),
        )
        merged = accumulator if merged is None else merged.merge(accumulator)
    return merged
