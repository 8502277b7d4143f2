"""Continuum normalisation recovers a known continuum; the auto rule reads units and the envelope."""

import numpy as np
import pytest

from speclabel.pipeline.normalise import ContinuumConfig, fit_continuum, is_normalised, normalise
from speclabel.pipeline.simulate import microturbulence, synthesize


def _star(setup, teff, logg, feh):
    labels = {
        "teff": np.array([teff]),
        "logg": np.array([logg]),
        "feh": np.array([feh]),
        "mgfe": np.array([0.1]),
        "alfe": np.array([0.1]),
        "alpha": np.array([0.1]),
        "vbroad": np.array([5.0]),
        "rv": np.array([0.0]),
    }
    labels["vmic"] = microturbulence(labels["teff"], labels["logg"])
    return synthesize(setup, labels)[0].astype(np.float64)


@pytest.mark.parametrize(("teff", "logg", "feh"), [(4500.0, 2.0, 0.2), (6300.0, 4.2, -1.5)])
def test_recovers_a_known_continuum_under_absorption_lines(setup, teff, logg, feh):
    normalised = _star(setup, teff, logg, feh)
    rng = np.random.default_rng(0)
    for arm, part in zip(setup.arms, setup.arm_slices.values(), strict=True):
        x = (arm.wave - arm.wave.mean()) / (arm.wave[-1] - arm.wave[0])
        continuum = 1000.0 * (1 + 0.3 * x - 0.2 * x**2 + 0.1 * x**3)  # a blaze-like tilt and curvature
        sigma = continuum * normalised[part] / 100.0  # S/N 100
        flux = continuum * normalised[part] + sigma * rng.standard_normal(arm.n_pixels)
        ivar = 1.0 / sigma**2
        ivar[::97] = 0.0  # some masked pixels
        fitted = fit_continuum(arm.wave, flux, ivar)
        assert np.max(np.abs(fitted / continuum - 1)) < 0.01, arm.name
        flux_n, ivar_n = normalise(arm.wave, flux, ivar)
        good = ivar > 0
        np.testing.assert_allclose(flux_n[good], flux[good] / fitted[good])
        np.testing.assert_allclose(ivar_n, ivar * fitted**2)
        # Normalised flux and its errors line up with the truth: residuals ~ N(0, 1) in units of sigma.
        pulls = (flux_n - normalised[part])[good] * np.sqrt(ivar_n[good])
        assert abs(np.median(pulls)) < 0.6 and 0.85 < np.std(pulls) < 1.15


def test_too_few_unmasked_pixels_give_no_continuum():
    wave = np.linspace(5339.0, 5619.0, 500)
    ivar = np.zeros(500)
    ivar[:20] = 1.0
    assert fit_continuum(wave, np.ones(500), ivar) is None
    assert normalise(wave, np.ones(500), ivar) is None
    assert fit_continuum(wave, np.ones(500), np.ones(500), ContinuumConfig(order=2)) == pytest.approx(
        np.ones(500)
    )


def test_non_positive_continuum_masks_pixels():
    wave = np.linspace(0.0, 1.0, 200)
    flux = np.linspace(-1.0, 1.0, 200)  # a straight line through zero: the "continuum" is the line
    flux_n, ivar_n = normalise(wave, flux, np.ones(200), ContinuumConfig(order=1))
    assert np.all(ivar_n[:99] == 0) and np.all(np.isnan(flux_n[:99]))
    assert np.all(ivar_n[101:] > 0)


def test_auto_mode_reads_the_unit_and_the_upper_envelope():
    rng = np.random.default_rng(4)
    normalised = 1.0 - 0.3 * (rng.random(2000) < 0.2) + rng.normal(0, 0.02, 2000)
    ivar = np.full(2000, 2500.0)
    assert is_normalised("auto", normalised, ivar, "", None)
    assert is_normalised("auto", normalised, ivar, "normalised", None)
    assert is_normalised("auto", normalised, ivar, "Normalized flux", None)
    assert not is_normalised("auto", normalised, ivar, "erg/s/cm2/Angstrom", None)  # physical units
    assert not is_normalised("auto", normalised * 3e4, ivar, "", None)  # counts without a unit
    assert not is_normalised("auto", normalised, ivar, "", False)  # CONTNORM = F
    assert is_normalised("auto", normalised, ivar, "adu", True)  # CONTNORM = T beats the unit
    assert not is_normalised("auto", normalised * 3, ivar, "", True)  # ...but not the envelope
    assert is_normalised("yes", normalised * 3e4, ivar, "adu", False)
    assert not is_normalised("no", normalised, ivar, "", True)
    with pytest.raises(ValueError):
        is_normalised("maybe", normalised, ivar, "", None)
