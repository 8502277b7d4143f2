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
infinitely so (the network then predicts near the training mean). A model whose members have a
variance head (``ArchConfig.variance_head``) adds their own predicted error ``s``
(``Prediction.aleatoric``: what each member learnt to expect on such a spectrum):

    err^2 = (a * std)^2 + (b * p)^2 + (d * s)^2 + c^2

A model with an embedding reference (``model/ood.py``) also lets the std's weight grow with the
spectrum's distance from the training set in the members' own representation, ``x``
(``Prediction.ood_distance``: the kNN distance over the training spectra's median, ~1 for a spectrum
like them): the members disagree little even where none of them learnt from anything alike, so the
further a spectrum lies from the training set the more their disagreement understates the error
(measured, BENCHMARKS.md: hot metal-poor dwarfs lie at x ~ 1.6, the rest at ~1.0):

    err^2 = (a * std)^2 + (e * x * std)^2 + (b * p)^2 + (d * s)^2 + c^2

``a``, ``b``, ``c``, ``d``, ``e`` >= 0 per label are fitted by Gaussian maximum likelihood (the residuals
of the fitting rows as N(0, err^2)); a term the fit finds no use for gets 0.

Where it is fitted (``speclabel train``): on the common test split, the only rows no member trained
on or selected its weights on (each member's validation split differs, so every other row was seen
by some member, whose error there is too small). Three parameters per label fit well on a hundred
rows, so spending no extra rows on a dedicated calibration split costs nothing in accuracy; the
benchmark (``bench/trust_calibration.py``) scores it cross-fitted, never on the rows it was fitted on.

Stored as ``model.json`` "calibration" (:meth:`ErrorCalibration.to_dict`, versioned), so that the
model_id covers it; a model without one loads as before and its rows get null ``<label>_err``.
Without a forward model the fit drops the bound term (``uses_bound`` false), without a variance
head the ``s`` term (``uses_aleatoric`` false), without an embedding reference the ``x`` term
(``uses_distance`` false). The document has the lowest version that holds its terms, so a model
written before a term existed keeps its bytes and its model_id: version 1 (a, b, c), 2 (adds ``d``
and ``uses_aleatoric``), 3 (adds ``e`` and ``uses_distance``; ``d`` and ``uses_aleatoric`` always
present).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from speclabel.core.errors import ConfigError, InputError, IntegrityError

CALIBRATION_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
_CAPPED = "p = bound / sqrt(1 + (bound/prior_width)^2)"
FORM = f"err^2 = (a*std)^2 + (b*p)^2 + c^2, {_CAPPED}"
FORM_ALEATORIC = f"err^2 = (a*std)^2 + (b*p)^2 + (d*s)^2 + c^2, {_CAPPED}"
FORM_DISTANCE = f"err^2 = (a*std)^2 + (e*x*std)^2 + (b*p)^2 + (d*s)^2 + c^2, {_CAPPED}"
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
    c: float  # the floor: error that no term explains
    prior_width: float  # w: the training labels' standard deviation
    d: float = 0.0  # multiplies the members' own predicted error (variance head)
    e: float = 0.0  # multiplies the std times the distance from the training set

    def variance(
        self,
        std: np.ndarray,
        bound: np.ndarray | None,
        aleatoric: np.ndarray | None = None,
        distance: np.ndarray | None = None,
    ) -> np.ndarray:
        std = np.asarray(std, dtype=np.float64)
        out = (self.a * std) ** 2 + self.c**2
        if bound is not None and self.b > 0:
            out = out + (self.b * capped_bound(bound, self.prior_width)) ** 2
        if aleatoric is not None and self.d > 0:
            out = out + (self.d * np.asarray(aleatoric, dtype=np.float64)) ** 2
        if distance is not None and self.e > 0:
            out = out + (self.e * np.asarray(distance, dtype=np.float64) * std) ** 2
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
    uses_aleatoric: bool = False
    uses_distance: bool = False

    def __post_init__(self) -> None:
        missing = [n for n in self.label_names if n not in self.labels]
        if missing:
            raise ConfigError(f"calibration lacks parameters for {missing}")

    @property
    def version(self) -> int:
        if self.uses_distance:
            return CALIBRATION_VERSION
        return 2 if self.uses_aleatoric else 1

    def total_error(
        self,
        std: np.ndarray,
        bound: np.ndarray | None = None,
        aleatoric: np.ndarray | None = None,
        distance: np.ndarray | None = None,
    ) -> np.ndarray:
        """The calibrated 1-sigma error ``[N, L]`` (float64) of rows with ensemble ``std`` ``[N, L]`` and,
        where the calibration uses them, the forward-model ``bound`` and the members' own predicted
        error ``aleatoric`` (``[N, L]`` each) and the rows' relative distance from the training set
        ``distance`` (``[N]``, ``Prediction.ood_distance``); NaN where an input is."""
        std = np.asarray(std, dtype=np.float64)
        if std.ndim != 2 or std.shape[1] != len(self.label_names):
            raise InputError(f"std of shape {std.shape} does not fit the calibration's {self.label_names}")
        bound = self._term("bound", "the forward-model bound", bound, std.shape) if self.uses_bound else None
        aleatoric = (
            self._term("aleatoric", "the members' predicted error", aleatoric, std.shape)
            if self.uses_aleatoric
            else None
        )
        distance = (
            self._term("distance", "the distance from the training set", distance, std.shape[:1])
            if self.uses_distance
            else None
        )
        out = np.empty_like(std)
        for k, name in enumerate(self.label_names):
            out[:, k] = np.sqrt(
                self.labels[name].variance(
                    std[:, k],
                    None if bound is None else bound[:, k],
                    None if aleatoric is None else aleatoric[:, k],
                    distance,
                )
            )
        return out

    @staticmethod
    def _term(name: str, what: str, values: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        if values is None:
            raise InputError(f"this calibration uses {what}: pass {name}")
        values = np.asarray(values, dtype=np.float64)
        if values.shape != shape:
            raise InputError(f"{name} of shape {values.shape} does not match std {shape}")
        return values

    def to_dict(self) -> dict:
        version = self.version
        per_label = _label_keys(version)
        return {
            "version": version,
            "form": {1: FORM, 2: FORM_ALEATORIC, 3: FORM_DISTANCE}[version],
            "names": list(self.label_names),
            "uses_bound": self.uses_bound,
            **({"uses_aleatoric": self.uses_aleatoric} if version >= 2 else {}),
            **({"uses_distance": True} if version >= 3 else {}),
            "labels": {n: {k: getattr(m, k) for k in per_label} for n, m in self.labels.items()},
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ErrorCalibration:
        version = data.get("version") if isinstance(data, Mapping) else None
        if version not in READABLE_VERSIONS:
            raise IntegrityError(
                f"check 'calibration version': the model's calibration has version {version!r}, this "
                f"speclabel reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            names = tuple(data["names"])
            uses_aleatoric = version >= 2 and bool(data["uses_aleatoric"])
            uses_distance = version >= 3 and bool(data["uses_distance"])
            per_label = _label_keys(version)
            labels = {
                n: LabelErrorModel(**{k: float(data["labels"][n][k]) for k in per_label}) for n in names
            }
            return cls(
                names,
                labels,
                bool(data["uses_bound"]),
                dict(data.get("fitted_on", {})),
                uses_aleatoric=uses_aleatoric,
                uses_distance=uses_distance,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"check 'calibration': invalid calibration in model.json: {exc!r}") from exc


def _label_keys(version: int) -> tuple[str, ...]:
    """The per-label parameters a calibration document of ``version`` holds (``d`` from version 2 on,
    ``e`` from version 3 on)."""
    base = ("a", "b", "c", "prior_width")
    return {1: base, 2: (*base, "d"), 3: (*base, "d", "e")}[version]


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


@dataclass(frozen=True, eq=False)  # numpy fields
class RowErrors:
    """The calibrated errors ``[N, L]`` of a batch of rows, in the two uses they have."""

    err: np.ndarray  # the catalogue's <label>_err
    # The same with each row's distance from the training set at most a typical training
    # spectrum's (1): what the anomaly check propagates into the pixel variances. A spectrum unlike
    # the training set is what the check looks for; its distance must not widen the tolerance of
    # its own model spectrum (measured: emission at S/N 30 is found half as often otherwise).
    screening: np.ndarray


def row_errors(
    calibration: ErrorCalibration,
    forward,
    mean: np.ndarray,
    std: np.ndarray,
    ivar: np.ndarray | None,
    good: np.ndarray,
    aleatoric: np.ndarray | None = None,
    distance: np.ndarray | None = None,
) -> RowErrors:
    """The calibrated errors of rows labelled ``mean`` with ensemble ``std`` (and, for a
    variance-head model, the members' predicted error ``aleatoric``, ``Prediction.aleatoric``; for a
    model with an embedding reference, the rows' ``distance`` from the training set,
    ``Prediction.ood_distance``): the forward model's bound (``forward.label_bound``, computed once
    for both) at the predicted labels, from the rows' ``ivar`` and ``good`` pixels, where the
    calibration uses it; NaN rows where it does and the model has no forward model (None) or the
    spectra no ivar (None)."""
    if calibration.uses_bound and (forward is None or ivar is None):
        unknown = np.full(np.shape(std), np.nan)
        return RowErrors(unknown, unknown)
    bound = forward.label_bound(mean, ivar, good) if calibration.uses_bound else None
    err = calibration.total_error(std, bound, aleatoric, distance)
    if not calibration.uses_distance:
        return RowErrors(err, err)
    typical = np.minimum(np.asarray(distance, dtype=np.float64), 1.0)
    return RowErrors(err, calibration.total_error(std, bound, aleatoric, typical))


def prediction_errors(
    calibration: ErrorCalibration, forward, prediction, ivar: np.ndarray | None, good
) -> RowErrors:
    """:func:`row_errors` of an ``Ensemble.predict`` result (asked with ``ood=True``, so that it
    carries the distance from the training set where the model has an embedding reference)."""
    return row_errors(
        calibration,
        forward,
        prediction.mean,
        prediction.std,
        ivar,
        good,
        prediction.aleatoric,
        prediction.ood_distance,
    )


def errors_or_std(err: np.ndarray | None, std: np.ndarray) -> np.ndarray:
    """Each label's uncertainty ``[N, L]``: the calibrated ``err`` where known (``err`` None: a model
    without a calibration), else the ensemble ``std`` (too small, but better than none). What the
    anomaly check propagates into the pixel variances (``ForwardModel.chi2(..., label_error)``) and
    what ``speclabel suggest`` scores."""
    std = np.asarray(std, dtype=np.float64)
    return std if err is None else np.where(np.isfinite(err), np.asarray(err, dtype=np.float64), std)


def calibrate_ensemble(
    ensemble,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    fitted_on: Mapping | None = None,
    refinement=None,
) -> ErrorCalibration:
    """Fit the calibration of ``ensemble`` (with its ``forward`` model, if any) on ``batches`` of
    rows no member trained on: dicts with ``flux``, ``mask``, ``labels`` and ``ivar``, as
    ``TrainingRows.test_batches`` gives the common test split. Each row's ensemble mean and std, the
    forward model's bound at the predicted labels, the members' predicted error (variance head) and
    the distance from the training set (embedding reference ``ensemble.ood``), where the model has
    them, are the inputs of :func:`fit_error_calibration`. With a ``refinement``
    (``model.refine.Refinement``) the errors are those of the refined labels: the same terms, at
    the refined labels."""
    forward = getattr(ensemble, "forward", None)
    residual, std, bound, aleatoric, distance = [], [], [], [], []
    for batch in batches:
        if not len(batch["labels"]):
            continue
        prediction = ensemble.predict(batch["flux"], batch["mask"], ood=True)
        if refinement is not None:
            prediction = refinement.apply(prediction, batch["flux"], batch["ivar"], batch["mask"])
        residual.append(prediction.mean - np.asarray(batch["labels"], dtype=np.float64))
        std.append(prediction.std)
        if forward is not None:
            bound.append(forward.label_bound(prediction.mean, batch["ivar"], batch["mask"]))
        if prediction.aleatoric is not None:
            aleatoric.append(prediction.aleatoric)
        if prediction.ood_distance is not None:
            distance.append(prediction.ood_distance)
    if not residual:
        raise InputError("no rows to calibrate the errors on")
    return fit_error_calibration(
        np.concatenate(residual),
        np.concatenate(std) if ensemble.n_members > 1 else None,
        np.concatenate(bound) if forward is not None else None,
        ensemble.label_names,
        prior_widths(ensemble),
        aleatoric=np.concatenate(aleatoric) if aleatoric else None,
        distance=np.concatenate(distance) if distance else None,
        fitted_on={**dict(fitted_on or {}), "n_rows": int(sum(len(r) for r in residual))},
    )


def fit_error_calibration(
    residual: np.ndarray,
    std: np.ndarray | None,
    bound: np.ndarray | None,
    label_names: Sequence[str],
    prior_width: Sequence[float],
    *,
    aleatoric: np.ndarray | None = None,
    distance: np.ndarray | None = None,
    fitted_on: Mapping | None = None,
) -> ErrorCalibration:
    """Fit :class:`ErrorCalibration` on ``residual`` = predicted - true ``[N, L]`` of rows no member
    trained on, with their ensemble ``std``, forward-model ``bound``, the members' predicted error
    ``aleatoric`` (``[N, L]`` each) and relative distance from the training set ``distance``
    (``[N]``; it scales the std, so it is dropped with it) (any may be None: that term is dropped; a
    one-member ensemble has no std). Rows where any used input is not finite are left out per
    label; a label with fewer than
    :data:`MIN_ROWS` usable rows raises :class:`InputError`. ``fitted_on`` (which rows, how many) is
    stored with the parameters."""
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
        "aleatoric": None if aleatoric is None else np.asarray(aleatoric, dtype=np.float64),
    }
    if terms["std"] is not None and not np.isfinite(terms["std"]).any():
        terms["std"] = None  # a one-member ensemble: std is NaN everywhere
    if distance is not None and terms["std"] is not None:
        distance = np.asarray(distance, dtype=np.float64)
        if distance.shape != residual.shape[:1]:
            raise InputError(f"distance of shape {distance.shape} does not match {residual.shape[0]} rows")
        terms["distance"] = distance[:, None] * terms["std"]
    used = [name for name, values in terms.items() if values is not None]
    labels, per_label = {}, {}
    for k, name in enumerate(names):
        r = residual[:, k]
        columns = {
            "std": None if terms["std"] is None else terms["std"][:, k],
            "bound": None if terms["bound"] is None else capped_bound(terms["bound"][:, k], widths[k]),
            "aleatoric": None if terms["aleatoric"] is None else terms["aleatoric"][:, k],
            "distance": None if terms.get("distance") is None else terms["distance"][:, k],
        }
        ok = np.isfinite(r)
        for values in columns.values():
            ok &= True if values is None else np.isfinite(values)
        if ok.sum() < MIN_ROWS:
            raise InputError(
                f"only {int(ok.sum())} rows with a finite residual and {', '.join(used) or 'no terms'} for "
                f"{name}: a calibration needs at least {MIN_ROWS}"
            )
        scales, nll = _fit_variance_terms(
            r[ok], {t: None if v is None else v[ok] for t, v in columns.items()}
        )
        labels[name] = LabelErrorModel(
            a=scales["std"],
            b=scales["bound"],
            c=scales["floor"],
            prior_width=float(widths[k]),
            d=scales["aleatoric"],
            e=scales["distance"],
        )
        per_label[name] = {"n": int(ok.sum()), "mean_nll": nll}
    return ErrorCalibration(
        names,
        labels,
        uses_bound=terms["bound"] is not None,
        fitted_on={**dict(fitted_on or {}), "labels": per_label},
        uses_aleatoric=terms["aleatoric"] is not None,
        uses_distance=terms.get("distance") is not None,
    )


def _fit_variance_terms(
    r: np.ndarray, columns: Mapping[str, np.ndarray | None]
) -> tuple[dict[str, float], float]:
    """The scale of each term (name -> its multiplier, ``"floor"`` -> c, a dropped (None) term 0) and
    the mean negative log-likelihood maximising the Gaussian likelihood of ``r`` under variances
    ``sum_t x_t^2 v_t^2 + c^2``.

    The variance is linear in the squared scales, so L-BFGS-B on those with bounds [0, inf) and the
    exact gradient converges in a few dozen steps. Everything is divided by rms(r) first so that the
    parameters are O(1) whatever the label's unit (Teff in K, abundances in dex)."""
    from scipy.optimize import minimize

    unit = math.sqrt(float(np.mean(r**2))) or 1.0
    r2 = (r / unit) ** 2
    names = list(columns)
    # variance = design @ x, x = (squared term scales..., c^2 / unit^2)
    design = np.stack(
        [np.zeros_like(r) if v is None else (v / unit) ** 2 for v in columns.values()] + [np.ones_like(r)],
        axis=1,
    )
    used = np.array([v is not None for v in columns.values()], dtype=float)

    def nll(x: np.ndarray) -> tuple[float, np.ndarray]:
        v = design @ x
        value = 0.5 * np.mean(np.log(v) + r2 / v)
        grad = 0.5 * design.T @ ((1.0 / v - r2 / v**2) / len(r))
        return float(value), grad

    bounds = [(0.0, None if u else 0.0) for u in used] + [(MIN_FLOOR, None)]
    # Starts: all error in the floor, or split between the terms; the best optimum wins.
    starts = [np.append(np.zeros_like(used), 1.0), np.append(used, 0.3)]
    best = None
    for start in starts:
        result = minimize(nll, start, jac=True, method="L-BFGS-B", bounds=bounds)
        if best is None or result.fun < best.fun:
            best = result
    scales = {name: math.sqrt(float(x)) for name, x in zip(names, best.x[:-1], strict=True)}
    # Back to the label's units; the log-likelihood gets the log(unit) its normalisation removed.
    scales["floor"] = math.sqrt(float(best.x[-1])) * unit
    return scales, float(best.fun + math.log(unit))
