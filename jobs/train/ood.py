"""The post-training fit of the out-of-distribution reference (``model/ood.py``): the training rows'
embeddings, once the members are assembled.

The training rows are the used rows outside the common test split (any member's train + validation
rows: the rows the members learnt from). The settings (``[ood]`` in model.toml, ``OODConfig``) are
not part of the run's identity (``job.json``), so a rerun of a finished run refits the reference
without retraining a member.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from speclabel.core.errors import InputError
from speclabel.core.reporting import Reporter
from speclabel.model.ensemble import Ensemble
from speclabel.model.ood import OODConfig, fit_embedding_reference
from speclabel.model.splits import SplitRule
from speclabel.pipeline.training_data import InMemoryRows

BATCH_ROWS = 256


def pool_embeddings(
    ensemble: Ensemble, rows, split: SplitRule, batch_rows: int = BATCH_ROWS
) -> Iterator[tuple[Sequence[str], np.ndarray]]:
    """``(keys, embeddings)`` of the training rows, batch by batch. In memory the keys are the
    rows' ``spectrum_id``; streamed rows carry no id, so there they are the row's position in the
    (order-preserving) stream."""
    if isinstance(rows, InMemoryRows):
        arrays = rows.arrays
        pool = np.flatnonzero(~split.is_test(arrays["spectrum_id"]))
        for start in range(0, len(pool), batch_rows):
            take = pool[start : start + batch_rows]
            prediction = ensemble.predict(arrays["flux"][take], arrays["mask"][take], embedding=True)
            yield [str(arrays["spectrum_id"][i]) for i in take], prediction.embedding
        return
    position = 0
    for part in rows.member(split, 0):
        for batch in part.batches(0, batch_rows, None):
            prediction = ensemble.predict(batch["flux"], batch["mask"], embedding=True)
            n = prediction.embedding.shape[0]
            yield [f"row-{position + i}" for i in range(n)], prediction.embedding
            position += n


def fit_ood(ensemble: Ensemble, rows, split: SplitRule, config: OODConfig, reporter: Reporter) -> None:
    """Fit the embedding reference on the training rows and attach it to ``ensemble``."""
    began = time.perf_counter()
    try:
        ensemble.ood = fit_embedding_reference(pool_embeddings(ensemble, rows, split), config)
    except InputError as exc:
        ensemble.ood = None
        reporter.line(f"train: no out-of-distribution reference ({exc}): catalogue rows get no ood_score")
        return
    reference = ensemble.ood
    reporter.line(
        f"train: out-of-distribution reference of {reference.points.shape[0]} of {reference.n_fitted} "
        f"training rows ({reference.components.shape[0]} components, k = {reference.k}, flag above the "
        f"{reference.threshold:g}th percentile; {time.perf_counter() - began:.0f} s)"
    )
