"""The forward model: the fit, chi^2, the Jacobian, the Cramér-Rao bound, storage in the model directory."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from forward_data import ARM_NAMES, ARM_PIXELS, WINDOW_SETUP, survey, window_forward_model
from tiny import TINY_ARCH

from speclabel.core.errors import IntegrityError
from speclabel.core.labels import LABEL_NAMES
from speclabel.model import io
from speclabel.model.arch import build_network
from speclabel.model.ensemble import Ensemble
from speclabel.model.forward import (
    ForwardModel,
    array_batches,
    design_matrix,
    fit_forward_model,
    fit_forward_model_batches,
)
from speclabel.model.scaling import LabelScaler


def quadratic_spectra(rng, n=600, n_pixels=(30, 20), scatter=0.0):
    """Spectra from a known quadratic in 3 labels, Gaussian noise of known ivar, some masked pixels.
    The third label has "lines" only in pixels 0-9: no other pixel depends on it."""
    labels = rng.normal([5000.0, 3.0, -0.5], [500.0, 1.0, 0.4], (n, 3))
    x = (labels - [5000.0, 3.0, -0.5]) / [500.0, 1.0, 0.4]
    truth = np.random.default_rng(0).normal(0.0, 0.05, (10, sum(n_pixels)))
    truth[0] = 0.8
    third = [3, 6, 8, 9]  # c, a*c, b*c, c*c
    truth[np.ix_(third, np.arange(10, sum(n_pixels)))] = 0.0
    ivar = rng.uniform(2e3, 5e4, (n, sum(n_pixels)))
    noise = rng.standard_normal(ivar.shape) * np.sqrt(1.0 / ivar + scatter**2)
    flux = design_matrix(x) @ truth + noise
    good = rng.random(flux.shape) > 0.02
    return labels, x, truth, flux, ivar, good


def test_fit_recovers_a_known_quadratic_and_its_scatter():
    rng = np.random.default_rng(1)
    labels, x, truth, flux, ivar, good = quadratic_spectra(rng, scatter=0.01)
    model = fit_forward_model(flux, ivar, good, labels, ("a", "b", "c"), ("blue", "red"), (30, 20))
    # Independent check: the model spectrum at the labels is the known quadratic.
    assert np.sqrt(np.mean((model.flux(labels) - design_matrix(x) @ truth) ** 2)) < 2e-3
    assert np.allclose(model.scatter, 0.01, rtol=0.15)
    fresh = quadratic_spectra(np.random.default_rng(2), scatter=0.01)
    chi2 = model.chi2(fresh[3], fresh[4], fresh[5], fresh[0])
    assert set(chi2) == {"total", "blue", "red"}
    assert abs(np.mean(chi2["total"]) - 1.0) < 0.03
    # Without the third label's lines its bound grows a hundredfold, the others' little.
    bound = model.label_bound(fresh[0][:20], fresh[4][:20], fresh[5][:20])
    no_lines = fresh[5][:20].copy()
    no_lines[:, :10] = False
    ratio = model.label_bound(fresh[0][:20], fresh[4][:20], no_lines) / bound
    assert np.all(ratio[:, 2] > 50) and np.all(ratio[:, :2] < 2)  # a, b lose 10 of 50 pixels
    # Without the scatter in the weights the same spectra would be several times off.
    assert (
        np.mean(np.sum(fresh[5] * (fresh[3] - model.flux(fresh[0])) ** 2 * fresh[4], 1) / fresh[5].sum(1)) > 3
    )


def test_streamed_fit_is_the_in_memory_fit_whatever_the_batches():
    rng = np.random.default_rng(3)
    labels, _, _, flux, ivar, good = quadratic_spectra(rng, n=300)
    names, arms = ("a", "b", "c"), ("blue", "red")
    whole = fit_forward_model(flux, ivar, good, labels, names, arms, (30, 20))

    def odd_batches():  # 7 uneven batches, as a Ray Data stream would hand them over
        edges = [0, 1, 40, 41, 150, 151, 299, 300]
        for lo, hi in itertools.pairwise(edges):
            yield flux[lo:hi], ivar[lo:hi], good[lo:hi], labels[lo:hi]

    streamed, chi2 = fit_forward_model_batches(odd_batches, names, arms, (30, 20))
    assert np.allclose(streamed.coefficients, whole.coefficients, rtol=1e-9, atol=1e-12)
    assert np.allclose(streamed.scatter, whole.scatter, rtol=1e-9, atol=1e-12)
    assert streamed.chi2_threshold == pytest.approx(whole.chi2_threshold)
    assert chi2.shape == (300,)


def test_chi2_is_one_for_simulated_spectra_at_their_true_labels():
    model = window_forward_model()
    _, fresh = survey(200, 202)
    chi2 = model.chi2(fresh["flux"], fresh["ivar"], fresh["mask"], fresh["labels"])
    for key in ("total", *ARM_NAMES):
        assert 0.95 < np.median(chi2[key]) < 1.1, key
    assert model.anomalous(chi2).mean() <= 0.03
    # The same stars against the model at labels 300 K and 0.3 dex off: clearly worse.
    off = fresh["labels"] + [300.0, 0.0, 0.3, 0.0, 0.0]
    assert np.median(model.chi2(fresh["flux"], fresh["ivar"], fresh["mask"], off)["total"]) > 2
    # The thresholds come from the training rows' leave-one-out chi2, near the fresh stars'.
    assert 0.95 < model.fit["median_chi2"] < 1.1 and model.fit["rows"] == 400


def test_chi2_excludes_masked_pixels_and_is_nan_without_any():
    model = window_forward_model()
    _, fresh = survey(200, 202)
    flux, ivar, good = fresh["flux"][:3].copy(), fresh["ivar"][:3].copy(), fresh["mask"][:3].copy()
    before = model.chi2(flux, ivar, good, fresh["labels"][:3])
    flux[0, 100:140] = 50.0  # garbage on masked pixels must not count
    good[0, 100:140] = False
    good[1, : ARM_PIXELS[0]] = False  # a whole arm masked
    after = model.chi2(flux, ivar, good, fresh["labels"][:3])
    assert after["total"][0] == pytest.approx(before["total"][0], rel=0.05)
    assert np.isnan(after["hr10"][1]) and np.isfinite(after["total"][1])
    assert after["total"][1] == pytest.approx(before["hr21"][1])


def test_jacobian_matches_finite_differences():
    model = window_forward_model()
    labels = survey(200, 202)[1]["labels"][:4]
    jacobian = model.jacobian(labels)
    assert jacobian.shape == (4, sum(ARM_PIXELS), len(LABEL_NAMES))
    steps = np.array([1.0, 1e-3, 1e-3, 1e-3, 1e-3])
    for k, step in enumerate(steps):
        shift = np.zeros(len(LABEL_NAMES))
        shift[k] = step
        numeric = (model.flux(labels + shift) - model.flux(labels - shift)) / (2 * step)
        assert np.allclose(jacobian[:, :, k], numeric, rtol=1e-6, atol=1e-9 / step)


def test_label_bound_is_the_fisher_bound_and_grows_with_the_noise():
    model = window_forward_model()
    _, fresh = survey(200, 202)
    labels, ivar, good = fresh["labels"][:3], fresh["ivar"][:3], fresh["mask"][:3]
    bound = model.label_bound(labels, ivar, good)
    # The bound's Jacobian is that of the denoised coefficients (see bound_coefficients).
    denoised = dataclasses.replace(model, coefficients=model.bound_coefficients, coefficient_error=None)
    assert 0 < np.mean(denoised.coefficients == 0) < 1
    for n in range(3):  # direct: finite-difference Jacobian, explicit weights, a full inverse
        steps = np.array([1.0, 1e-3, 1e-3, 1e-3, 1e-3])
        star = labels[n : n + 1]
        jac = np.stack(
            [
                (denoised.flux(star + e * s) - denoised.flux(star - e * s))[0] / (2 * s)
                for e, s in zip(np.eye(5), steps, strict=True)
            ],
            axis=1,
        )
        variance = 1.0 / np.where(ivar[n] > 0, ivar[n], 1e-30) + model.scatter**2
        weight = np.where(good[n], 1.0 / variance, 0.0)
        direct = np.sqrt(np.diag(np.linalg.inv(jac.T @ (weight[:, None] * jac))))
        assert np.allclose(bound[n], direct, rtol=1e-4)
    # Noise: four times the variance, twice the bound (the intrinsic scatter keeps it a bit below).
    noisier = model.label_bound(labels, ivar / 4, good)
    assert np.all((noisier > 1.3 * bound) & (noisier <= 2.0 * bound * 1.0001))
    assert np.all(np.isinf(model.label_bound(labels, ivar, np.zeros_like(good))))


def test_bytes_round_trip_and_refused_garbage():
    model = window_forward_model()
    again = ForwardModel.from_bytes(model.to_bytes())
    assert again.label_names == model.label_names and again.arm_pixels == ARM_PIXELS
    assert np.array_equal(again.coefficients, model.coefficients)
    assert again.chi2_threshold == model.chi2_threshold and again.fit == model.fit
    with pytest.raises(IntegrityError, match="forward model readable"):
        ForwardModel.from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")


@pytest.fixture
def ensemble_with_forward():
    torch.manual_seed(0)
    labels = survey(400, 101)[1]["labels"]
    return Ensemble(
        WINDOW_SETUP, TINY_ARCH, LabelScaler.fit(labels, "minmax"), [build_network(TINY_ARCH, WINDOW_SETUP)]
    )


def test_model_directory_holds_the_forward_model_checked_by_sha256(ensemble_with_forward, tmp_path):
    ensemble = ensemble_with_forward
    plain_id = io.save_model(ensemble, str(tmp_path / "plain"))
    assert io.load_model(str(tmp_path / "plain")).forward is None  # a model without one loads
    ensemble.forward = window_forward_model()
    model_id = io.save_model(ensemble, str(tmp_path / "model"))
    assert model_id != plain_id  # the id covers the forward model
    document = json.loads((tmp_path / "model" / "model.json").read_text())
    assert document["forward"]["file"] == io.FORWARD_FILE and len(document["forward"]["sha256"]) == 64
    assert document["forward"]["chi2_threshold"] == ensemble.forward.chi2_threshold
    loaded = io.load_model(str(tmp_path / "model"))
    assert np.array_equal(loaded.forward.scatter, ensemble.forward.scatter)
    path = tmp_path / "model" / io.FORWARD_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="forward model sha256"):
        io.load_model(str(tmp_path / "model"))
    path.unlink()
    with pytest.raises(IntegrityError, match="forward model file"):
        io.load_model(str(tmp_path / "model"))


def test_a_forward_model_of_other_labels_is_refused(ensemble_with_forward, tmp_path):
    ensemble = ensemble_with_forward
    _, arrays = survey(400, 101)
    ensemble.forward = fit_forward_model(
        arrays["flux"],
        arrays["ivar"],
        arrays["mask"],
        arrays["labels"][:, :4],
        LABEL_NAMES[:4],
        ARM_NAMES,
        ARM_PIXELS,
    )
    io.save_model(ensemble, str(tmp_path / "model"))
    with pytest.raises(IntegrityError, match="forward model fits"):
        io.load_model(str(tmp_path / "model"))


def test_array_batches_cover_the_rows_once():
    flux = np.arange(600 * 2, dtype=float).reshape(600, 2)
    seen = np.concatenate(
        [b[0][:, 0] for b in array_batches(flux, flux, flux > -1, flux, np.arange(10, 600))()]
    )
    assert np.array_equal(seen, flux[10:, 0])
