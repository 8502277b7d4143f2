"""The post-training fit of the label refinement (``model/refine.py``): ``speclabel train
--reference-spectra PATH`` stores noise-free reference spectra in the model, with the fit's settings
(``[refine]`` in model.toml) and an error calibration of the refined labels.

* Reference spectra: read by ``pipeline.reference_spectra`` (rows of the common test split left
  out, every row accounted for).
* Prior widths (how far the network's labels may be off), unless ``[refine] prior_width`` sets
  them: each label's validation scatter, the median over the members. That is one member's error on
  stars it did not train on, at every S/N, measured on training-pool rows only, and what
  ``bench/cv_refine.py`` measured the fit with (the one-member cross-validated scatter).
* Calibration: the refined labels' ``<label>_err``, fitted like the network's
  (``model.calibration``) on the common test split with the refined labels in place of the
  network's; and their test metrics, model.json ``metrics.test_refined``.

Like the other post-training fits these settings are outside the run's identity: rerunning a
finished run with ``--reference-spectra`` adds the refinement to its model without retraining.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from speclabel.core.errors import ConfigError, InputError
from speclabel.core.reporting import Reporter
from speclabel.model.calibration import calibrate_ensemble
from speclabel.model.ensemble import Ensemble
from speclabel.model.fit import test_metrics
from speclabel.model.refine import RefineConfig, Refinement
from speclabel.model.splits import SplitRule
from speclabel.pipeline.reference_spectra import read_reference_spectra

from .tables import calibration_text

BATCH_ROWS = 256


def validation_scatter(ensemble: Ensemble) -> tuple[float, ...]:
    """Each label's validation scatter, the median over the members (see the module docstring)."""
    widths = {}
    for name in ensemble.label_names:
        values = [m.get("validation", {}).get(name, {}).get("scatter") for m in ensemble.member_info]
        finite = [v for v in values if v is not None and np.isfinite(v) and v > 0]
        if not finite:  # no member had validation rows with this label
            raise ConfigError(
                f"no member has a validation scatter of {name}: set the refinement's prior widths "
                "([refine] prior_width in --config) and rerun; the members are kept"
            )
        widths[name] = float(np.median(finite))
    return tuple(widths.values())


def refine_config(ensemble: Ensemble, config: RefineConfig) -> RefineConfig:
    """``config`` with the prior widths from the validation scatter where not given (the default
    labels are narrowed to the model's by ``Refinement`` itself)."""
    if config.prior_width:
        return config
    return dataclasses.replace(config, prior_width=validation_scatter(ensemble))


def fit_refinement(
    ensemble: Ensemble,
    rows,
    split: SplitRule,
    reference_spectra: str | None,
    config: RefineConfig,
    reporter: Reporter,
) -> None:
    """Attach the refinement of ``reference_spectra`` (None: the model has none) to ``ensemble``,
    with its calibration and test metrics (after the network's own calibration)."""
    ensemble.refinement = None
    ensemble.info.get("metrics", {}).pop("test_refined", None)
    if reference_spectra is None:
        return
    began = time.perf_counter()
    reference = read_reference_spectra(reference_spectra, ensemble.setup, ensemble.label_names, split)
    refinement = Refinement(reference.library, refine_config(ensemble, config), reference.source)
    try:
        calibration = calibrate_ensemble(
            ensemble,
            rows.test_batches(split, BATCH_ROWS),
            refinement=refinement,
            fitted_on={"rows": "common test split", "labels": "refined"},
        )
    except InputError as exc:
        calibration = None
        reporter.line(
            f"train: no calibration of the refined labels ({exc}): refined rows get null <label>_err"
        )
    refinement = dataclasses.replace(refinement, calibration=calibration)
    ensemble.refinement = refinement
    test = test_metrics(ensemble, rows.test_batches(split, BATCH_ROWS), refinement=refinement)
    if test is not None:
        ensemble.info.setdefault("metrics", {})["test_refined"] = test
    widths = ", ".join(
        f"{n} {w:.3g}" for n, w in zip(ensemble.label_names, refinement.config.prior_width, strict=True)
    )
    reporter.line(
        f"train: label refinement of {', '.join(refinement.config.kept)} against reference spectra "
        f"{reference_spectra}: {reference.summary()}; prior widths {widths} "
        f"({time.perf_counter() - began:.0f} s)"
    )
    if calibration is not None:
        reporter.line(f"train: error calibration of the refined labels {calibration_text(calibration)}")
