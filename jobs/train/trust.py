"""What ``speclabel train`` fits after the members are assembled, so that each catalogue row can say
how far to trust it: one function per fit, called in order by :func:`fit_trust`.

* :func:`fit_forward`: the data-driven forward model (``model/forward.py``) on the training rows,
  the used rows outside the common test split (the rows the members learnt from).
* :func:`fit_ood` (``jobs/train/ood.py``): the out-of-distribution reference of the training rows'
  embeddings;
* :func:`fit_calibration`: the error model of ``<label>_err`` (``model/calibration.py``) on the
  common test split, the only rows no member trained on: the ensemble's mean and std of each row,
  the forward model's bound at its predicted labels, the members' predicted error and the row's
  distance from the training set (the reference fitted before it); stored as model.json
  ``calibration``;
* :func:`fit_refinement` (``jobs/train/refine.py``): with ``--reference-spectra``, the label
  refinement's reference spectra, settings and its own calibration of the refined labels.

These fits read the rows the members were trained on (in memory or streamed again) but none of their
settings enter the run's identity (``job.json``): rerunning the same command on a finished run keeps
every member and only refits these, so an existing model gains them without retraining.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from speclabel.core.errors import InputError
from speclabel.core.reporting import Reporter
from speclabel.model.calibration import CALIBRATION_KEY, calibrate_ensemble
from speclabel.model.ensemble import Ensemble
from speclabel.model.forward import Batch, TooFewRows, array_batches, fit_forward_model_batches
from speclabel.model.ood import OODConfig
from speclabel.model.refine import RefineConfig
from speclabel.model.splits import SplitRule
from speclabel.pipeline.training_data import InMemoryRows, StreamingRows

from .ood import fit_ood
from .refine import fit_refinement
from .tables import calibration_text

BATCH_ROWS = 256


def training_pool_batches(
    rows: InMemoryRows | StreamingRows, split: SplitRule
) -> Callable[[], Iterator[Batch]]:
    """The used rows outside the common test split that have every label (a row missing one cannot
    place its spectrum in label space) as ``(flux, ivar, good, labels)`` batches, the same rows in the
    same order on every call (the fit reads them several times)."""
    if isinstance(rows, InMemoryRows):
        arrays = rows.arrays
        labelled = np.isfinite(arrays["labels"]).all(axis=1)
        pool = np.flatnonzero(~split.is_test(arrays["spectrum_id"]) & labelled)
        return array_batches(arrays["flux"], arrays["ivar"], arrays["mask"], arrays["labels"], pool)

    def streamed() -> Iterator[Batch]:
        # The pool is any member's train + val rows; order is preserved and nothing is shuffled.
        for part in rows.member(split, 0):
            for batch in part.batches(0, BATCH_ROWS, None):
                keep = np.isfinite(batch["labels"]).all(axis=1)
                yield batch["flux"][keep], batch["ivar"][keep], batch["mask"][keep], batch["labels"][keep]

    return streamed


def fit_forward(ensemble: Ensemble, rows, split: SplitRule, reporter: Reporter) -> None:
    """Fit the forward model on the training rows and attach it to ``ensemble``."""
    began = time.perf_counter()
    setup = ensemble.setup
    try:
        forward, _ = fit_forward_model_batches(
            training_pool_batches(rows, split),
            ensemble.label_names,
            [arm.name for arm in setup.arms],
            [arm.n_pixels for arm in setup.arms],
        )
    except TooFewRows as exc:
        ensemble.forward = None
        reporter.line(f"train: no forward model ({exc}): its catalogue rows get no chi2 and no anomaly flag")
        return
    ensemble.forward = forward
    thresholds = ", ".join(f"{key} {value:.2f}" for key, value in forward.chi2_threshold.items())
    reporter.line(
        f"train: forward model on {forward.fit['rows']} training rows ({forward.fit['clipped']} clipped as "
        f"outliers), median chi2 {forward.fit['median_chi2']:.2f}, anomaly thresholds {thresholds} "
        f"({time.perf_counter() - began:.0f} s)"
    )


def fit_calibration(ensemble: Ensemble, rows, split: SplitRule, reporter: Reporter) -> None:
    """Fit the error calibration on the common test split (after :func:`fit_forward` and
    :func:`fit_ood`, whose bound and distance it uses) into ``ensemble.info``; a split too small
    for it leaves the model without one."""
    began = time.perf_counter()
    ensemble.info.pop(CALIBRATION_KEY, None)
    try:
        calibration = calibrate_ensemble(
            ensemble, rows.test_batches(split, BATCH_ROWS), fitted_on={"rows": "common test split"}
        )
    except InputError as exc:
        reporter.line(f"train: no error calibration ({exc}): its catalogue rows get null <label>_err")
        return
    ensemble.info[CALIBRATION_KEY] = calibration.to_dict()
    reporter.line(
        f"train: error calibration {calibration_text(calibration)} ({time.perf_counter() - began:.0f} s)"
    )


def fit_trust(
    ensemble: Ensemble,
    rows,
    split: SplitRule,
    reporter: Reporter,
    ood: OODConfig | None = None,
    reference_spectra: str | None = None,
    refine: RefineConfig | None = None,
) -> None:
    """Every post-training fit, in order (later ones use earlier ones); ``ood``: the settings of
    the embedding reference (``[ood]`` in model.toml); ``reference_spectra`` and ``refine``: the
    label refinement's (``--reference-spectra``, ``[refine]``; none without reference spectra)."""
    fit_forward(ensemble, rows, split, reporter)
    fit_ood(ensemble, rows, split, ood or OODConfig(), reporter)
    fit_calibration(ensemble, rows, split, reporter)
    fit_refinement(ensemble, rows, split, reference_spectra, refine or RefineConfig(), reporter)
