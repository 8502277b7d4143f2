"""Labels refined by a local fit of the spectrum against noise-free reference spectra.

The network reads Teff, log g and [Fe/H] to 3-5x their Cramér-Rao bound (BENCHMARKS.md,
``bench/information_bound.py``). A fit to the spectrum itself, started from the network's labels
and regularised by them, gets much of that back (``bench/cv_refine.py``): for each spectrum,

1. take the ``neighbours`` reference stars nearest to the current labels (labels standardised by
   the library's spread);
2. fit their noise-free spectra by a quadratic in the labels centred on the current labels, with
   tricube weights by distance: its constant term is the model spectrum there, its linear terms
   the flux's slopes, its weighted residual the variance the labels do not explain;
3. one weighted least-squares step in the labels (weights ``1 / (1/ivar + variance)``) with the
   start as a Gaussian prior, together with nuisance terms a reduction leaves behind: a continuum
   tilt per arm, a velocity shift, and a change of the line-spread variance per arm (the flux's
   second derivative), each with its own Gaussian prior;
4. repeat from the new labels;
5. fit each of the ``own_lines`` labels (the abundances) once more from its own line windows only,
   the other labels and the nuisance terms held at the joint fit's values, from neighbours chosen
   by the other labels alone: the joint fit reads the abundances from every pixel, where the local
   model's errors outweigh a weak line's signal, and its abundances are worse than the network's.

The reference spectra must be noise-free (a synthetic grid at known labels, on the setup's
wavelengths): built from observed training spectra the local model fits their noise.
:class:`Refinement` is what a model directory holds of it (``refine/``, written by ``speclabel
train --reference-spectra``): the library, the settings, and the calibration of the refined labels;
``Refinement.apply`` is the step the label job, ``speclabel evaluate`` and the calibration run after
``Ensemble.predict``. Plain numpy on arrays; nothing here knows about catalogues or Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from speclabel.core.config import dataclass_from_dict
from speclabel.core.errors import ConfigError, IntegrityError
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import SPEED_OF_LIGHT_KMS, Setup

from .calibration import ErrorCalibration

# The labels whose refined values replace the network's by default. The joint fit's abundances are
# worse than the network's ([Al/Fe] +0.013 dex, [Mg/Fe] equal; bench/cv_refine.py), though fitting
# all five and keeping three measured better than fitting three; fitted again from their own line
# windows alone they are better than the network's ([Mg/Fe] -0.005, [Al/Fe] -0.014 dex on the
# twins), so the default keeps them from that fit.
KEPT_LABELS = ("teff", "logg", "feh", "mgfe", "alfe")
OWN_LINES_LABELS = ("mgfe", "alfe")
TENSORS = ("labels", "flux", "mask")


@dataclass(frozen=True)
class RefineConfig:
    """How the fit runs. Widths are the 1-sigma of Gaussian priors; a nuisance width of None leaves
    that term out of the fit."""

    # Per label of the library: how far the start may be off (empty: `speclabel train` sets them).
    prior_width: tuple[float, ...] = ()
    neighbours: int = 80
    iterations: int = 3
    fitted: tuple[str, ...] | None = None  # the labels fitted (None: all); the others keep the start
    tilt_width: float | None = 0.02  # continuum tilt per arm, fraction of the flux at the arm's ends
    velocity_width_kms: float | None = 5.0
    broadening_width_px2: float | None = 1.0  # extra line-spread variance per arm, pixels^2
    kept: tuple[str, ...] = KEPT_LABELS  # the refined labels a model's catalogue rows take
    # Labels fitted once more after the joint fit, each from its own line windows only (the setup's
    # ``label_lines``), the other labels and the nuisance terms held at the joint fit's values.
    own_lines: tuple[str, ...] = OWN_LINES_LABELS
    own_lines_iterations: int = 1
    # An own-lines label that moves more than this many prior widths from the network's is set back
    # to the network's: on clean spectra that is < 0.5 % of rows (bench/cv_refine.py), on a binary
    # or a spectrum with another star's arm the windows' few pixels are read as an abundance.
    own_lines_clip: float = 3.0

    def __post_init__(self) -> None:
        for name in ("prior_width", "kept", "own_lines") + (("fitted",) if self.fitted is not None else ()):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if not all(w > 0 for w in self.prior_width):
            problems.append(f"prior widths must be positive, got {self.prior_width}")
        if self.neighbours < 10:
            problems.append(f"neighbours must be >= 10, got {self.neighbours}")
        if not self.own_lines_clip > 0:
            problems.append(f"own_lines_clip must be positive, got {self.own_lines_clip}")
        if self.iterations < 1 or self.own_lines_iterations < 1:
            problems.append(
                f"iterations must be >= 1, got {self.iterations} and {self.own_lines_iterations} (own lines)"
            )
        widths = (self.tilt_width, self.velocity_width_kms, self.broadening_width_px2)
        if any(w is not None and not w > 0 for w in widths):
            problems.append("nuisance widths must be positive (or absent: the term is left out)")
        if problems:
            raise ConfigError("[refine]: " + "; ".join(problems))

    def narrowed(self, label_names, setup: Setup) -> RefineConfig:
        """This config for a model of ``label_names`` on ``setup``: the default own-lines labels
        narrowed to those the model has and the setup names line windows for, and the default kept
        labels to those the model has, an abundance only where it is fitted from its own lines (the
        joint fit's abundances are worse than the network's). Settings given explicitly stay."""
        own_lines = self.own_lines
        if own_lines == OWN_LINES_LABELS:
            have = set(label_names) & {name for name, groups in setup.label_lines.items() if groups}
            own_lines = tuple(name for name in OWN_LINES_LABELS if name in have)
        kept = self.kept
        if kept == KEPT_LABELS:
            kept = tuple(
                name
                for name in KEPT_LABELS
                if name in label_names and (name not in OWN_LINES_LABELS or name in own_lines)
            )
        return dataclasses.replace(self, own_lines=own_lines, kept=kept)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> RefineConfig:
        return dataclass_from_dict(cls, data, what="[refine]")


def quadratic_terms(n_labels: int) -> int:
    """The coefficients of the local quadratic in ``n_labels`` labels (21 for five)."""
    return 1 + n_labels + n_labels * (n_labels + 1) // 2


class ReferenceLibrary:
    """Noise-free reference spectra ``flux`` [N, P] with their ``labels`` [N, L] (columns in
    ``label_names`` order) and good-pixel ``mask`` [N, P], on ``setup``'s wavelengths."""

    def __init__(self, labels, flux, mask, setup: Setup, label_names=LABEL_NAMES):
        labels = np.asarray(labels, dtype=np.float64)
        if labels.ndim != 2 or labels.shape[1] != len(label_names):
            raise ValueError(f"labels must be [N, {len(label_names)}] ({', '.join(label_names)})")
        if not np.isfinite(labels).all():
            raise ValueError("reference labels must all be finite")
        if flux.shape != (len(labels), setup.n_pixels) or mask.shape != flux.shape:
            raise ValueError(
                f"flux and mask must be [{len(labels)}, {setup.n_pixels}] for setup {setup.name}"
            )
        # float32 flux (half the memory of an actor holding it); each local fit works in float64.
        self.labels, self.flux, self.mask = labels, np.asarray(flux, dtype=np.float32), np.asarray(mask, bool)
        self.setup, self.label_names = setup, tuple(label_names)
        self.scale = labels.std(0)
        self.scale[self.scale == 0] = 1.0

    def local_model(self, centre: np.ndarray, neighbours: int, ignore: int | None = None, pixels=None):
        """At labels ``centre`` [L]: the model flux [P], its slopes [L, P], the variance the labels do
        not explain [P] and the pixels good in every neighbour [P]; with ``pixels`` (indices), on
        those pixels alone. With ``ignore``, the neighbours are the nearest in the other labels, so
        that label spans the library's own spread: the slope of a weak line is then measured over a
        wide lever arm."""
        z = (self.labels - centre) / self.scale
        distance = np.sqrt((np.delete(z, ignore, axis=1) ** 2 if ignore is not None else z**2).sum(1))
        nearest = np.argsort(distance)[:neighbours]
        u = distance[nearest] / (distance[nearest].max() * 1.0001)
        weight = np.sqrt((1 - u**3) ** 3)[:, None]  # tricube, as the square root of a LS weight
        zn = z[nearest]
        quadratic = [zn[:, j] * zn[:, k] for j in range(zn.shape[1]) for k in range(j, zn.shape[1])]
        design = np.column_stack([np.ones(len(zn)), self.labels[nearest] - centre, *quadratic]) * weight
        rows = nearest if pixels is None else np.ix_(nearest, pixels)
        flux = self.flux[rows].astype(np.float64) * weight
        # The least-squares solution through the pseudo-inverse of the small design matrix: the
        # same minimum-norm solution as lstsq, without an SVD over every pixel (5x faster).
        coefficients = np.linalg.pinv(design) @ flux
        residual = flux - design @ coefficients
        dof = max(1.0, (weight**2).sum() - design.shape[1])
        variance = (residual**2).sum(0) / dof
        good = self.mask[rows].all(0)
        return coefficients[0], coefficients[1 : 1 + len(centre)], variance, good


def nuisance_columns(model: np.ndarray, setup: Setup, config: RefineConfig) -> tuple[np.ndarray, np.ndarray]:
    """The flux's derivatives [K, P] by each nuisance term of ``config`` at ``model`` [P], and their
    prior widths [K]: tilt per arm, velocity, broadening per arm."""
    columns, widths = [], []
    parts = list(zip(setup.arms, setup.arm_slices.values(), strict=True))
    if config.tilt_width is not None:
        for arm, part in parts:
            column = np.zeros_like(model)
            column[part] = model[part] * arm.wave_unit
            columns.append(column)
            widths.append(config.tilt_width)
    if config.velocity_width_kms is not None:
        column = np.zeros_like(model)
        for arm, part in parts:
            column[part] = -np.gradient(model[part], np.log(arm.wave)) / SPEED_OF_LIGHT_KMS
        columns.append(column)
        widths.append(config.velocity_width_kms)
    if config.broadening_width_px2 is not None:
        # A line-spread function wider by s^2 pixels^2 changes the flux by s^2/2 times its second
        # derivative: the fit would otherwise read a resolution change, or resampling, as labels.
        for _, part in parts:
            column = np.zeros_like(model)
            column[part] = 0.5 * np.gradient(np.gradient(model[part]))
            columns.append(column)
            widths.append(config.broadening_width_px2)
    return np.array(columns).reshape(len(columns), len(model)), np.asarray(widths, dtype=np.float64)


def own_line_pixels(setup: Setup, label: str) -> np.ndarray:
    """The pixels [P] of ``label``'s own line windows in ``setup`` (its ``label_lines`` groups)."""
    if not setup.label_lines.get(label):
        raise ConfigError(f"[refine] own_lines: setup {setup.name!r} names no line windows for {label!r}")
    return setup.label_line_mask(label)


def _fit_step(residual, weight, slopes, label_precision, prior_offset, nuisance=None, nuisance_width=None):
    """One weighted least-squares step of the labels with ``slopes`` [F, P] (Gaussian priors of
    precision ``label_precision`` [F] centred ``prior_offset`` [F] from the current labels) and of
    the ``nuisance`` terms [K, P] (priors of width ``nuisance_width`` [K] centred on zero): the step
    [F + K] and its posterior covariance."""
    design, precision = slopes, np.asarray(label_precision, dtype=np.float64)
    prior_mean = np.asarray(prior_offset, dtype=np.float64)
    if nuisance is not None and len(nuisance):
        design = np.concatenate([slopes, nuisance])
        precision = np.concatenate([precision, 1.0 / nuisance_width**2])
        prior_mean = np.concatenate([prior_mean, np.zeros(len(nuisance))])
    weighted = design * weight
    normal = weighted @ design.T + np.diag(precision)
    covariance = np.linalg.inv(normal)
    return covariance @ (weighted @ residual + precision * prior_mean), covariance


def refine_labels(library: ReferenceLibrary, config: RefineConfig, flux, ivar, mask, start):
    """Refined labels [N, L] of spectra ``flux``/``ivar``/``mask`` [N, P] from ``start`` [N, L]
    (the network's labels, in the library's label order), and their posterior standard deviations
    [N, L] from the fit's and the prior's information (NaN for labels not fitted). The posterior
    std counts the noise and the local model's unexplained variance, not how far the local
    quadratic is off, so it is a lower bound of the error (measured 0.35-0.42 of it)."""
    start = np.asarray(start, dtype=np.float64)
    config = config.narrowed(library.label_names, library.setup)
    n_labels = len(library.label_names)
    if start.shape != (len(flux), n_labels) or len(config.prior_width) != n_labels:
        raise ValueError(f"start must be [N, {n_labels}] and prior_width have {n_labels} widths")
    fitted = np.array(
        [library.label_names.index(n) for n in (config.fitted or library.label_names)], dtype=int
    )
    prior_precision = 1.0 / np.asarray(config.prior_width, dtype=np.float64) ** 2
    label_precision = prior_precision[fitted]
    out = start.copy()
    posterior_std = np.full_like(out, np.nan)
    own = [
        (library.label_names.index(n), np.flatnonzero(own_line_pixels(library.setup, n)))
        for n in config.own_lines
    ]
    for i in range(len(flux)):
        if not np.isfinite(start[i]).all():
            continue  # no start, no fit: the row keeps what it has
        current = start[i].copy()
        good_i = mask[i] & (ivar[i] > 0)
        noise = 1.0 / np.where(good_i, ivar[i], 1.0)
        for _ in range(config.iterations):
            model, slopes, variance, good = library.local_model(current, config.neighbours)
            nuisance, nuisance_width = nuisance_columns(model, library.setup, config)
            step, covariance = _fit_step(
                flux[i] - model,
                np.where(good & good_i, 1.0 / (noise + variance), 0.0),
                slopes[fitted],
                label_precision,
                (start[i] - current)[fitted],
                nuisance,
                nuisance_width,
            )
            current[fitted] += step[: len(fitted)]
        posterior_std[i, fitted] = np.sqrt(np.diag(covariance)[: len(fitted)])
        # The nuisance terms the joint fit found, held while each own-lines label is fitted: its few
        # line pixels could not tell a velocity shift from an abundance.
        held = step[len(fitted) :] @ nuisance
        for index, pixels in own:
            current[index] = start[i, index]
            for _ in range(config.own_lines_iterations):
                model, slopes, variance, good = library.local_model(
                    current, config.neighbours, ignore=index, pixels=pixels
                )
                step, covariance = _fit_step(
                    flux[i, pixels] - model - held[pixels],
                    np.where(good & good_i[pixels], 1.0 / (noise[pixels] + variance), 0.0),
                    slopes[[index]],
                    prior_precision[[index]],
                    np.array([start[i, index] - current[index]]),
                )
                current[index] += step[0]
            posterior_std[i, index] = np.sqrt(covariance[0, 0])
            if abs(current[index] - start[i, index]) > config.own_lines_clip * config.prior_width[index]:
                current[index] = start[i, index]
        out[i] = current
    return out, posterior_std


@dataclass(frozen=True, eq=False)  # numpy inside
class Refinement:
    """What a model directory holds to refine its network's labels (``refine/`` and model.json
    ``refine``): the reference library, the fit's settings, where the reference spectra came from,
    and the error calibration of the refined labels (``<label>_err`` of a refined row; the
    network's own calibration stays model.json ``calibration``, for rows labelled without it)."""

    library: ReferenceLibrary
    config: RefineConfig
    source: dict = field(default_factory=dict)
    calibration: ErrorCalibration | None = None

    def __post_init__(self) -> None:
        names = self.library.label_names
        object.__setattr__(self, "config", self.config.narrowed(names, self.library.setup))
        named = set(self.config.kept) | set(self.config.fitted or ()) | set(self.config.own_lines)
        unknown = sorted(named - set(names))
        if unknown or len(self.config.prior_width) != len(names):
            raise ConfigError(
                f"[refine] does not fit the labels {names}: {len(self.config.prior_width)} prior widths"
                + (f", unknown labels {unknown}" if unknown else "")
            )
        for name in self.config.own_lines:
            own_line_pixels(self.library.setup, name)  # a clear error now, not in the label job

    @property
    def kept(self) -> np.ndarray:
        """The columns (in the library's label order) whose refined values the rows take."""
        return np.array([self.library.label_names.index(n) for n in self.config.kept], dtype=int)

    def apply(self, prediction, flux, ivar, mask):
        """``prediction`` (an ``Ensemble.predict`` result) with the kept labels refined on the
        spectra ``flux``/``ivar``/``mask`` [N, P]: ``mean`` the refined labels, ``network_mean``
        the network's, ``refined_std`` the fit's posterior std (NaN for labels not kept)."""
        refined, posterior = refine_labels(self.library, self.config, flux, ivar, mask, prediction.mean)
        kept = self.kept
        mean = np.array(prediction.mean, dtype=np.float64, copy=True)
        mean[:, kept] = refined[:, kept]
        refined_std = np.full_like(mean, np.nan)
        refined_std[:, kept] = posterior[:, kept]
        return dataclasses.replace(
            prediction, mean=mean, network_mean=prediction.mean, refined_std=refined_std
        )

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays of the model directory's safetensors file (the mask bit-packed: 1/8 the bytes)."""
        return {
            "labels": np.ascontiguousarray(self.library.labels),
            "flux": np.ascontiguousarray(self.library.flux, dtype=np.float32),
            "mask": np.packbits(self.library.mask, axis=1),
        }

    def describe(self) -> dict:
        """model.json's ``refine`` section (io.py adds the file and its sha256)."""
        return {
            "labels": list(self.library.label_names),
            "reference_rows": len(self.library.labels),
            "config": self.config.to_dict(),
            "source": self.source,
            **({"calibration": self.calibration.to_dict()} if self.calibration is not None else {}),
        }

    @classmethod
    def from_stored(cls, tensors: dict[str, np.ndarray], section: dict, setup: Setup) -> Refinement:
        """The refinement from its stored arrays and its model.json section."""
        missing = sorted(set(TENSORS) - set(tensors))
        if missing:
            raise IntegrityError(f"check 'reference spectra': the stored library lacks {missing}")
        try:
            flux = tensors["flux"]
            mask = np.unpackbits(tensors["mask"], axis=1, count=flux.shape[1]).astype(bool)
            library = ReferenceLibrary(tensors["labels"], flux, mask, setup, tuple(section["labels"]))
            calibration = section.get("calibration")
            # A model stored before the own-lines fit existed refines as it did: without it.
            config = {"own_lines": [], **section["config"]}
            return cls(
                library,
                RefineConfig.from_dict(config),
                dict(section.get("source", {})),
                None if calibration is None else ErrorCalibration.from_dict(calibration),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise IntegrityError(
                f"check 'reference spectra': invalid refine section or arrays: {exc}"
            ) from exc
