"""A data-driven forward model: the normalised flux of every pixel as a quadratic in the labels.

This is The Cannon's form (Ness et al. 2015): in standardised labels ``x = (label - offset) / scale``
each pixel's flux is ``c0 + sum_k c_k x_k + sum_{k<=l} c_kl x_k x_l``, fitted by weighted least
squares on the same training rows as the ensemble members, with a per-pixel intrinsic scatter ``s``
(what the quadratic cannot say about that pixel) estimated from the training residuals. With it a
catalogue row can be checked against its own spectrum:

* :meth:`ForwardModel.chi2`: the reduced chi^2 of a spectrum against the model spectrum at given
  labels, per arm and in total, each pixel weighted by ``1 / (1/ivar + s^2)``; ~1 for a spectrum
  at its true labels with its known noise. A spectrum that no set of labels explains (a binary,
  emission, a cosmic ray, a bad continuum) has a large one.
* :meth:`ForwardModel.label_bound`: the Cramér-Rao bound of each label, ``sqrt(diag((J^T W J)^-1))``:
  what the spectrum can say about a label at all (large where its lines vanish, growing with noise).

The fit streams: it reads the rows in batches as often as it needs (a handful of passes), holding
only the normal equations (``pixels x terms^2``) and one float per row, so a training set that does
not fit in memory is fitted the same way as arrays (:func:`fit_forward_model_batches`). Passes:
label statistics; an ivar-weighted fit; then ``iterations`` passes that each update the scatter
from the last fit's residuals (a Fisher-scoring step for a variance component, with the degrees of
freedom the fit used) and refit with the new weights, leaving out spectra whose chi^2 is an
outlier (iterative sigma clipping: a bad training spectrum must not shape the model that is to
find bad spectra); a last pass measures the training chi^2 distribution, from which the anomaly
thresholds are chosen (:data:`THRESHOLD_QUANTILE`).

Stored as one safetensors file (arrays plus JSON metadata, no code) in the model directory
(``model/io.py`` lists it in model.json with its sha256).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from speclabel.core.errors import ConfigError, InputError, IntegrityError

FORMAT = "speclabel-forward"
FORMAT_VERSION = 1
TOTAL = "total"
# The anomaly threshold of each arm and of the total: this quantile of the chi^2 of the training
# rows that survived clipping, at their given labels, times THRESHOLD_MARGIN. The label job
# computes chi^2 at the ensemble's labels, which are off by their errors, so a clean spectrum's
# chi^2 there is a little larger than at its true labels; the margin keeps the false-flag rate on
# clean spectra near 1 - quantile.
THRESHOLD_QUANTILE = 0.995
THRESHOLD_MARGIN = 1.1
# A training spectrum whose chi^2 lies more than CLIP_SIGMA robust standard deviations above the
# median chi^2 is left out of the next fit.
CLIP_SIGMA = 5.0
# Passes of scatter update, refit and clipping. With bad rows in the set the model is pulled by them
# until clipping has left them out (measured on 16 bad rows of 200: median chi2 9.8 after 3
# passes, 1.06 after 5), and a training set is not screened unless its user asks.
CLIP_PASSES = 6
# A pixel needs this many training rows per model term with a good value to be modelled at all;
# pixels with fewer are unusable (infinite scatter: no weight in chi^2 or the bound).
MIN_ROWS_PER_TERM = 2
# See ForwardModel.bound_coefficients: coefficients within this many standard errors of zero do
# not count as information in the label bound.
BOUND_SHRINK_SIGMA = 2.0
BATCH_ROWS = 256  # rows per step of the in-memory fit and of chi2/label_bound: bounds temporaries


Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # flux, ivar, good, labels


class TooFewRows(InputError):
    """Fewer training rows than a forward model of these labels needs (see MIN_ROWS_PER_TERM)."""


def n_terms(n_labels: int) -> int:
    """1 + linear + quadratic (with cross) terms of the quadratic model."""
    return 1 + n_labels + n_labels * (n_labels + 1) // 2


def design_matrix(x: np.ndarray) -> np.ndarray:
    """``[N, L]`` standardised labels -> ``[N, T]`` terms: 1, x_k, x_k x_l (k <= l)."""
    i, j = np.triu_indices(x.shape[1])
    return np.concatenate([np.ones((x.shape[0], 1)), x, x[:, i] * x[:, j]], axis=1)


def design_derivative(x: np.ndarray) -> np.ndarray:
    """``d terms / d x``: ``[N, T, L]``."""
    n, n_labels = x.shape
    i, j = np.triu_indices(n_labels)
    out = np.zeros((n, n_terms(n_labels), n_labels))
    out[:, 1 : 1 + n_labels, :] = np.eye(n_labels)
    rows = np.arange(len(i)) + 1 + n_labels
    out[:, rows, i] += x[:, j]
    out[:, rows, j] += x[:, i]
    return out


def _jacobian(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``d flux / d x`` ``[N, P, L]`` of the model with ``coefficients`` ``[T, P]`` at standardised
    labels ``x``: one matrix product per label (BLAS), ~15x faster than the same einsum."""
    derivative = design_derivative(x)
    return np.stack([derivative[:, :, k] @ coefficients for k in range(x.shape[1])], axis=2)


def _weights(ivar: np.ndarray, good: np.ndarray, scatter: np.ndarray) -> np.ndarray:
    """``1 / (1/ivar + s^2)`` on good pixels, 0 elsewhere (and where the model has no pixel)."""
    with np.errstate(divide="ignore"):
        variance = np.where(good & (ivar > 0), 1.0 / np.asarray(ivar, np.float64), np.inf)
    return 1.0 / (variance + scatter[None, :].astype(np.float64) ** 2)


@dataclass(frozen=True)
class ForwardModel:
    """Flux as a quadratic in the standardised labels, per pixel; see the module docstring."""

    label_names: tuple[str, ...]
    arm_names: tuple[str, ...]
    arm_pixels: tuple[int, ...]
    label_offset: np.ndarray  # [L] the training labels' mean
    label_scale: np.ndarray  # [L] the training labels' std
    coefficients: np.ndarray  # [T, P] float64
    scatter: np.ndarray  # [P] intrinsic scatter per pixel (inf: pixel not modelled)
    coefficient_error: np.ndarray | None = None  # [T, P] standard errors of the coefficients
    chi2_threshold: dict[str, float] = field(default_factory=dict)  # "total" and each arm
    fit: dict = field(default_factory=dict)  # what it was fitted on (rows, clipped, passes)

    def __post_init__(self) -> None:
        n_labels, n_pixels = len(self.label_names), sum(self.arm_pixels)
        if len(self.arm_names) != len(self.arm_pixels):
            raise ConfigError(f"arm names {self.arm_names} do not match arm pixels {self.arm_pixels}")
        if self.coefficients.shape != (n_terms(n_labels), n_pixels) or self.scatter.shape != (n_pixels,):
            raise ConfigError(
                f"forward model arrays {self.coefficients.shape}, {self.scatter.shape} do not fit "
                f"{n_labels} labels and {n_pixels} pixels"
            )
        if self.label_offset.shape != (n_labels,) or self.label_scale.shape != (n_labels,):
            raise ConfigError("forward model label offsets/scales do not fit its labels")

    @property
    def n_pixels(self) -> int:
        return int(sum(self.arm_pixels))

    @property
    def arm_slices(self) -> dict[str, slice]:
        edges = np.cumsum((0, *self.arm_pixels))
        return {
            a: slice(int(lo), int(hi))
            for a, lo, hi in zip(self.arm_names, edges[:-1], edges[1:], strict=True)
        }

    def _standardised(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.float64)
        if labels.ndim != 2 or labels.shape[1] != len(self.label_names):
            raise InputError(
                f"labels must be [N, {len(self.label_names)}] ({self.label_names}), got {labels.shape}"
            )
        return (labels - self.label_offset) / self.label_scale

    def flux(self, labels: np.ndarray) -> np.ndarray:
        """Model spectra ``[N, P]`` (float64) at physical labels ``[N, L]``."""
        return design_matrix(self._standardised(labels)) @ self.coefficients

    def jacobian(self, labels: np.ndarray) -> np.ndarray:
        """``d flux / d label`` per physical label unit: ``[N, P, L]``."""
        return _jacobian(self.coefficients, self._standardised(labels)) / self.label_scale

    def _check(self, flux: np.ndarray, ivar: np.ndarray, good: np.ndarray) -> None:
        shapes = {np.shape(flux), np.shape(ivar), np.shape(good)}
        if len(shapes) != 1 or np.ndim(flux) != 2 or np.shape(flux)[1] != self.n_pixels:
            raise InputError(f"flux, ivar and good must all be [N, {self.n_pixels}], got {sorted(shapes)}")

    def chi2(
        self,
        flux: np.ndarray,
        ivar: np.ndarray,
        good: np.ndarray,
        labels: np.ndarray,
        label_error: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Reduced chi^2 ``{"total": [N], arm: [N]}`` (float64) against the model at ``labels``.

        Sum over good pixels of ``(flux - model)^2 / (1/ivar + s^2 + e^2)``, divided by the number
        of those pixels (the labels are not fitted here, so no degrees of freedom are taken off); NaN
        where a row or arm has no good pixel. ``e`` is 0 unless ``label_error`` ``[N, L]`` gives the
        1-sigma uncertainty of ``labels`` (a row's calibrated err): then ``e^2 = sum_k (d flux /
        d label_k * err_k)^2``, how far that uncertainty moves the model flux (non-finite errors count
        as 0). Labels off by their errors leave residuals that at high S/N outweigh the noise:
        without ``e`` a clean spectrum's chi^2 at an ensemble's labels grows with S/N, while the
        thresholds are set at the training labels.
        """
        self._check(flux, ivar, good)
        if label_error is not None and np.shape(label_error) != np.shape(labels):
            raise InputError(f"label_error must have the shape of labels {np.shape(labels)}")
        parts = []
        for lo in range(0, len(flux), BATCH_ROWS):
            rows = slice(lo, lo + BATCH_ROWS)
            residual = np.asarray(flux[rows], np.float64) - self.flux(labels[rows])
            weight = _weights(ivar[rows], good[rows], self.scatter)
            if label_error is not None:
                with np.errstate(divide="ignore"):
                    weight = 1.0 / (1.0 / weight + self._label_variance(labels[rows], label_error[rows]))
            parts.append(_reduced_chi2(residual, weight, self.arm_slices))
        if not parts:
            return {key: np.zeros(0) for key in (TOTAL, *self.arm_names)}
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def _label_variance(self, labels: np.ndarray, label_error: np.ndarray) -> np.ndarray:
        """``[n, P]``: sum over labels of (d flux / d label * err)^2, in standardised units."""
        error = np.asarray(label_error, np.float64) / self.label_scale
        error = np.where(np.isfinite(error), error, 0.0)
        # The fitted coefficients, not the bound's shrunk ones: the model flux moves by exactly these.
        derivative = design_derivative(self._standardised(labels)) * error[:, None, :]  # [n, T, L]
        variance = np.zeros((len(labels), self.n_pixels))
        for k in range(derivative.shape[2]):
            variance += (derivative[:, :, k] @ self.coefficients) ** 2
        return variance

    def anomalous(self, chi2: dict[str, np.ndarray]) -> np.ndarray:
        """True where the total or any arm's chi^2 exceeds its stored threshold (NaN never does)."""
        out = np.zeros(len(chi2[TOTAL]), dtype=bool)
        for key, limit in self.chi2_threshold.items():
            with np.errstate(invalid="ignore"):
                out |= np.asarray(chi2[key]) > limit
        return out

    def label_bound(self, labels: np.ndarray, ivar: np.ndarray, good: np.ndarray) -> np.ndarray:
        """Cramér-Rao bound per label ``[N, L]`` (physical units): ``sqrt(diag((J^T W J)^-1))``
        with ``W = 1 / (1/ivar + s^2)`` on good pixels; inf for a label the spectrum says nothing
        about (a singular Fisher matrix). ``J`` is the Jacobian of :attr:`bound_coefficients`."""
        self._check(ivar, ivar, good)
        n, n_labels = len(ivar), len(self.label_names)
        out = np.empty((n, n_labels))
        for lo in range(0, n, BATCH_ROWS):
            rows = slice(lo, lo + BATCH_ROWS)
            x = self._standardised(labels[rows])
            # In standardised units the Fisher matrix is well scaled; bounds scale back at the end.
            jac = _jacobian(self.bound_coefficients, x)
            weight = _weights(ivar[rows], good[rows], self.scatter)
            fisher = np.matmul(jac.transpose(0, 2, 1), jac * weight[:, :, None])
            out[rows] = _inverse_diagonal(fisher)
        return np.sqrt(out) * self.label_scale

    def fit_labels(
        self,
        flux: np.ndarray,
        ivar: np.ndarray,
        good: np.ndarray,
        start: np.ndarray | None = None,
        iterations: int = 8,
    ) -> np.ndarray:
        """The labels ``[N, L]`` whose model spectrum fits each spectrum best (least chi^2; The
        Cannon's test step): damped Gauss-Newton from ``start`` (default: the training mean), kept
        within 5 training standard deviations of the mean. For the screen of a training set and as
        the labels a spectrum would get if the model were the truth."""
        self._check(flux, ivar, good)
        n, n_labels = len(flux), len(self.label_names)
        out = np.empty((n, n_labels))
        for lo in range(0, n, BATCH_ROWS):
            rows = slice(lo, lo + BATCH_ROWS)
            weight = _weights(ivar[rows], good[rows], self.scatter)
            data = np.where(weight > 0, np.asarray(flux[rows], np.float64), 0.0)
            x = np.zeros((len(data), n_labels)) if start is None else self._standardised(start[rows])
            damping = np.full(len(data), 1e-3)
            cost = self._cost(data, weight, x)
            for _ in range(iterations):
                jac = _jacobian(self.coefficients, x)
                residual = data - design_matrix(x) @ self.coefficients
                normal = np.einsum("npk,np,npl->nkl", jac, weight, jac)
                gradient = np.einsum("npk,np,np->nk", jac, weight, residual)
                normal += damping[:, None, None] * np.eye(n_labels) * np.einsum("nkk->nk", normal)[:, :, None]
                step = np.linalg.solve(normal + 1e-12 * np.eye(n_labels), gradient[..., None])[..., 0]
                trial = np.clip(x + step, -5.0, 5.0)
                trial_cost = self._cost(data, weight, trial)
                better = trial_cost < cost
                x[better], cost[better] = trial[better], trial_cost[better]
                damping = np.where(better, damping / 3.0, damping * 10.0)
            out[rows] = x * self.label_scale + self.label_offset
        return out

    def _cost(self, data: np.ndarray, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
        return ((data - design_matrix(x) @ self.coefficients) ** 2 * weight).sum(1)

    @cached_property
    def bound_coefficients(self) -> np.ndarray:
        """The coefficients with the fit's noise taken out, for the Jacobian of the bound.

        Every pixel's fitted coefficients carry noise of their standard error; summed over
        thousands of pixels, the squared gradients of pure noise look like information about a
        label (a weak line's label would seem measured from pixels that do not depend on it). Each
        coefficient is shrunk as ``c * max(0, 1 - (BOUND_SHRINK_SIGMA * se / c)^2)``: those within
        that many standard errors of zero count as zero, significant ones nearly as fitted.
        """
        if self.coefficient_error is None:
            return self.coefficients
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (BOUND_SHRINK_SIGMA * self.coefficient_error / self.coefficients) ** 2
        return self.coefficients * np.where(np.isfinite(ratio), np.maximum(0.0, 1.0 - ratio), 0.0)

    def to_bytes(self) -> bytes:
        tensors = {
            "label_offset": self.label_offset.astype(np.float64),
            "label_scale": self.label_scale.astype(np.float64),
            "coefficients": self.coefficients.astype(np.float64),
            "scatter": self.scatter.astype(np.float64),
        }
        if self.coefficient_error is not None:
            tensors["coefficient_error"] = self.coefficient_error.astype(np.float64)
        # safetensors writes an array's memory as it lies: C order first (einsum results may not be).
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "labels": json.dumps(list(self.label_names)),
            "arms": json.dumps(list(self.arm_names)),
            "arm_pixels": json.dumps([int(p) for p in self.arm_pixels]),
            "chi2_threshold": json.dumps(self.chi2_threshold),
            "fit": json.dumps(self.fit),
        }
        return save_safetensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "forward model") -> ForwardModel:
        try:
            tensors = load_safetensors(data)
            metadata = _safetensors_metadata(data)
            if metadata.get("format") != FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
                raise IntegrityError(
                    f"check 'forward model format': {where} is not a {FORMAT} v{FORMAT_VERSION} file"
                )
            return cls(
                label_names=tuple(json.loads(metadata["labels"])),
                arm_names=tuple(json.loads(metadata["arms"])),
                arm_pixels=tuple(int(p) for p in json.loads(metadata["arm_pixels"])),
                label_offset=tensors["label_offset"],
                label_scale=tensors["label_scale"],
                coefficients=tensors["coefficients"],
                scatter=tensors["scatter"],
                coefficient_error=tensors.get("coefficient_error"),
                chi2_threshold={k: float(v) for k, v in json.loads(metadata["chi2_threshold"]).items()},
                fit=json.loads(metadata["fit"]),
            )
        except (SafetensorError, KeyError, ValueError, ConfigError) as exc:
            raise IntegrityError(f"check 'forward model readable': {where}: {exc}") from exc

    def summary(self) -> dict:
        """What model.json says about it (the file itself holds the arrays)."""
        return {
            "form": "quadratic in standardised labels (The Cannon), per-pixel scatter",
            "labels": list(self.label_names),
            "chi2_threshold": self.chi2_threshold,
            "fit": self.fit,
        }


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # The safetensors header: 8-byte little-endian length, then JSON with "__metadata__".
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {}) or {}


def _inverse_diagonal(matrices: np.ndarray) -> np.ndarray:
    """diag(M^-1) of each ``[n, L, L]`` symmetric matrix; inf where M is singular."""
    out = np.full(matrices.shape[:2], np.inf)
    for k, matrix in enumerate(matrices):
        try:
            if np.linalg.cond(matrix) < 1e14:
                out[k] = np.diag(np.linalg.inv(matrix))
        except np.linalg.LinAlgError:
            pass
    return out


class _Accumulator:
    """One pass of the fit over the rows: normal equations for the next coefficients, residual
    sums for the next scatter, each row's chi^2 under the current model."""

    def __init__(self, n_terms_: int, n_pixels: int):
        self.pairs = np.triu_indices(n_terms_)
        self.normal = np.zeros((n_pixels, len(self.pairs[0])))
        self.rhs = np.zeros((n_pixels, n_terms_))
        self.rows_per_pixel = np.zeros(n_pixels)
        self.residual_sq = np.zeros(n_pixels)  # sum r^2 / v^2
        self.noise_sq = np.zeros(n_pixels)  # sum sigma^2 / v^2
        self.inverse_sq = np.zeros(n_pixels)  # sum 1 / v^2
        self.chi2: list[np.ndarray] = []
        self.kept: list[np.ndarray] = []  # per batch: the rows this pass fitted (not clipped)

    def add(self, flux, ivar, good, x, coefficients, scatter, clip_above: float) -> None:
        design = design_matrix(x)
        weight = _weights(ivar, good, scatter)
        if coefficients is not None:
            use = weight > 0
            residual = np.where(use, np.asarray(flux, np.float64) - design @ coefficients, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                chi2 = (residual**2 * weight).sum(1) / use.sum(1)
            self.chi2.append(chi2)
            keep = ~(chi2 > clip_above)
            self.kept.append(keep)
            design, weight, residual, flux = design[keep], weight[keep], residual[keep], flux[keep]
            good, ivar = good[keep], ivar[keep]
            with np.errstate(divide="ignore"):
                noise = np.where(weight > 0, 1.0 / np.where(ivar > 0, ivar, 1.0), 0.0)
            weight_sq = weight**2
            self.residual_sq += (residual**2 * weight_sq).sum(0)
            self.noise_sq += (noise * weight_sq).sum(0)
            self.inverse_sq += weight_sq.sum(0)
        self.rows_per_pixel += (weight > 0).sum(0)
        i, j = self.pairs
        self.normal += weight.T @ (design[:, i] * design[:, j])
        self.rhs += (weight * np.where(weight > 0, np.asarray(flux, np.float64), 0.0)).T @ design

    def solve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coefficients ``[T, P]``, the mask of modelled pixels and the inverse normal matrices
        ``[P, T, T]`` (for the leverage of each training row, see :func:`_leave_one_out_chi2`)."""
        n_pixels, n_t = self.rhs.shape
        matrix = np.zeros((n_pixels, n_t, n_t))
        i, j = self.pairs
        matrix[:, i, j] = self.normal
        matrix[:, j, i] = self.normal
        modelled = self.rows_per_pixel >= MIN_ROWS_PER_TERM * n_t
        # A tiny ridge keeps nearly degenerate pixels solvable without moving well-posed ones.
        diagonal = np.arange(n_t)
        matrix[:, diagonal, diagonal] *= 1.0 + 1e-9
        matrix[~modelled] = np.eye(n_t)
        inverse = np.linalg.inv(matrix)
        coefficients = np.einsum("ptu,pu->tp", inverse, self.rhs)
        coefficients[:, ~modelled] = 0.0
        coefficients[0, ~modelled] = 1.0  # the continuum, where a pixel is not modelled
        inverse[~modelled] = 0.0
        return coefficients, modelled, inverse

    def scatter(self, previous: np.ndarray, n_t: int) -> np.ndarray:
        """The next scatter: a Fisher-scoring step for the variance s^2 of each pixel,
        ``s^2 = sum (c r^2 - sigma^2) / v^2 / sum 1 / v^2``, where ``c = n / (n - T)`` restores
        the degrees of freedom the fit took from the residuals."""
        n = self.rows_per_pixel
        with np.errstate(invalid="ignore", divide="ignore"):
            correction = np.where(n > n_t, n / (n - n_t), 1.0)
            variance = (correction * self.residual_sq - self.noise_sq) / self.inverse_sq
        variance = np.where(np.isfinite(variance), np.maximum(variance, 0.0), 0.0)
        return np.where(np.isfinite(previous), np.sqrt(variance), np.inf)


def clip_limit(chi2: np.ndarray, sigma: float | None) -> float:
    """The chi^2 beyond which a row is an outlier: ``sigma`` robust standard deviations (1.4826 MAD)
    above the median of the finite values (inf for ``sigma`` None or no values)."""
    chi2 = chi2[np.isfinite(chi2)]
    if sigma is None or not len(chi2):
        return np.inf
    median = np.median(chi2)
    robust_std = 1.4826 * np.median(np.abs(chi2 - median))
    return float(median + sigma * max(robust_std, 1e-3 * median))


def fit_forward_model_batches(
    batches: Callable[[], Iterable[Batch]],
    label_names,
    arm_names,
    arm_pixels,
    *,
    iterations: int = CLIP_PASSES,
    clip_sigma: float | None = CLIP_SIGMA,
) -> tuple[ForwardModel, np.ndarray]:
    """Fit from ``batches()``, an iterable of ``(flux, ivar, good, labels)`` batches that can be
    read again on each call (same rows, same order); returns the model and the last pass's chi^2
    (total) of every row at its given labels, in row order. See the module docstring."""
    label_names, arm_names = tuple(label_names), tuple(arm_names)
    arm_pixels = tuple(int(p) for p in arm_pixels)
    n_labels, n_pixels = len(label_names), sum(arm_pixels)
    n_t = n_terms(n_labels)
    total, total_sq, count = np.zeros(n_labels), np.zeros(n_labels), 0
    for _, _, _, labels in _checked(batches(), n_labels, n_pixels):
        total += labels.sum(0)
        total_sq += (labels**2).sum(0)
        count += len(labels)
    if count < MIN_ROWS_PER_TERM * n_t:
        raise TooFewRows(
            f"a forward model of {n_labels} labels needs at least {MIN_ROWS_PER_TERM * n_t} training rows "
            f"({MIN_ROWS_PER_TERM} per term of its quadratic), got {count}"
        )
    offset = total / count
    scale = np.sqrt(np.maximum(total_sq / count - offset**2, 0.0))
    if not np.all(scale > 0):
        constant = [n for n, s in zip(label_names, scale, strict=True) if not s > 0]
        raise InputError(f"the training labels {constant} do not vary: the forward model cannot fit them")

    def run_pass(coefficients, scatter, clip_above) -> _Accumulator:
        accumulator = _Accumulator(n_t, n_pixels)
        for flux, ivar, good, labels in _checked(batches(), n_labels, n_pixels):
            accumulator.add(flux, ivar, good, (labels - offset) / scale, coefficients, scatter, clip_above)
        return accumulator

    scatter = np.zeros(n_pixels)
    coefficients, modelled, inverse = run_pass(None, scatter, np.inf).solve()
    scatter = np.where(modelled, 0.0, np.inf)
    clip_above, kept = np.inf, None
    for _ in range(iterations):
        accumulator = run_pass(coefficients, scatter, clip_above)
        kept = np.concatenate(accumulator.kept)
        clip_above = clip_limit(np.concatenate(accumulator.chi2), clip_sigma)
        scatter = accumulator.scatter(scatter, n_t)
        coefficients, modelled, inverse = accumulator.solve()
        scatter = np.where(modelled, scatter, np.inf)
    model = ForwardModel(label_names, arm_names, arm_pixels, offset, scale, coefficients, scatter)
    fitted = np.ones(count, dtype=bool) if kept is None else kept
    per_row = _leave_one_out_chi2(model, inverse, batches, fitted)
    # Thresholds from the rows the final fit used; the clipped ones are what the flag is for.
    thresholds = {}
    for key, values in per_row.items():
        values = values[fitted & np.isfinite(values)]
        thresholds[key] = (
            float(THRESHOLD_MARGIN * np.quantile(values, THRESHOLD_QUANTILE)) if len(values) else np.inf
        )
    fit = {
        "rows": int(count),
        "clipped": int((~fitted).sum()),
        "clip_sigma": clip_sigma,
        "iterations": iterations,
        "modelled_pixels": int(np.isfinite(scatter).sum()),
        "threshold_quantile": THRESHOLD_QUANTILE,
        "threshold_margin": THRESHOLD_MARGIN,
        "median_chi2": float(np.nanmedian(per_row[TOTAL][fitted])) if fitted.any() else None,
    }
    # The coefficients' covariance is A^-1: the weights are the inverse variances of the residuals.
    errors = np.sqrt(np.maximum(np.einsum("ptt->tp", inverse), 0.0))
    model = ForwardModel(
        label_names, arm_names, arm_pixels, offset, scale, coefficients, scatter, errors, thresholds, fit
    )
    return model, per_row[TOTAL]


def _leave_one_out_chi2(
    model: ForwardModel, inverse: np.ndarray, batches: Callable[[], Iterable[Batch]], fitted: np.ndarray
) -> dict[str, np.ndarray]:
    """Each training row's chi^2 per arm as if the fit had not seen it: the exact leave-one-out
    (PRESS) residual of weighted least squares, ``r / (1 - h)`` with the leverage
    ``h = w d^T A^-1 d`` of the row at that pixel. In-sample residuals are smaller than an unseen
    spectrum's (21 terms per pixel fitted to a few hundred rows take a visible share), so
    thresholds taken from them would flag clean spectra far too often. Rows the fit left out
    (``fitted`` False) are unseen already (h = 0)."""
    n_t = inverse.shape[1]
    i, j = np.triu_indices(n_t)
    # d^T M d over the upper triangle: off-diagonal products count twice.
    quadratic = (inverse[:, i, j] * np.where(i == j, 1.0, 2.0)).T  # [pairs, P]
    per_row = {key: [] for key in (TOTAL, *model.arm_names)}
    start = 0
    for flux, ivar, good, labels in _checked(batches(), len(model.label_names), model.n_pixels):
        design = design_matrix(model._standardised(labels))
        weight = _weights(ivar, good, model.scatter)
        seen = fitted[start : start + len(labels)]
        start += len(labels)
        leverage = np.minimum(weight * ((design[:, i] * design[:, j]) @ quadratic), 0.99) * seen[:, None]
        residual = (np.asarray(flux, np.float64) - design @ model.coefficients) / (1.0 - leverage)
        for key, values in _reduced_chi2(residual, weight, model.arm_slices).items():
            per_row[key].append(values)
    return {key: np.concatenate(values) for key, values in per_row.items()}


def _reduced_chi2(
    residual: np.ndarray, weight: np.ndarray, arm_slices: dict[str, slice]
) -> dict[str, np.ndarray]:
    """``sum w r^2 / n`` over the pixels with weight, per arm and in total; NaN without any."""
    use = weight > 0
    terms = np.where(use, residual, 0.0) ** 2 * weight
    sums = np.stack([terms[:, part].sum(1) for part in arm_slices.values()], axis=1)
    counts = np.stack([use[:, part].sum(1) for part in arm_slices.values()], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {TOTAL: np.where(counts.sum(1) > 0, sums.sum(1) / counts.sum(1), np.nan)}
        for a, arm in enumerate(arm_slices):
            out[arm] = np.where(counts[:, a] > 0, sums[:, a] / counts[:, a], np.nan)
    return out


def _checked(batches: Iterable[Batch], n_labels: int, n_pixels: int) -> Iterator[Batch]:
    for flux, ivar, good, labels in batches:
        labels = np.asarray(labels, dtype=np.float64)
        if np.shape(flux) != (len(labels), n_pixels) or labels.shape[1:] != (n_labels,):
            raise InputError(
                f"forward-model batch of flux {np.shape(flux)} and labels {labels.shape} does not fit "
                f"{n_pixels} pixels and {n_labels} labels"
            )
        if not np.isfinite(labels).all():
            raise InputError("forward-model training labels must be finite")
        good = np.asarray(good, dtype=bool) & np.isfinite(flux) & np.isfinite(ivar)
        yield np.where(good, flux, 1.0), np.where(good, ivar, 0.0), good, labels


def array_batches(flux, ivar, good, labels, rows: np.ndarray | None = None) -> Callable[[], Iterator[Batch]]:
    """The ``batches`` callable of :func:`fit_forward_model_batches` over in-memory arrays
    (``rows``: the indices to use, default all)."""
    index = np.arange(len(flux)) if rows is None else np.asarray(rows)

    def batches() -> Iterator[Batch]:
        for lo in range(0, len(index), BATCH_ROWS):
            take = index[lo : lo + BATCH_ROWS]
            yield flux[take], ivar[take], good[take], labels[take]

    return batches


def fit_forward_model(
    flux: np.ndarray,
    ivar: np.ndarray,
    good: np.ndarray,
    labels: np.ndarray,
    label_names,
    arm_names,
    arm_pixels,
    **options,
) -> ForwardModel:
    """Fit on in-memory arrays: flux/ivar/good ``[N, P]`` in setup arm order, labels ``[N, L]``."""
    return fit_forward_model_batches(
        array_batches(flux, ivar, good, labels), label_names, arm_names, arm_pixels, **options
    )[0]
