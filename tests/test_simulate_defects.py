"""Defective spectra (pipeline/simulate/defects.py) against the forward model's anomaly flag: each kind is
flagged, clean spectra at realistic S/N rarely. The chi^2 is taken at the stars' true labels, the labels a
perfect network would give (the label job uses the ensemble's)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from forward_data import WINDOW_SETUP, window_forward_model

from speclabel.core.labels import LABEL_NAMES
from speclabel.model.forward import design_matrix
from speclabel.pipeline.simulate import draw_labels, synthesize
from speclabel.pipeline.simulate.defects import DEFECTS, EMISSION_LINES, inject, shifted
from speclabel.pipeline.simulate.survey import photon_noise

N = 60


@pytest.fixture(scope="module")
def stars():
    rng = np.random.default_rng(5)
    labels, others = draw_labels(rng, N), draw_labels(rng, N)
    labels["rv"], others["rv"] = np.zeros(N), np.zeros(N)
    truth = np.stack([labels[k] for k in LABEL_NAMES], axis=1)
    return synthesize(WINDOW_SETUP, labels), synthesize(WINDOW_SETUP, others), truth


def _flagged(kind, stars, snr, seed=0):
    clean, other, truth = stars
    rng = np.random.default_rng(seed)
    flux = clean if kind == "clean" else inject(kind, clean, other, WINDOW_SETUP, rng)
    observed, ivar = photon_noise(flux, np.full(N, float(snr)), rng)
    model = window_forward_model()
    return model.anomalous(model.chi2(observed, ivar, np.ones_like(observed, dtype=bool), truth)).mean()


@pytest.mark.parametrize("kind", ["binary", "emission", "cosmic_rays"])
def test_binaries_emission_and_cosmic_rays_are_flagged_at_every_snr(stars, kind):
    for snr in (30, 150):
        assert _flagged(kind, stars, snr) >= 0.95, (kind, snr)


def test_continuum_errors_and_foreign_arms_are_flagged_above_low_snr(stars):
    # A continuum 2-5 % off is within the noise of one pixel at S/N 30 but not over an arm at 60.
    assert _flagged("continuum", stars, 60) >= 0.85 and _flagged("continuum", stars, 150) >= 0.95
    # An arm of another star is the hardest: the red window holds only two Ca II lines and Paschen
    # wings, so stars of similar type look alike there (measured: 45 % at S/N 60, 67 % at 150).
    assert _flagged("foreign_arm", stars, 60) >= 0.3 and _flagged("foreign_arm", stars, 150) >= 0.5


def test_clean_spectra_at_realistic_snr_are_rarely_flagged(stars):
    rates = [_flagged("clean", stars, snr, seed) for seed, snr in enumerate((30, 60, 100, 150))]
    assert np.mean(rates) <= 0.03  # measured 0-2 % per S/N (threshold: 99.5th percentile x 1.1)


# Errors like the ensemble's at S/N >= 50 (BENCHMARKS.md): K, dex.
LABEL_ERRORS = np.array([25.0, 0.04, 0.025, 0.025, 0.08])


def test_clean_spectra_labelled_with_errors_are_not_flagged_more_at_high_snr_once_the_errors_count():
    rng = np.random.default_rng(3)
    labels = draw_labels(rng, 400)
    labels["rv"] = np.zeros(400)
    truth = np.stack([labels[k] for k in LABEL_NAMES], axis=1)
    observed, ivar = photon_noise(synthesize(WINDOW_SETUP, labels), np.full(400, 150.0), rng)
    good = np.ones_like(observed, dtype=bool)
    estimated = truth + rng.standard_normal(truth.shape) * LABEL_ERRORS
    model = window_forward_model()
    at_truth = model.chi2(observed, ivar, good, truth)
    plain = model.chi2(observed, ivar, good, estimated)
    with_errors = model.chi2(observed, ivar, good, estimated, np.tile(LABEL_ERRORS, (400, 1)))
    # Labels off by their errors raise a clean spectrum's chi^2 at S/N 150 beyond the noise, and
    # the thresholds (set at true labels) flag it (measured: 7.8 % against 1.8 % at the truth);
    # propagating the errors into the pixel variances brings it back (1.5 %).
    assert np.median(plain["total"]) > 1.05 * np.median(at_truth["total"])
    assert model.anomalous(plain).mean() >= 0.03
    assert model.anomalous(with_errors).mean() <= 0.02
    assert np.median(with_errors["total"]) <= np.median(at_truth["total"])
    # A zero error is the plain chi^2; the extra variance is the Jacobian's, by hand for one row.
    zero = model.chi2(observed[:3], ivar[:3], good[:3], estimated[:3], np.zeros((3, 5)))
    np.testing.assert_allclose(zero["total"], plain["total"][:3])
    x = (estimated[:1] - model.label_offset) / model.label_scale
    step = 1e-4
    jac = np.stack(
        [
            (design_matrix(x + step * np.eye(5)[k]) - design_matrix(x - step * np.eye(5)[k]))[0] / (2 * step)
            for k in range(5)
        ],
        axis=1,
    )  # [T, L] in standardised units
    extra = ((model.coefficients.T @ jac) ** 2 @ (LABEL_ERRORS / model.label_scale) ** 2)[None]
    weight = 1.0 / (1.0 / ivar[:1] + model.scatter**2 + extra)
    by_hand = ((observed[:1] - model.flux(estimated[:1])) ** 2 * weight).sum() / weight.size
    assert with_errors["total"][0] == pytest.approx(by_hand, rel=1e-6)


def test_injectors_do_what_they_say():
    wave = WINDOW_SETUP.wave
    flat = np.ones((2, WINDOW_SETUP.n_pixels), dtype=np.float32)
    line = flat.copy()
    line[:, np.argmin(np.abs(wave - 5528.4))] = 0.5
    moved = shifted(line, WINDOW_SETUP, np.array([0.0, 30.0]))
    assert np.argmin(moved[0]) == np.argmin(line[0])
    expected = 5528.4 * (1 + 30.0 / 299_792.458)
    assert abs(wave[np.argmin(moved[1])] - expected) < 0.05
    rng = np.random.default_rng(0)
    assert np.all(inject("cosmic_rays", flat, flat, WINDOW_SETUP, rng) >= flat)
    emitted = inject("emission", flat, flat, WINDOW_SETUP, rng)
    core = np.argmin(np.abs(wave - EMISSION_LINES["Ca II"][0]))
    assert np.all(emitted[:, core] > 1.25) and np.allclose(emitted[:, :700], 1.0)
    foreign = inject("foreign_arm", flat, 0.5 * flat, WINDOW_SETUP, rng)
    assert sorted(np.unique(foreign).tolist()) == [0.5, 1.0]


def test_a_survey_with_defects_differs_from_the_clean_survey_only_in_the_defective_rows(setup, tmp_path):
    from speclabel.jobs.cli import main
    from speclabel.pipeline.simulate import DEFECT_COLUMN, SurveyConfig, simulate_chunk

    clean = simulate_chunk(setup, SurveyConfig(n=40, seed=2, chunk_size=40), 0)
    with_defects = simulate_chunk(setup, SurveyConfig(n=40, seed=2, chunk_size=40, defect_fraction=0.5), 0)
    assert DEFECT_COLUMN not in clean.column_names
    kinds = with_defects.column(DEFECT_COLUMN).to_pylist()
    hit = np.array([k is not None for k in kinds])
    assert 10 <= hit.sum() <= 30 and set(kinds) - {None} <= set(DEFECTS)
    changed = np.zeros(40, dtype=bool)
    for arm in setup.arms:
        a, b = (
            np.stack(t.column(arm.flux_column).to_numpy(zero_copy_only=False)) for t in (clean, with_defects)
        )
        changed |= np.any(a != b, axis=1)
    # Clean rows are the clean survey's exactly (own random stream); every defect changed its row.
    assert not changed[~hit].any() and changed[hit].all()
    assert clean.select(LABEL_NAMES).equals(with_defects.select(LABEL_NAMES))

    # The FITS truth table carries the kinds, row for row.
    out = tmp_path / "sim"
    argv = ["simulate", "--n", "6", "--seed", "2", "--format", "fits", "--out", str(out), "--defects", "1"]
    assert main([*argv, "--workers", "1"]) == 0
    truth = pq.read_table(out / "labels.parquet")
    assert truth.column(DEFECT_COLUMN).null_count == 0 and set(
        truth.column(DEFECT_COLUMN).to_pylist()
    ) <= set(DEFECTS)
    with pytest.raises(SystemExit) as refused:
        main(["simulate", "--n", "6", "--out", str(tmp_path / "x.parquet"), "--defects", "1.5"])
    assert refused.value.code == 2
