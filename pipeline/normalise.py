"""Continuum normalisation of one arm, and the rule that decides whether a flux is normalised already.

``--normalised`` chooses: ``yes`` trusts the input to be continuum-normalised, ``no`` always fits a
continuum, ``auto`` (the default) treats a spectrum as normalised when its file says so — an empty
flux unit, a unit that contains "norm", or ``CONTNORM = T`` (ESO Phase 3) — *and* its upper envelope
(the 90th percentile of the unmasked flux) lies between 0.8 and 1.25; otherwise it fits one.

The continuum is an iteratively clipped Legendre polynomial per arm (as IRAF ``continuum`` and
most survey pipelines do): fit the unmasked pixels, drop those more than ``low_reject`` robust
sigmas below the fit (absorption lines) or ``high_reject`` above it (cosmics, emission), refit, and
stop when the kept set no longer changes. Low-order polynomials over a 300-500 Å arm follow the
blaze and flux-calibration shape without bending into broad lines (Ca II triplet, Paschen wings).
Dividing by the continuum scales ivar by the continuum squared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import legendre

NORMALISED_MODES = ("auto", "yes", "no")
ENVELOPE_PERCENTILE = 90.0
ENVELOPE_RANGE = (0.8, 1.25)


@dataclass(frozen=True)
class ContinuumConfig:
    order: int = 3
    low_reject: float = 1.5
    high_reject: float = 3.0
    max_iterations: int = 20
    min_pixels: int = 50


def unit_says_normalised(flux_unit: str | None, declared: bool | None) -> bool:
    if declared is not None:
        return declared
    text = (flux_unit or "").strip().lower()
    return text == "" or "norm" in text


def upper_envelope(flux: np.ndarray, good: np.ndarray) -> float:
    values = flux[good]
    return float(np.percentile(values, ENVELOPE_PERCENTILE)) if values.size else float("nan")


def is_normalised(
    mode: str, flux: np.ndarray, ivar: np.ndarray, flux_unit: str | None, declared: bool | None
) -> bool:
    """Whether to take ``flux`` as continuum-normalised under ``--normalised mode``."""
    if mode not in NORMALISED_MODES:
        raise ValueError(f"--normalised must be one of {NORMALISED_MODES}, not {mode!r}")
    if mode != "auto":
        return mode == "yes"
    if not unit_says_normalised(flux_unit, declared):
        return False
    lo, hi = ENVELOPE_RANGE
    envelope = upper_envelope(flux, (ivar > 0) & np.isfinite(flux))
    return bool(lo <= envelope <= hi)


def fit_continuum(
    wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, config: ContinuumConfig = ContinuumConfig()
) -> np.ndarray | None:
    """The continuum at every pixel of ``wave``, or None when too few pixels are unmasked to fit one."""
    good = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    if good.sum() < max(config.min_pixels, config.order + 2):
        return None
    x = 2.0 * (wave - wave[0]) / (wave[-1] - wave[0]) - 1.0
    keep = good.copy()
    for _ in range(config.max_iterations):
        coefficients = legendre.legfit(x[keep], flux[keep], config.order)
        continuum = legendre.legval(x, coefficients)
        residual = flux - continuum
        kept_residual = residual[keep]
        sigma = 1.4826 * np.median(np.abs(kept_residual - np.median(kept_residual)))
        if not sigma > 0:
            break
        new_keep = good & (residual > -config.low_reject * sigma) & (residual < config.high_reject * sigma)
        if new_keep.sum() < config.order + 2 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return continuum


def normalise(
    wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, config: ContinuumConfig = ContinuumConfig()
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(flux / continuum, ivar * continuum²)``; pixels where the continuum is not positive are masked."""
    continuum = fit_continuum(wave, flux, ivar, config)
    if continuum is None:
        return None
    positive = continuum > 0
    flux_out = np.where(positive, flux / np.where(positive, continuum, 1.0), np.nan)
    ivar_out = np.where(positive, ivar * continuum**2, 0.0)
    return flux_out, ivar_out
