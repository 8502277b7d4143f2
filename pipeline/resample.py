"""Put a spectrum on a setup's grid: wavelength units, air/vacuum, rest frame, flux-conserving resampling.

Every function here is plain numpy over arrays; :mod:`.ingest` chains them per file:

1. :func:`angstrom_per_unit` turns the file's wavelength unit into Angstrom (``nm``, ``um``, ``m``...);
2. :func:`vacuum_to_air` / :func:`air_to_vacuum` move wavelengths into the setup's medium with the
   refractive index of Morton (2000, ApJS 130, 403), the IAU standard that astropy and specutils use;
3. :func:`to_rest_frame` removes a radial velocity given in the optical convention
   (``λ_obs = λ_rest (1 + v/c)``), the convention of stellar radial velocities;
4. :func:`resample` rebins flux onto the arm's pixels conserving flux: each output pixel is the
   overlap-weighted mean of the input pixels it covers, and the variances combine with the squared
   weights, so ``1/ivar`` is the variance of that mean. Masked input pixels (ivar 0) carry no
   weight; an output pixel with less than ``min_coverage`` of its width covered by good input is
   masked. Correlations that rebinning introduces between neighbouring pixels are not tracked.
"""

from __future__ import annotations

import numpy as np
from astropy import units as u
from scipy.ndimage import median_filter

from speclabel.core.setups import SPEED_OF_LIGHT_KMS, Arm

# A step between two input pixels larger than this many times the local pixel step is a gap (a CCD
# gap, a cut-out telluric band): nothing is interpolated across it. One or two missing pixels are not.
GAP_FACTOR = 3.0
DEFAULT_MIN_COVERAGE = 0.5

# Spellings of Angstrom that legacy headers use and astropy's parsers do not know.
_ANGSTROM_ALIASES = {"a", "aa", "ang", "angs", "angstrom", "angstroms", "angstroem"}


class WavelengthUnitError(ValueError):
    """A wavelength unit that is not a length (or not a unit at all)."""


def angstrom_per_unit(unit: str | None) -> float:
    """How many Angstrom one ``unit`` is; an empty unit means Angstrom (the IRAF/ESO convention)."""
    text = (unit or "").strip()
    if not text or text.lower() in _ANGSTROM_ALIASES:
        return 1.0
    parsed = None
    for fmt in ("fits", "generic"):
        try:
            parsed = u.Unit(text, format=fmt)
            break
        except ValueError:
            continue
    if parsed is None or not parsed.is_equivalent(u.AA):
        raise WavelengthUnitError(f"wavelength unit {text!r} is not a length")
    return float(parsed.to(u.AA))


def vacuum_to_air(wave_vacuum: np.ndarray) -> np.ndarray:
    """Air wavelengths (Angstrom) from vacuum ones, Morton (2000) eq. 8, valid above 2000 Å."""
    s2 = (1e4 / wave_vacuum) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    return wave_vacuum / n


def air_to_vacuum(wave_air: np.ndarray) -> np.ndarray:
    """Vacuum wavelengths (Angstrom) from air ones: the inversion of Morton (2000) by N. Piskunov (VALD)."""
    s2 = (1e4 / wave_air) ** 2
    n = (
        1.0
        + 8.336624212083e-5
        + 2.408926869968e-2 / (130.1065924522 - s2)
        + 1.599740894897e-4 / (38.92568793293 - s2)
    )
    return wave_air * n


def convert_medium(wave: np.ndarray, source: str, target: str) -> np.ndarray:
    if source == target:
        return wave
    if (source, target) == ("vacuum", "air"):
        return vacuum_to_air(wave)
    if (source, target) == ("air", "vacuum"):
        return air_to_vacuum(wave)
    raise ValueError(f"unknown media {source!r} -> {target!r}")


def to_rest_frame(wave: np.ndarray, rv_kms: float) -> np.ndarray:
    return wave / (1.0 + rv_kms / SPEED_OF_LIGHT_KMS)


def pixel_edges(centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper edges of pixels with increasing centres.

    Neighbouring pixels meet half-way. Across a gap (a step above ``GAP_FACTOR`` times the local
    median step) each side keeps half a local step, so the gap stays uncovered.
    """
    n = centres.size
    if n < 2:
        raise ValueError("a spectrum needs at least two pixels")
    step = np.diff(centres)
    local = median_filter(step, size=min(11, step.size), mode="nearest")
    half = np.where(step > GAP_FACTOR * local, 0.5 * local, 0.5 * step)
    lower = np.empty(n)
    upper = np.empty(n)
    lower[1:] = centres[1:] - half
    upper[:-1] = centres[:-1] + half
    lower[0] = centres[0] - half[0]
    upper[-1] = centres[-1] + half[-1]
    return lower, upper


def arm_edges(arm: Arm) -> tuple[np.ndarray, np.ndarray]:
    wave = arm.wave
    return wave - 0.5 * arm.wave_step, wave + 0.5 * arm.wave_step


def resample(
    lower: np.ndarray,
    upper: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    out_lower: np.ndarray,
    out_upper: np.ndarray,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
) -> tuple[np.ndarray, np.ndarray]:
    """Flux-conserving rebinning of (flux, ivar) from input pixels onto output pixels.

    Pixels are ``[lower, upper)`` intervals, sorted and non-overlapping. Returns float64 flux (NaN
    where masked) and ivar (0 where masked). Output pixel j gets ``Σ w_ij f_i / Σ w_ij`` over good
    input pixels i, with ``w_ij`` the length of their overlap, and variance ``Σ w_ij² σ_i² / (Σ w_ij)²``.
    """
    good = (ivar > 0) & np.isfinite(ivar) & np.isfinite(flux)
    # Cutting the axis at every edge of both grids gives pieces that each lie in at most one input and
    # one output pixel, so the overlaps are the pieces' lengths, summed per output pixel.
    cuts = np.unique(np.concatenate([lower, upper, out_lower, out_upper]))
    start, stop = cuts[:-1], cuts[1:]
    middle = 0.5 * (start + stop)
    i = np.searchsorted(lower, middle, side="right") - 1
    j = np.searchsorted(out_lower, middle, side="right") - 1
    inside = (i >= 0) & (j >= 0)
    inside[inside] &= (middle[inside] < upper[i[inside]]) & (middle[inside] < out_upper[j[inside]])
    inside[inside] &= good[i[inside]]
    i, j, length = i[inside], j[inside], (stop - start)[inside]

    n_out = out_lower.size
    weight = np.bincount(j, length, minlength=n_out)
    flux_sum = np.bincount(j, length * flux[i], minlength=n_out)
    variance_sum = np.bincount(j, length**2 / ivar[i], minlength=n_out)
    covered = weight >= min_coverage * (out_upper - out_lower)

    flux_out = np.full(n_out, np.nan)
    ivar_out = np.zeros(n_out)
    flux_out[covered] = flux_sum[covered] / weight[covered]
    ivar_out[covered] = weight[covered] ** 2 / variance_sum[covered]
    return flux_out, ivar_out
