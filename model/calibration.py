"""The calibrated total uncertainty of each label: an error model fitted on rows no member trained on.

The ensemble std says how much the members disagree, not how far a label is from the truth: on
spectra the model never saw it is 2-10x smaller than the actual error, and it cannot see a label that
the spectrum does not constrain (the Al I lines of a hot metal-poor dwarf all but vanish and every
member predicts the training mean). The total 1-sigma error of label ``k`` of a row is modelled as

    err^2 = (a * std)^2 + (b * p)^2 + c^2,   p = bound / sqrt(1 + (bound / w)^2)

``std``: the ensemble std; ``bound``: the forward model's Cramér-Rao bound at the predicted labels
(``model.forward.ForwardModel.label_bound``: what the spectrum can say about the label, large where
its lines vanish, growing with the noise); ``w``: the label's spread in the training set. ``p`` is
the width of the posterior of a Gaussian likelihood of width ``bound`` under a Gaussian prior of
width ``w``: a label the spectrum says nothing about is as uncertain as the training labels, not
infinitely so (the network then predicts near the training mean). ``a``, ``b``, ``c`` >= 0 per label
are fitted by Gaussian maximum likelihood (the residuals of the fitting rows as N(0, err^2)).

Where it is fitted (``speclabel train``): on the common test split, the only rows no member trained
on or selected its weights on (each member's validation split differs, so every other row was seen
by some member, whose error there is too small). Three parameters per label fit well on a hundred
rows, so spending no extra rows on a dedicated calibration split costs nothing in accuracy; the
benchmark (``bench/trust_calibration.py``) scores it cross-fitted, never on the rows it was fitted on.

Stored as ``model.json`` "calibration" (:meth:`ErrorCalibration.to_dict`, versioned), so that the
model_id covers it; a model without one loads as before and its rows get null ``<label>_err``.
Without a forward model the fit drops the bound term (``uses_bound`` false).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from speclabel.core.errors import ConfigError, InputError, IntegrityError

CALIBRATION_VERSION = 1
FORM = "err^2 = (a*std)^2 + (b*p)^2 + c^2, p = bound / sqrt(1 + (bound/prior_width)^2)"
# Below this many usable rows a label's three parameters are not worth fitting.
MIN_ROWS = 20
# The constant term's smallest variance, as a fraction of the mean squared residual: keeps every
# row's variance positive where std and bound are both ~0.
MIN_FLOOR = 1e-6


@dataclass(frozen=True)
class LabelErrorModel:
    """The fitted parameters of one label (physical units of that label for ``c`` and ``prior_width``)."""

    a: float  # multiplies the ensemble std
    b: float  # multiplies the prior-capped forward-model bound
    c: float  # the floor: error that neither term explains
    prior_width: float  # w: the training labels' standard deviation

    def variance(self, std: np.ndarray, bound: np.ndarray | None) -> np.ndarray:
        out = (self.a * np.asarray(std, dtype=np.float64)) ** 2 + self.c**2
        if bound is not None and self.b > 0:
            out = out + (self.b * capped_bound(bound, self.prior_width)) ** 2
        return out


def capped_bound(bound: np.ndarray, prior_width: float) -> np.ndarray:
    """``p`` of the module docstring: ``bound`` combined with a Gaussian prior of ``prior_width``."""
    bound = np.asarray(bound, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(np.isposinf(bound), prior_width, bound / np.sqrt(1.0 + (bound / prior_width) ** 2))


@dataclass(frozen=True)
class ErrorCalibration:
    """Per-label error models (see the module docstring) and what they were fitted on."""

    label_names: tuple[str, ...]
    labels: Mapping[str, LabelErrorModel]
    uses_bound: bool
    fitted_on: dict = field(default_factory=dict)
    version: int = CALIBRATION_VERSION

    def __post_init__(self) -> None:
        missing = [n for n in self.label_names if n not in self.labels]
        if missing:
            raise ConfigError(f"calibration lacks parameters for {missing}")

    def total_error(self, std: np.ndarray, bound: np.ndarray | None = None) -> np.ndarray:
        """The calibrated 1-sigma error ``[N, L]`` (float64) of rows with ensemble ``std`` ``[N, L]`` and,
        when the calibration uses it, the forward-model ``bound`` ``[N, L]``; NaN where an input is."""
        std = np.asarray(std, dtype=np.float64)
        if std.ndim != 2 or std.shape[1] != len(self.label_names):
            raise InputError(f"std of shape {std.shape} does not fit the calibration's {self.label_names}")
        if self.uses_bound:
            if bound is None:
                raise InputError("this calibration uses the forward-model bound: pass bound")
            bound = np.asarray(bound, dtype=np.float64)
            if bound.shape != std.shape:
                raise InputError(f"bound of shape {bound.shape} does not match std {std.shape}")
        out = np.empty_like(std)
        for k, name in enumerate(self.label_names):
            term = bound[:, k] if self.uses_bound else None
            out[:, k] = np.sqrt(self.labels[name].variance(std[:, k], term))
        return out

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "form": FORM,
            "names": list(self.label_names),
            "uses_bound": self.uses_bound,
            "labels": {
                n: {"a": m.a, "b": m.b, "c": m.c, "prior_width": m.prior_width}
                for n, m in self.labels.items()
            },
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ErrorCalibration:
        version = data.get("version") if isinstance(data, Mapping) else None
        if version != CALIBRATION_VERSION:
            raise IntegrityError(
                f"check 'calibration version': the model's calibration has version {version!r}, this "
                f"speclabel reads version {CALIBRATION_VERSION}"
            )
        try:
            names = tuple(data["names"])
            labels = {
                n: LabelErrorModel(**{k: float(data["labels"][n][k]) for k in ("a", "b", "c", "prior_width")})
                for n in names
            }
            return cls(names, labels, bool(data["uses_bound"]), dict(data.get("fitted_on", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"check 'calibration': invalid calibration in model.json: {exc!r}") from exc


CALIBRATION_KEY = "calibration"  # the model.json section (Ensemble.info key)


def model_calibration(info: Mapping) -> ErrorCalibration | None:
    """The calibration a model's ``Ensemble.info`` holds, or None (a model from before calibration)."""
    data = info.get(CALIBRATION_KEY)
    return None if data is None else ErrorCalibration.from_dict(data)


def prior_widths(ensemble) -> np.ndarray:
    """``w`` of each label: the training labels' standard deviation, as the forward model holds it
    (its label scale). Without a forward model the bound term is dropped and ``w`` unused; the
    label scaling's scale stands in."""
    forward = getattr(ensemble, "forward", None)
    return np.asarray(forward.label_scale if forward is not None else ensemble.scaler.scale, dtype=np.float64)


def row_errors(
    calibration: ErrorCalibration,
    forward,
    mean: np.ndarray,
    std: np.ndarray,
    ivar: np.ndarray | None,
    good: np.ndarray,
) -> np.ndarray:
    """The calibrated err ``[N, L]`` of rows labelled ``mean`` with ensemble ``std``: the forward
    model's bound (``forward.label_bound``) at the predicted labels, from the rows' ``ivar`` and
    ``good`` pixels, where the calibration uses it; NaN rows where it does and the model has no
    forward model (None) or the spectra no ivar (None)."""
    if not calibration.uses_bound:
        return calibration.total_error(std)
    if forward is None or ivar is None:
        return np.full(np.shape(std), np.nan)
    return calibration.total_error(std, forward.label_bound(mean, ivar, good))


def errors_or_std(err: np.ndarray | None, std: np.ndarray) -> np.ndarray:
    """Each label's uncertainty ``[N, L]``: the calibrated ``err`` where known (``err`` None: a model
    without a calibration), else the ensemble ``std`` (too small, but better than none). What the
    anomaly check propagates into the pixel variances (``ForwardModel.chi2(..., label_error)``) and
    what ``speclabel suggest`` scores."""
    std = np.asarray(std, dtype=np.float64)
    return std if err is None else np.where(np.isfinite(err), np.asarray(err, dtype=np.float64), std)


def calibrate_ensemble(
    ensemble, batches: Iterable[Mapping[str, np.ndarray]], *, fitted_on: Mapping | None = None
) -> ErrorCalibration:
    """Fit the calibration of ``ensemble`` (with its ``forward`` model, if any) on ``batches`` of
    rows no member trained on: dicts with ``flux``, ``mask``, ``labels`` and ``ivar``, as
    ``TrainingRows.test_batches`` gives the common test split. Each row's ensemble mean and std, and
    the forward model's bound at the predicted labels, are the inputs of :func:`fit_error_calibration`."""
    forward = getattr(ensemble, "forward", None)
    residual, std, bound = [], [], []
    for batch in batches:
        if not len(batch["labels"]):
            continue
        prediction = ensemble.predict(batch["flux"], batch["mask"])
        residual.append(prediction.mean - np.asarray(batch["labels"], dtype=np.float64))
        std.append(prediction.std)
        if forward is not None:
            bound.append(forward.label_bound(prediction.mean, batch["ivar"], batch["mask"]))
    if not residual:
        raise InputError("no rows to calibrate the errors on")
    return fit_error_calibration(
        np.concatenate(residual),
        np.concatenate(std) if ensemble.n_members > 1 else None,
        np.concatenate(bound) if forward is not None else None,
        ensemble.label_names,
        prior_widths(ensemble),
        fitted_on={**dict(fitted_on or {}), "n_rows": int(sum(len(r) for r in residual))},
    )


def fit_error_calibration(
    residual: np.ndarray,
    std: np.ndarray | None,
    bound: np.ndarray | None,
    label_names: Sequence[str],
    prior_width: Sequence[float],
    *,
    fitted_on: Mapping | None = None,
) -> ErrorCalibration:
    """Fit :class:`ErrorCalibration` on ``residual`` = predicted - true ``[N, L]`` of rows no member
    trained on, with their ensemble ``std`` and forward-model ``bound`` (either may be None: that term
    is dropped; a one-member ensemble has no std). Rows where any used input is not finite are left
    out per label; a label with fewer than :data:`MIN_ROWS` usable rows raises :class:`InputError`.
    ``fitted_on`` (which rows, how many) is stored with the parameters."""
    residual = np.asarray(residual, dtype=np.float64)
    names = tuple(label_names)
    if residual.ndim != 2 or residual.shape[1] != len(names):
        raise InputError(f"residuals of shape {residual.shape} do not fit the labels {names}")
    widths = np.asarray(prior_width, dtype=np.float64)
    if widths.shape != (len(names),) or not (widths > 0).all():
        raise InputError(f"prior widths must be {len(names)} positive numbers, got {widths}")
    terms = {
        "std": None if std is None else np.asarray(std, dtype=np.float64),
        "bound": None if bound is None else np.asarray(bound, dtype=np.float64),
    }
    if terms["std"] is not None and not np.isfinite(terms["std"]).any():
        terms["std"] = None  # a one-member ensemble: std is NaN everywhere
    labels, per_label = {}, {}
    for k, name in enumerate(names):
        r = residual[:, k]
        s = np.zeros_like(r) if terms["std"] is None else terms["std"][:, k]
        p = np.zeros_like(r) if terms["bound"] is None else capped_bound(terms["bound"][:, k], widths[k])
        ok = np.isfinite(r) & np.isfinite(s) & np.isfinite(p)
        if ok.sum() < MIN_ROWS:
            raise InputError(
                f"only {int(ok.sum())} rows with a finite residual, std and bound for {name}: a calibration "
                f"needs at least {MIN_ROWS}"
            )
        with_std, with_bound = terms["std"] is not None, terms["bound"] is not None
        a2, b2, c2, nll = _fit_variance_terms(r[ok], s[ok], p[ok], with_std, with_bound)
        labels[name] = LabelErrorModel(math.sqrt(a2), math.sqrt(b2), math.sqrt(c2), float(widths[k]))
        per_label[name] = {"n": int(ok.sum()), "mean_nll": nll}
    return ErrorCalibration(
        names,
        labels,
        uses_bound=terms["bound"] is not None,
        fitted_on={**dict(fitted_on or {}), "labels": per_label},
    )


def _fit_variance_terms(
    r: np.ndarray, s: np.ndarray, p: np.ndarray, with_std: bool, with_bound: bool
) -> tuple[float, float, float, float]:
    """``(a^2, b^2, c^2, mean negative log-likelihood)`` maximising the Gaussian likelihood of ``r``
    under variances ``a^2 s^2 + b^2 p^2 + c^2`` (non-negative; a dropped term stays 0).

    The variance is linear in (a^2, b^2, c^2), so L-BFGS-B on those with bounds [0, inf) and the
    exact gradient converges in a few dozen steps. Everything is divided by rms(r) first so that the
    parameters are O(1) whatever the label's unit (Teff in K, abundances in dex)."""
    from scipy.optimize import minimize

    unit = math.sqrt(float(np.mean(r**2))) or 1.0
    r2 = (r / unit) ** 2
    design = np.stack([(s / unit) ** 2, (p / unit) ** 2, np.ones_like(r)], axis=1)  # variance = design @ x

    def nll(x: np.ndarray) -> tuple[float, np.ndarray]:
        v = design @ x
        value = 0.5 * np.mean(np.log(v) + r2 / v)
        grad = 0.5 * design.T @ ((1.0 / v - r2 / v**2) / len(r))
        return float(value), grad

    bounds = [(0.0, None if with_std else 0.0), (0.0, None if with_bound else 0.0), (MIN_FLOOR, None)]
    # Starts: all error in the floor, or split between the terms; the best optimum wins.
    starts = [np.array([0.0, 0.0, 1.0]), np.array([1.0 * with_std, 1.0 * with_bound, 0.3])]
    best = None
    for start in starts:
        result = minimize(nll, start, jac=True, method="L-BFGS-B", bounds=bounds)
        if best is None or result.fun < best.fun:
            best = result
    a2, b2, c2 = (float(v) for v in best.x)
    # Back to the label's units; the log-likelihood gets the log(unit) its normalisation removed.
    return a2, b2, c2 * unit**2, float(best.fun + math.log(unit))
