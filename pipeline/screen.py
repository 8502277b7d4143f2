"""Screening a training set for spectra that should not teach the model (``speclabel screen``).

What the seed paper did by eye on a t-SNE map, done with the forward model (``model/forward.py``):
fit it on every valid training row, with iterative clipping of outlier spectra so that bad rows
do not shape the model that is to find them, then test each row two ways:

* ``chi2``: its reduced chi^2 against the model spectrum at its *given* labels, in total (the exact
  leave-one-out value of the fit, as if the fit had not seen the row) and per arm (in-sample),
  beyond the fit's clipping limit (``CLIP_SIGMA`` robust standard deviations above the median
  chi^2 of all rows). A binary, emission, a cosmic ray or a bad continuum is a spectrum no labels
  explain.
* ``label_residual``: the labels the forward model fits to the spectrum (``ForwardModel.fit_labels``)
  against the given labels, in units of the Cramér-Rao bound of each label
  (``ForwardModel.label_bound``, so that a noisy spectrum may differ more), divided by the robust
  scatter (1.4826 MAD) of that ratio over the rows the fit kept: beyond :data:`LABEL_SIGMA` a label
  is one the spectrum contradicts (a wrong label, a mixed-up id).

Rows the training job would quarantine are counted by reason (the train job's own scan,
``pipeline.training_data``) and not screened. The listed rows, with a ``reason`` per row naming
each test failed with its value and threshold, are what ``speclabel train --exclude`` takes.

The screen holds the valid rows as arrays (the train job's in-memory mode): a training set is a
few thousand to a few hundred thousand spectra.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import Setup
from speclabel.model.forward import (
    CLIP_PASSES,
    CLIP_SIGMA,
    TOTAL,
    ForwardModel,
    array_batches,
    clip_limit,
    fit_forward_model_batches,
)
from speclabel.pipeline.training_data import resolve_input, scan_in_memory

CHI2 = "chi2"
LABEL_RESIDUAL = "label_residual"
TESTS = (CHI2, LABEL_RESIDUAL)
# A label residual beyond this many robust standard deviations of the training rows' residuals
# (the residuals have wider tails than a Gaussian: at 5, 2 % of clean simulated rows were listed;
# mixed-up ids lie beyond 7).
LABEL_SIGMA = 6.0


@dataclass
class ScreenResult:
    """The listed rows (:meth:`table`) and the accounting of every input row."""

    listed: pa.Table  # spectrum_id, reason, chi2, chi2_<arm>, <label>_residual, <label>, <label>_fit
    n_input: int
    n_screened: int  # valid rows with every label: the forward model was fitted on and tested them
    quarantined: dict[str, int]  # rows the train job would quarantine, by reason code
    forward: ForwardModel
    chi2_limits: dict[str, float]  # "total" and per arm: the chi2 beyond which a row is listed
    label_scatter: dict[str, float]  # per label: robust scatter of (fit - given) / bound, the residual's unit
    n_partly_labelled: int = 0  # valid rows missing some labels: trained, not screened

    def counts_by_test(self) -> dict[str, int]:
        """Listed rows per test (a row failing both counts in both)."""
        counts = collections.Counter(
            part.split(":", 1)[0]
            for reason in self.listed.column("reason").to_pylist()
            for part in reason.split("; ")
        )
        return {test: counts.get(test, 0) for test in TESTS}

    def summary(self) -> str:
        by_test = ", ".join(f"{test} {n}" for test, n in self.counts_by_test().items())
        quarantined = sum(self.quarantined.values())
        partly = self.n_partly_labelled
        partly = f" + {partly} missing some labels (not screened)" if partly else ""
        return (
            f"screen: {self.n_input} in = {self.n_screened} screened{partly} + {quarantined} quarantined "
            f"{self.quarantined or ''}; {self.listed.num_rows} listed ({by_test})"
        )


def screen_training_data(location: str, setup: Setup, *, label_sigma: float = LABEL_SIGMA) -> ScreenResult:
    """Screen the labelled spectra at ``location`` (as ``speclabel train --data`` takes them)."""
    training_set, rows = scan_in_memory(resolve_input(location, setup), setup)
    arrays = rows.arrays
    # A row missing some labels trains the others, but cannot be placed in label space to be tested.
    complete = np.isfinite(arrays["labels"]).all(axis=1)
    result = screen_arrays(
        *(arrays[key][complete] for key in ("spectrum_id", "flux", "ivar", "mask", "labels")),
        setup,
        label_sigma=label_sigma,
    )
    result.n_input = training_set.n_input
    result.n_partly_labelled = int((~complete).sum())
    result.quarantined = training_set.quarantined_by_reason()
    return result


def screen_arrays(
    spectrum_id,
    flux,
    ivar,
    good,
    labels,
    setup: Setup,
    *,
    label_sigma: float = LABEL_SIGMA,
    iterations: int = CLIP_PASSES,
) -> ScreenResult:
    """Screen training arrays (flux/ivar/good ``[N, P]`` in setup arm order, labels ``[N, L]``)."""
    arm_names = [arm.name for arm in setup.arms]
    forward, loo_total = fit_forward_model_batches(
        array_batches(flux, ivar, good, labels),
        LABEL_NAMES,
        arm_names,
        [arm.n_pixels for arm in setup.arms],
        iterations=iterations,
    )
    chi2 = forward.chi2(flux, ivar, good, labels)
    chi2[TOTAL] = loo_total
    # The fit's own clipping rule on the final chi^2: robust, where the model's anomaly thresholds
    # (a high quantile of the kept rows) follow whatever tail the kept rows still have.
    chi2_limits = {key: clip_limit(values, CLIP_SIGMA) for key, values in chi2.items()}
    with np.errstate(invalid="ignore"):
        clean = ~np.any([chi2[key] > limit for key, limit in chi2_limits.items()], axis=0)
    fitted = forward.fit_labels(flux, ivar, good, start=labels)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (fitted - labels) / forward.label_bound(labels, ivar, good)
    ratio = np.where(np.isfinite(ratio), ratio, 0.0)  # a label the spectrum cannot say anything about
    # The robust scatter over the rows that are clean by chi2: bad spectra must not widen it.
    reference = ratio[clean] if clean.sum() > 1 else ratio
    scatter = 1.4826 * np.median(np.abs(reference - np.median(reference, axis=0)), axis=0)
    residual = ratio / np.where(scatter > 0, scatter, np.inf)

    reasons = []
    for i in range(len(labels)):
        parts = [
            f"{CHI2}: {key} {chi2[key][i]:.3g} > {limit:.3g}"
            for key, limit in chi2_limits.items()
            if chi2[key][i] > limit
        ]
        parts += [
            f"{LABEL_RESIDUAL}: {name} {residual[i, k]:+.3g} sigma beyond {label_sigma:g}"
            for k, name in enumerate(LABEL_NAMES)
            if abs(residual[i, k]) > label_sigma
        ]
        reasons.append("; ".join(parts) or None)
    listed = np.array([r is not None for r in reasons], dtype=bool)
    columns = {
        "spectrum_id": pa.array(np.asarray(spectrum_id, dtype=object)[listed].tolist(), pa.string()),
        "reason": pa.array([r for r in reasons if r is not None], pa.string()),
        "chi2": pa.array(chi2[TOTAL][listed], pa.float64()),
        **{f"chi2_{arm}": pa.array(chi2[arm][listed], pa.float64()) for arm in arm_names},
        **{
            f"{name}_residual": pa.array(residual[listed, k], pa.float64())
            for k, name in enumerate(LABEL_NAMES)
        },
        **{name: pa.array(labels[listed, k], pa.float64()) for k, name in enumerate(LABEL_NAMES)},
        **{f"{name}_fit": pa.array(fitted[listed, k], pa.float64()) for k, name in enumerate(LABEL_NAMES)},
    }
    return ScreenResult(
        listed=pa.table(columns),
        n_input=len(labels),
        n_screened=len(labels),
        quarantined={},
        forward=forward,
        chi2_limits=chi2_limits,
        label_scatter={name: float(s) for name, s in zip(LABEL_NAMES, scatter, strict=True)},
    )
