"""Resampling against independent numpy computations; units, air/vacuum and rest-frame conversions."""

import numpy as np
import pytest

from speclabel.core.setups import Arm
from speclabel.pipeline.resample import (
    WavelengthUnitError,
    air_to_vacuum,
    angstrom_per_unit,
    arm_edges,
    convert_medium,
    pixel_edges,
    resample,
    to_rest_frame,
    vacuum_to_air,
)


def _reference_rebin(lower, upper, flux, out_lower, out_upper):
    """Mean of a piecewise-constant flux over each output pixel, from its running integral (np.interp)."""
    edges = np.append(lower, upper[-1])  # contiguous input pixels only
    integral = np.concatenate([[0.0], np.cumsum(flux * (upper - lower))])
    at = lambda x: np.interp(x, edges, integral)  # noqa: E731
    return (at(out_upper) - at(out_lower)) / (out_upper - out_lower)


def test_identical_grids_give_back_the_input():
    centres = 5339.0 + 0.05 * np.arange(200)
    lower, upper = pixel_edges(centres)
    rng = np.random.default_rng(1)
    flux, ivar = rng.uniform(0.3, 1.1, 200), rng.uniform(100, 1e4, 200)
    out_flux, out_ivar = resample(lower, upper, flux, ivar, lower, upper)
    np.testing.assert_allclose(out_flux, flux, rtol=1e-12)
    np.testing.assert_allclose(out_ivar, ivar, rtol=1e-12)


def test_rebinning_matches_the_running_integral_and_conserves_flux():
    rng = np.random.default_rng(2)
    centres = np.cumsum(rng.uniform(0.03, 0.09, 600)) + 5330.0  # irregular input pixels
    lower, upper = pixel_edges(centres)
    flux = rng.uniform(0.2, 1.2, centres.size)
    arm = Arm("test", 5340.0, 0.05, 500, 20000.0)
    out_lower, out_upper = arm_edges(arm)
    out_flux, _ = resample(lower, upper, flux, np.ones_like(flux), out_lower, out_upper)
    inside = (out_lower >= lower[0]) & (out_upper <= upper[-1])
    np.testing.assert_allclose(
        out_flux[inside], _reference_rebin(lower, upper, flux, out_lower, out_upper)[inside], rtol=1e-10
    )
    # The integral of the flux over the output pixels is the integral over the same range of the input.
    lo, hi = out_lower[inside][0], out_upper[inside][-1]
    edges = np.append(lower, upper[-1])
    integral = np.concatenate([[0.0], np.cumsum(flux * (upper - lower))])
    expected = np.interp(hi, edges, integral) - np.interp(lo, edges, integral)
    assert np.sum(out_flux[inside] * arm.wave_step) == pytest.approx(expected, rel=1e-12)


def test_propagated_ivar_matches_monte_carlo_scatter():
    rng = np.random.default_rng(3)
    centres = 5339.0 + 0.037 * np.arange(300)
    lower, upper = pixel_edges(centres)
    sigma = rng.uniform(0.01, 0.05, centres.size)
    truth = np.ones(centres.size)
    arm = Arm("test", 5340.0, 0.05, 200, 20000.0)
    out_lower, out_upper = arm_edges(arm)
    _, predicted_ivar = resample(lower, upper, truth, 1 / sigma**2, out_lower, out_upper)
    draws = np.array(
        [
            resample(
                lower,
                upper,
                truth + sigma * rng.standard_normal(sigma.size),
                1 / sigma**2,
                out_lower,
                out_upper,
            )[0]
            for _ in range(3000)
        ]
    )
    empirical_variance = draws.var(axis=0)
    ratio = empirical_variance * predicted_ivar
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)
    assert np.all(np.abs(ratio - 1) < 0.15)  # 3000 draws: a 1-sigma scatter of 2.6 % per pixel


def test_masked_input_pixels_carry_no_weight_and_mask_mostly_uncovered_output():
    centres = 5339.0 + 0.05 * np.arange(100)
    lower, upper = pixel_edges(centres)
    flux = np.ones(100)
    flux[40] = 50.0  # a cosmic ray, masked
    ivar = np.full(100, 400.0)
    ivar[40] = 0.0
    # Output pixels shifted by 0.3 pixel: masked input 40 covers 70 % of output 40 and 30 % of output 39.
    out_lower, out_upper = lower + 0.015, upper + 0.015
    out_flux, out_ivar = resample(lower, upper, flux, ivar, out_lower, out_upper)
    assert out_ivar[40] == 0 and np.isnan(out_flux[40])
    assert out_flux[39] == pytest.approx(1.0) and out_ivar[39] == pytest.approx(
        400.0
    )  # 70 % of its width from pixel 39
    assert out_flux[38] == pytest.approx(1.0)
    # Outside the input's range nothing is invented.
    far = resample(lower, upper, flux, ivar, lower + 100.0, upper + 100.0)
    assert np.all(far[1] == 0) and np.all(np.isnan(far[0]))


def test_wavelength_gaps_are_not_bridged():
    centres = np.concatenate([5339.0 + 0.05 * np.arange(100), 5349.0 + 0.05 * np.arange(100)])  # 5 Å gap
    lower, upper = pixel_edges(centres)
    assert upper[99] == pytest.approx(centres[99] + 0.025) and lower[100] == pytest.approx(
        centres[100] - 0.025
    )
    arm = Arm("test", 5339.0, 0.05, 300, 20000.0)
    _, out_ivar = resample(lower, upper, np.ones(200), np.ones(200), *arm_edges(arm))
    in_gap = (arm.wave > centres[99] + 0.03) & (arm.wave < centres[100] - 0.03)
    assert in_gap.sum() > 90 and np.all(out_ivar[in_gap] == 0)
    assert np.all(out_ivar[arm.wave < centres[99] - 0.01] > 0)


def test_log_grid_steps_are_not_mistaken_for_gaps():
    centres = 3000.0 * np.exp(np.arange(20000) * 6e-5)  # 3000-9960 Å, step grows 3.3x
    lower, upper = pixel_edges(centres)
    np.testing.assert_allclose(upper[:-1], lower[1:])


def test_angstrom_per_unit():
    assert angstrom_per_unit("nm") == pytest.approx(10.0)
    assert angstrom_per_unit("um") == pytest.approx(1e4)
    assert angstrom_per_unit("m") == pytest.approx(1e10)
    for angstrom in ("Angstrom", "angstrom", "ANGSTROM", "Angstroms", "AA", "A", "", None):
        assert angstrom_per_unit(angstrom) == 1.0
    for bad in ("Hz", "km/s", "pixel", "furlongs per fortnight"):
        with pytest.raises(WavelengthUnitError):
            angstrom_per_unit(bad)


def test_air_vacuum_conversion_against_laboratory_wavelengths():
    # NIST: H-alpha 6564.614 Å in vacuum is 6562.801 Å in air; Ca II 8542.09 Å (air) is 8544.44 Å (vacuum).
    assert vacuum_to_air(np.array([6564.614]))[0] == pytest.approx(6562.801, abs=0.002)
    assert air_to_vacuum(np.array([8542.09]))[0] == pytest.approx(8544.44, abs=0.01)
    wave = np.linspace(3500.0, 10000.0, 50)
    np.testing.assert_allclose(vacuum_to_air(air_to_vacuum(wave)), wave, atol=1e-6)
    assert convert_medium(wave, "air", "air") is wave
    with pytest.raises(ValueError):
        convert_medium(wave, "air", "water")


def test_rest_frame_uses_the_optical_velocity_convention():
    observed = 8542.09 * (1 + 100.0 / 299_792.458)
    assert to_rest_frame(np.array([observed]), 100.0)[0] == pytest.approx(8542.09, abs=1e-9)
