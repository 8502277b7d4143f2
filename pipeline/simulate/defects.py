"""Defective spectra for testing the anomaly screening: what real survey spectra suffer from and a
label network cannot see. Each injector takes noise-free normalised flux ``[N, P]`` on a setup's
grid (arms concatenated in setup order) and returns a defective copy; observe the result with
:func:`.survey.photon_noise`. Used by the tests and by ``bench/trust_defects.py``.

* :func:`double_lined_binary`: a second star's spectrum added at a velocity offset (SB2);
* :func:`emission`: emission in line cores (Ca II triplet chromospheric emission, H emission);
* :func:`cosmic_rays`: narrow positive spikes;
* :func:`continuum_error`: one arm's continuum off by a few per cent (scale and tilt);
* :func:`foreign_arm`: one arm replaced by another star's.
"""

from __future__ import annotations

import numpy as np

from speclabel.core.errors import ConfigError
from speclabel.core.setups import SPEED_OF_LIGHT_KMS, Setup

# Air wavelengths (Angstrom) of the lines emission is injected into.
EMISSION_LINES = {
    "Ca II": (8498.02, 8542.09, 8662.14),
    "H I": (8502.48, 8545.38, 8598.39, 8665.02, 8750.47, 8862.78),
}
DEFECTS = ("binary", "emission", "cosmic_rays", "continuum", "foreign_arm")


def shifted(flux: np.ndarray, setup: Setup, velocity_kms: np.ndarray) -> np.ndarray:
    """``flux`` Doppler-shifted by ``velocity_kms [N]`` (positive: redshift), per arm by linear
    interpolation; pixels shifted in from beyond an arm's edge take the continuum, 1."""
    out = np.empty_like(flux)
    factor = 1.0 + np.asarray(velocity_kms, dtype=np.float64) / SPEED_OF_LIGHT_KMS
    for arm, part in zip(setup.arms, setup.arm_slices.values(), strict=True):
        wave = arm.wave
        for i in range(len(flux)):
            out[i, part] = np.interp(wave / factor[i], wave, flux[i, part], left=1.0, right=1.0)
    return out


def double_lined_binary(
    flux: np.ndarray, companion: np.ndarray, setup: Setup, velocity_kms: np.ndarray, light_ratio: np.ndarray
) -> np.ndarray:
    """A primary (``flux``) and a companion (``companion``, noise-free) seen together, the companion
    at ``velocity_kms`` relative to the primary and ``light_ratio`` (companion / primary continuum)."""
    ratio = np.asarray(light_ratio, dtype=np.float64)[:, None]
    return ((flux + ratio * shifted(companion, setup, velocity_kms)) / (1.0 + ratio)).astype(flux.dtype)


def emission(
    flux: np.ndarray, setup: Setup, lines: str, height: np.ndarray, fwhm_kms: float = 20.0
) -> np.ndarray:
    """Gaussian emission of ``height [N]`` (in continuum units) and ``fwhm_kms`` at the cores of
    :data:`EMISSION_LINES` ``[lines]`` that fall on the grid."""
    if lines not in EMISSION_LINES:
        raise ConfigError(f"no emission lines {lines!r}; known: {sorted(EMISSION_LINES)}")
    wave = setup.wave
    profile = np.zeros_like(wave)
    for centre in EMISSION_LINES[lines]:
        sigma = centre * fwhm_kms / SPEED_OF_LIGHT_KMS / 2.3548
        profile += np.exp(-0.5 * ((wave - centre) / sigma) ** 2)
    return (flux + np.asarray(height, dtype=np.float64)[:, None] * profile).astype(flux.dtype)


def cosmic_rays(
    flux: np.ndarray, rng: np.random.Generator, hits: int = 10, height: tuple[float, float] = (0.3, 2.0)
) -> np.ndarray:
    """``hits`` spikes per spectrum, each 1-3 pixels wide, of a height drawn log-uniformly from
    ``height`` (continuum units) at random pixels."""
    out = flux.copy()
    n, n_pixels = flux.shape
    for i in range(n):
        for start in rng.integers(0, n_pixels - 3, hits):
            width = int(rng.integers(1, 4))
            out[i, start : start + width] += np.exp(rng.uniform(*np.log(height)))
    return out


def continuum_error(
    flux: np.ndarray, setup: Setup, arm: str, offset: np.ndarray, tilt: np.ndarray
) -> np.ndarray:
    """Arm ``arm`` multiplied by ``1 + offset + tilt * x`` (x from -1 to 1 across the arm): a
    normalisation off by a few per cent, as a bad continuum fit or a scattered-light residual."""
    part = setup.arm_slices[setup.arm(arm).name]
    x = np.linspace(-1.0, 1.0, part.stop - part.start)
    out = flux.copy()
    scale = 1.0 + np.asarray(offset)[:, None] + np.asarray(tilt)[:, None] * x
    out[:, part] = (flux[:, part] * scale).astype(flux.dtype)
    return out


def foreign_arm(flux: np.ndarray, other: np.ndarray, setup: Setup, arm: str) -> np.ndarray:
    """Arm ``arm`` of each spectrum replaced by that arm of ``other`` (another star): a fibre or
    cross-match mix-up between the setups of one target."""
    part = setup.arm_slices[setup.arm(arm).name]
    out = flux.copy()
    out[:, part] = other[:, part]
    return out


def inject(
    kind: str, flux: np.ndarray, other: np.ndarray, setup: Setup, rng: np.random.Generator
) -> np.ndarray:
    """Defect ``kind`` (one of :data:`DEFECTS`) with parameters drawn as the tests and the bench
    use them: binaries at 20-60 km/s with light ratios 0.5-1; Ca II triplet emission filling the
    cores (0.3-0.8 of the continuum); 10 cosmic-ray hits; one arm's continuum off by 2-5 % with a
    tilt of up to 2 %; one arm (drawn per row) from another star. ``other``: noise-free spectra of
    other stars (the companions, the foreign arms), one per row."""
    n = len(flux)
    if kind == "binary":
        velocity = rng.uniform(20.0, 60.0, n) * rng.choice([-1.0, 1.0], n)
        return double_lined_binary(flux, other, setup, velocity, rng.uniform(0.5, 1.0, n))
    if kind == "emission":
        return emission(flux, setup, "Ca II", rng.uniform(0.3, 0.8, n))
    if kind == "cosmic_rays":
        return cosmic_rays(flux, rng)
    arms = [arm.name for arm in setup.arms]
    which = rng.integers(0, len(arms), n)
    out = flux.copy()
    for a, arm in enumerate(arms):
        rows = which == a
        if not rows.any():
            continue
        if kind == "continuum":
            size = rng.uniform(0.02, 0.05, rows.sum()) * rng.choice([-1.0, 1.0], rows.sum())
            out[rows] = continuum_error(flux[rows], setup, arm, size, rng.uniform(-0.02, 0.02, rows.sum()))
        elif kind == "foreign_arm":
            out[rows] = foreign_arm(flux[rows], other[rows], setup, arm)
        else:
            raise ConfigError(f"unknown defect {kind!r}; known: {DEFECTS}")
    return out
