"""model.refine: the local spectral fit recovers labels from a rough start, and its nuisance terms
absorb what a reduction leaves behind."""

import dataclasses

import numpy as np
import pytest

from speclabel.core.errors import ConfigError
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import Setup
from speclabel.model.ensemble import Prediction
from speclabel.model.refine import ReferenceLibrary, RefineConfig, Refinement, refine_labels
from speclabel.pipeline.simulate.labels import draw_labels
from speclabel.pipeline.simulate.spectra import synthesize

WIDTH = np.array([100.0, 0.2, 0.1, 0.05, 0.1])  # how far the starts are off, and the prior widths


@pytest.fixture(scope="module")
def cut_setup():
    """Two short pieces of HR10 and HR21 at their resolutions: real lines, small enough to be fast."""
    return Setup.from_dict(
        {
            "name": "hr10-hr21-cut",
            "arms": [
                {
                    "name": "blue",
                    "wave_start": 5380.0,
                    "wave_step": 0.05,
                    "n_pixels": 1200,
                    "resolution": 19800.0,
                },
                {
                    "name": "red",
                    "wave_start": 8490.0,
                    "wave_step": 0.1,
                    "n_pixels": 800,
                    "resolution": 16200.0,
                },
            ],
        }
    )


def simulated(setup, n, seed, rv=0.0):
    labels = draw_labels(np.random.default_rng(seed), n)
    labels["rv"] = np.full(n, rv)
    return np.column_stack([labels[name] for name in LABEL_NAMES]), synthesize(setup, labels).astype(
        np.float64
    )


@pytest.fixture(scope="module")
def library(cut_setup):
    labels, flux = simulated(cut_setup, 400, seed=0)
    return ReferenceLibrary(labels, flux, np.ones(flux.shape, bool), cut_setup)


def rms(a, b):
    return np.sqrt(np.mean((a - b) ** 2, axis=0))


def test_exact_on_a_linear_model_with_a_tilt(cut_setup):
    """Flux linear in the labels: the local quadratic is exact, so the fit lands on the true labels
    from a start a prior width off, also through a continuum tilt of 1 % on the blue arm."""
    rng = np.random.default_rng(3)
    labels = rng.normal(0, 1, (200, 5)) * WIDTH * 5 + [5000, 3.0, -0.3, 0.1, 0.1]
    slopes = rng.normal(0, 0.02, (5, cut_setup.n_pixels)) / (WIDTH * 5)[:, None]
    offset = 0.9 - 0.02 * rng.random(cut_setup.n_pixels)
    library = ReferenceLibrary(
        labels, offset + labels @ slopes, np.ones((200, cut_setup.n_pixels), bool), cut_setup
    )
    truth = labels[:6] + rng.normal(0, 0.5, (6, 5)) * WIDTH
    flux = offset + truth @ slopes
    blue = cut_setup.arm_slices["blue"]
    tilted = flux.copy()
    tilted[:, blue] *= 1 + 0.01 * np.linspace(-1, 1, blue.stop - blue.start)
    start = truth + WIDTH * rng.choice([-1.0, 1.0], truth.shape)
    ivar, mask = np.full(flux.shape, 1e8), np.ones(flux.shape, bool)
    config = RefineConfig(prior_width=tuple(WIDTH), iterations=6)
    for spectra in (flux, tilted):
        refined, std = refine_labels(library, config, spectra, ivar, mask, start)
        assert np.all(np.abs(refined - truth) < 1e-3 * WIDTH)
        assert np.all(std < 1e-2 * WIDTH)


def test_recovers_simulated_labels_from_a_rough_start(library, cut_setup):
    truth, clean = simulated(cut_setup, 20, seed=5)
    rng = np.random.default_rng(1)
    flux = clean + rng.normal(0, 0.01, clean.shape)  # S/N 100
    ivar, mask = np.full(clean.shape, 1e4), np.ones(clean.shape, bool)
    start = truth + rng.normal(0, 1, truth.shape) * WIDTH
    refined, std = refine_labels(library, RefineConfig(prior_width=tuple(WIDTH)), flux, ivar, mask, start)
    # Teff, log g, [Fe/H] to well under half the start's error (measured: 0.17-0.23 of it).
    assert np.all(rms(refined, truth)[:3] < 0.4 * rms(start, truth)[:3])
    assert np.isfinite(std).all() and np.all(std < WIDTH)


def test_velocity_term_absorbs_a_radial_velocity_residual(library, cut_setup):
    """A star 2 km/s off its rest frame: with the velocity term the labels come out as for the star at
    rest; without it the shift is read as labels."""
    rng = np.random.default_rng(1)
    truth, at_rest = simulated(cut_setup, 20, seed=5)
    _, shifted = simulated(cut_setup, 20, seed=5, rv=2.0)
    noise = rng.normal(0, 0.01, at_rest.shape)
    start = truth + rng.normal(0, 1, truth.shape) * WIDTH
    ivar, mask = np.full(at_rest.shape, 1e4), np.ones(at_rest.shape, bool)
    with_terms = RefineConfig(prior_width=tuple(WIDTH))
    without = RefineConfig(prior_width=tuple(WIDTH), velocity_width_kms=None, broadening_width_px2=None)

    def error(config, clean):
        return rms(refine_labels(library, config, clean + noise, ivar, mask, start)[0], truth)

    at_rest_error = error(with_terms, at_rest)
    assert np.all(error(with_terms, shifted)[:3] < 1.2 * at_rest_error[:3])
    assert np.all(error(without, shifted)[[0, 2]] > 1.3 * error(with_terms, shifted)[[0, 2]])


def test_only_the_fitted_labels_move_and_rows_without_a_start_are_kept(library, cut_setup):
    truth, clean = simulated(cut_setup, 3, seed=7)
    start = truth + WIDTH
    start[1] = np.nan
    config = RefineConfig(prior_width=tuple(WIDTH), fitted=("teff", "logg"))
    ivar, mask = np.full(clean.shape, 1e4), np.ones(clean.shape, bool)
    refined, std = refine_labels(library, config, clean, ivar, mask, start)
    assert np.array_equal(refined[:, 2:], start[:, 2:], equal_nan=True)
    assert np.all(np.isnan(refined[1])) and np.all(np.isnan(std[1]))
    assert np.all(refined[[0, 2], :2] != start[[0, 2], :2]) and np.isnan(std[:, 2:]).all()


def test_bad_shapes_are_refused(library, cut_setup):
    with pytest.raises(ValueError, match="flux and mask"):
        ReferenceLibrary(np.zeros((3, 5)), np.ones((3, 10)), np.ones((3, 10), bool), cut_setup)
    with pytest.raises(ValueError, match="finite"):
        bad = np.full((3, 5), np.nan)
        ReferenceLibrary(
            bad, np.ones((3, cut_setup.n_pixels)), np.ones((3, cut_setup.n_pixels), bool), cut_setup
        )
    flux = np.ones((2, cut_setup.n_pixels))
    with pytest.raises(ValueError, match="start must be"):
        refine_labels(library, RefineConfig(prior_width=tuple(WIDTH)), flux, flux, flux > 0, np.zeros((2, 4)))


def test_a_refinement_replaces_only_the_kept_labels(library, cut_setup):
    truth, clean = simulated(cut_setup, 4, seed=9)
    start = truth + WIDTH
    network = Prediction(mean=start.copy(), std=np.full(start.shape, 0.1))
    config = RefineConfig(prior_width=tuple(WIDTH))
    refinement = Refinement(library, config)
    ivar, mask = np.full(clean.shape, 1e4), np.ones(clean.shape, bool)
    refined = refinement.apply(network, clean, ivar, mask)
    # The fit is of all five labels; Teff, log g and [Fe/H] are taken, and as cut_setup names no
    # line windows there is no own-lines fit: the abundances stay the network's.
    assert refinement.config.own_lines == () and refinement.config.kept == ("teff", "logg", "feh")
    fitted, posterior = refine_labels(library, config, clean, ivar, mask, start)
    assert np.array_equal(refined.mean[:, :3], fitted[:, :3])
    assert np.array_equal(refined.mean[:, 3:], start[:, 3:]) and np.array_equal(refined.network_mean, start)
    assert (
        np.array_equal(refined.refined_std[:, :3], posterior[:, :3])
        and np.isnan(refined.refined_std[:, 3:]).all()
    )
    assert refined.std is network.std and network.network_mean is None
    with pytest.raises(ConfigError, match="unknown labels"):
        Refinement(library, RefineConfig(prior_width=tuple(WIDTH), kept=("teff", "vmic")))
    with pytest.raises(ConfigError, match="prior widths must be positive"):
        RefineConfig(prior_width=(1.0, 0.0, 1.0, 1.0, 1.0))


def windowed(setup, windows):
    """``setup`` with Al I line windows and [Al/Fe] read from them."""
    return Setup.from_dict(
        {**setup.to_dict(), "line_windows": {"Al I": windows}, "label_lines": {"alfe": ["Al I"]}}
    )


def test_an_own_lines_label_is_read_from_its_windows_alone(cut_setup):
    """Flux linear in the labels, [Al/Fe] changing every pixel; the star's pixels outside the Al
    windows say [Al/Fe] is 0.3 dex lower than its windows do (as a local model's errors can). The
    joint fit, reading every pixel, follows the majority; the own-lines fit the windows, exactly."""
    setup = windowed(cut_setup, [[5400.0, 5402.0], [8520.0, 8524.0]])
    inside = setup.window_masks()["Al I"]
    rng = np.random.default_rng(4)
    labels = rng.normal(0, 1, (300, 5)) * WIDTH * 5 + [5000, 3.0, -0.3, 0.1, 0.1]
    slopes = rng.normal(0, 0.02, (5, setup.n_pixels)) / (WIDTH * 5)[:, None]
    library = ReferenceLibrary(labels, 0.9 + labels @ slopes, np.ones((300, setup.n_pixels), bool), setup)
    truth = labels[:5] + rng.normal(0, 0.5, (5, 5)) * WIDTH
    flux = 0.9 + truth @ slopes - 0.3 * np.where(inside, 0.0, slopes[4])
    start = truth + WIDTH * rng.choice([-1.0, 1.0], truth.shape)
    ivar, mask = np.full(flux.shape, 1e8), np.ones(flux.shape, bool)
    joint = RefineConfig(prior_width=tuple(WIDTH), iterations=4, own_lines=())
    own = dataclasses.replace(joint, own_lines=("alfe",))
    joint_labels, _ = refine_labels(library, joint, flux, ivar, mask, start)
    own_labels, own_std = refine_labels(library, own, flux, ivar, mask, start)
    assert np.all(np.abs(joint_labels[:, 4] - (truth[:, 4] - 0.3)) < 0.02)
    assert np.all(np.abs(own_labels[:, 4] - truth[:, 4]) < 0.005)  # the joint fit's others, a little off
    # The other labels are the joint fit's, and [Al/Fe]'s posterior std is its windows' alone.
    np.testing.assert_array_equal(own_labels[:, :4], joint_labels[:, :4])
    slope = slopes[4][inside]
    expected_std = 1 / np.sqrt(1e8 * (slope**2).sum() + 1 / WIDTH[4] ** 2)
    np.testing.assert_allclose(own_std[:, 4], expected_std, rtol=1e-3)
    # A network 0.5 dex off (5 prior widths): more than own_lines_clip (3) widths away, the windows'
    # value is not believed and the network's is kept; with a wider clip the windows' is taken.
    far = start.copy()
    far[:, 4] = truth[:, 4] - 0.5
    np.testing.assert_array_equal(refine_labels(library, own, flux, ivar, mask, far)[0][:, 4], far[:, 4])
    unclipped = dataclasses.replace(own, own_lines_clip=10.0)
    assert np.all(
        np.abs(refine_labels(library, unclipped, flux, ivar, mask, far)[0][:, 4] - truth[:, 4]) < 0.01
    )


def test_own_lines_defaults_follow_the_setup_and_an_explicit_label_needs_windows(cut_setup, library):
    with_windows = windowed(cut_setup, [[5400.0, 5402.0]])
    default = RefineConfig(prior_width=tuple(WIDTH))
    assert default.narrowed(LABEL_NAMES, with_windows).own_lines == ("alfe",)
    assert default.narrowed(LABEL_NAMES, with_windows).kept == ("teff", "logg", "feh", "alfe")
    assert default.narrowed(("teff", "logg", "feh"), cut_setup).kept == ("teff", "logg", "feh")
    with pytest.raises(ConfigError, match="names no line windows for 'mgfe'"):
        Refinement(library, RefineConfig(prior_width=tuple(WIDTH), own_lines=("mgfe",)))
