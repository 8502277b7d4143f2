"""model/calibration.py: the error model's fit recovers known errors; closed forms; model.json round trip."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from speclabel.core.errors import InputError, IntegrityError
from speclabel.model.calibration import (
    ErrorCalibration,
    calibrate_ensemble,
    capped_bound,
    fit_error_calibration,
    model_calibration,
    row_errors,
)
from speclabel.model.forward import ForwardModel
from speclabel.model.metrics import GAUSSIAN_WITHIN_1_SIGMA

NAMES = ("feh", "alfe")
PRIOR = np.array([0.5, 0.15])


def synthetic_rows(seed: int, n: int = 800):
    """Residuals drawn from a known error model: ensemble std and bound spread over a decade or more,
    the floor about a third of the typical error, so that every term matters somewhere."""
    rng = np.random.default_rng(seed)
    std = np.exp(rng.normal(np.log(0.02), 0.6, (n, 2)))
    bound = np.exp(rng.normal(np.log(0.05), 1.0, (n, 2)))
    a, b, c = np.array([3.0, 1.0]), np.array([1.5, 0.5]), np.array([0.03, 0.05])
    true_err = np.sqrt((a * std) ** 2 + (b * capped_bound(bound, PRIOR)) ** 2 + c**2)
    return rng.normal(0.0, true_err), std, bound, true_err, (a, b, c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_a_known_error_model(seed):
    residual, std, bound, true_err, (a, b, _) = synthetic_rows(seed)
    calibration = fit_error_calibration(residual, std, bound, NAMES, PRIOR, fitted_on={"rows": "synthetic"})
    err = calibration.total_error(std, bound)
    for k, name in enumerate(NAMES):
        model = calibration.labels[name]
        # a and b trade off against each other where std and bound are both large; the err they give
        # is what must be right. Tolerances: the worst of 80 such fits was 0.33 (a, b) and 0.09 (err).
        assert model.a == pytest.approx(a[k], rel=0.4)
        assert model.b == pytest.approx(b[k], rel=0.4)
        assert np.sqrt(np.mean((err[:, k] / true_err[:, k] - 1) ** 2)) < 0.12
        coverage = np.mean(np.abs(residual[:, k]) < err[:, k])
        assert coverage == pytest.approx(GAUSSIAN_WITHIN_1_SIGMA, abs=0.05)
        assert calibration.fitted_on["labels"][name]["n"] == len(residual)
    assert calibration.fitted_on["rows"] == "synthetic" and calibration.uses_bound


def test_the_fit_is_the_likelihood_maximum():
    """Floor only: the maximum-likelihood variance is mean(r^2), c = rms(r). Std and floor: at the
    maximum d(log L)/d(a^2) and d(log L)/d(c^2) vanish, sum((r^2 - v) / v^2 * x) = 0 for x = std^2, 1."""
    rng = np.random.default_rng(5)
    std = rng.uniform(0.01, 0.1, (300, 2))
    residual = rng.normal(0.0, np.sqrt((2.0 * std) ** 2 + 0.05**2))
    floor_only = fit_error_calibration(residual, None, None, NAMES, PRIOR)
    std_and_floor = fit_error_calibration(residual, std, None, NAMES, PRIOR)
    for k, name in enumerate(NAMES):
        assert floor_only.labels[name].a == 0.0 and floor_only.labels[name].b == 0.0
        assert floor_only.labels[name].c == pytest.approx(np.sqrt(np.mean(residual[:, k] ** 2)), rel=1e-4)
        model = std_and_floor.labels[name]
        assert model.b == 0.0 and model.a > 0 and model.c > 0
        v = (model.a * std[:, k]) ** 2 + model.c**2
        weight = (residual[:, k] ** 2 - v) / v**2
        assert abs(np.mean(weight * std[:, k] ** 2)) < 1e-4 * np.mean(std[:, k] ** 2 / v)
        assert abs(np.mean(weight)) < 1e-4 * np.mean(1 / v)
    assert not std_and_floor.uses_bound
    a = np.array([std_and_floor.labels[n].a for n in NAMES])
    c = np.array([std_and_floor.labels[n].c for n in NAMES])
    np.testing.assert_allclose(std_and_floor.total_error(std), np.sqrt((a * std) ** 2 + c**2))


def test_capped_bound_is_the_posterior_width():
    # 1 / p^2 = 1 / bound^2 + 1 / w^2; an unconstrained label (bound inf) is as uncertain as the prior.
    bound = np.array([0.01, 0.15, 3.0, np.inf])
    expected = 1.0 / np.sqrt(1.0 / bound**2 + 1.0 / 0.15**2)
    np.testing.assert_allclose(capped_bound(bound, 0.15), expected)
    assert capped_bound(np.array([np.inf]), 0.15)[0] == pytest.approx(0.15)


def test_round_trip_through_model_json_and_refusals():
    residual, std, bound, _, _ = synthetic_rows(3, n=200)
    calibration = fit_error_calibration(residual, std, bound, NAMES, PRIOR, fitted_on={"n_rows": 200})
    document = json.loads(json.dumps(calibration.to_dict(), allow_nan=False))
    again = model_calibration({"calibration": document})
    np.testing.assert_array_equal(again.total_error(std, bound), calibration.total_error(std, bound))
    assert again.label_names == NAMES and again.fitted_on == calibration.fitted_on
    assert model_calibration({}) is None
    with pytest.raises(IntegrityError, match="calibration version"):
        ErrorCalibration.from_dict({**document, "version": 99})
    with pytest.raises(IntegrityError, match="invalid calibration"):
        ErrorCalibration.from_dict({**document, "labels": {"feh": {}}})
    with pytest.raises(InputError, match="pass bound"):
        calibration.total_error(std)
    nan_std = std.copy()
    nan_std[0, 1] = np.nan
    err = calibration.total_error(nan_std, bound)
    assert np.isnan(err[0, 1]) and np.isfinite(err[0, 0]) and np.isfinite(err[1:]).all()


def test_too_few_rows_are_refused():
    residual, std, bound, _, _ = synthetic_rows(4, n=40)
    residual[:25, 1] = np.nan
    with pytest.raises(InputError, match=r"only 15 rows .* alfe"):
        fit_error_calibration(residual, std, bound, NAMES, PRIOR)


class StubEnsemble:
    """Stands in for an Ensemble: its predictions for the batches in order, a forward model."""

    label_names = NAMES
    n_members = 8
    scaler = SimpleNamespace(scale=PRIOR)  # the label scaling's scale

    def __init__(self, predictions, forward):
        self.predictions = iter(predictions)
        self.forward = forward

    def predict(self, flux, mask, ood=False):
        assert ood  # the distance from the training set is asked for
        return next(self.predictions)


def test_calibrate_ensemble_feeds_the_bound_at_the_predicted_labels():
    """Rows whose error follows err^2 = (2 std)^2 + p^2, p from a linear forward model (its bound does
    not depend on the labels, only on each row's S/N): the fit finds the bound term."""
    rng = np.random.default_rng(7)
    n, pixels = 400, 40
    coefficients = np.zeros((6, pixels))  # terms 1, x_a, x_b, x_a^2, x_a x_b, x_b^2
    coefficients[0] = 1.0
    coefficients[1:3] = rng.normal(0.0, 0.02, (2, pixels))
    forward = ForwardModel(
        NAMES, ("arm",), (pixels,), np.zeros(2), np.ones(2), coefficients, np.zeros(pixels)
    )
    snr = np.exp(rng.uniform(np.log(5), np.log(200), n))
    ivar = np.repeat(snr[:, None] ** 2, pixels, axis=1)
    good = np.ones((n, pixels), bool)
    labels = rng.normal(0.0, 1.0, (n, 2))
    bound = forward.label_bound(labels, ivar, good)
    assert bound.max() / bound.min() > 20  # the S/N spread makes the bound matter
    std = np.exp(rng.normal(np.log(0.05), 0.5, (n, 2)))
    predicted = labels + rng.normal(0.0, np.sqrt((2 * std) ** 2 + capped_bound(bound, 1.0) ** 2))
    batches, predictions = [], []
    for rows in np.array_split(np.arange(n), 3):
        batches.append({"flux": None, "mask": good[rows], "labels": labels[rows], "ivar": ivar[rows]})
        predictions.append(
            SimpleNamespace(mean=predicted[rows], std=std[rows], aleatoric=None, ood_distance=None)
        )
    calibration = calibrate_ensemble(StubEnsemble(predictions, forward), batches, fitted_on={"rows": "t"})
    assert calibration.uses_bound and calibration.fitted_on["n_rows"] == n
    assert not calibration.uses_distance  # a model without an embedding reference
    for name in NAMES:
        model = calibration.labels[name]
        assert model.a == pytest.approx(2.0, rel=0.3) and model.b == pytest.approx(1.0, rel=0.3)
        assert model.prior_width == 1.0  # the forward model's label scale: the training spread
    without = calibrate_ensemble(StubEnsemble(predictions, None), batches)
    assert not without.uses_bound and all(m.b == 0.0 for m in without.labels.values())
    assert [without.labels[n].prior_width for n in NAMES] == list(PRIOR)  # unused without the bound


def test_the_members_predicted_error_is_a_fourth_term_recovered_by_the_fit():
    """Residuals whose error follows a per-row term that neither the std nor the bound carries (a hot
    metal-poor dwarf's [Al/Fe]): the fit finds its scale d, and err tracks the true error."""
    residual, std, bound, _, (a, b, c) = synthetic_rows(6)
    rng = np.random.default_rng(7)
    aleatoric = np.exp(rng.normal(np.log(0.04), 0.8, std.shape))
    d = np.array([2.0, 1.0])
    true_err = np.sqrt((a * std) ** 2 + (b * capped_bound(bound, PRIOR)) ** 2 + (d * aleatoric) ** 2 + c**2)
    residual = rng.normal(0.0, true_err)
    calibration = fit_error_calibration(residual, std, bound, NAMES, PRIOR, aleatoric=aleatoric)
    without = fit_error_calibration(residual, std, bound, NAMES, PRIOR)
    err = calibration.total_error(std, bound, aleatoric)
    for k, name in enumerate(NAMES):
        assert calibration.labels[name].d == pytest.approx(d[k], rel=0.3)
        assert np.sqrt(np.mean((err[:, k] / true_err[:, k] - 1) ** 2)) < 0.15
        # Without the term the best fit cannot follow the rows' errors nearly as well.
        miss = without.total_error(std, bound)[:, k] / true_err[:, k] - 1
        assert np.sqrt(np.mean(miss**2)) > 2 * np.sqrt(np.mean((err[:, k] / true_err[:, k] - 1) ** 2))
        assert without.labels[name].d == 0.0
    assert calibration.uses_aleatoric and not without.uses_aleatoric
    # model.json: version 2 with d where the term is used; version 1, as before it existed, where not.
    document = json.loads(json.dumps(calibration.to_dict(), allow_nan=False))
    assert document["version"] == 2 and document["uses_aleatoric"] is True
    again = ErrorCalibration.from_dict(document)
    np.testing.assert_array_equal(again.total_error(std, bound, aleatoric), err)
    old = without.to_dict()
    assert old["version"] == 1 and "uses_aleatoric" not in old and "d" not in old["labels"]["feh"]
    with pytest.raises(InputError, match="pass aleatoric"):
        calibration.total_error(std, bound)


def test_the_distance_from_the_training_set_scales_the_std_and_is_recovered_by_the_fit():
    """Residuals whose error grows with the std times the row's distance from the training set (the
    members agree on a star unlike any they learnt from): the fit finds e, err tracks the truth,
    and without the term it cannot."""
    residual, std, bound, _, (a, b, c) = synthetic_rows(8)
    rng = np.random.default_rng(9)
    distance = np.exp(rng.normal(0.0, 0.4, len(std)))  # ~1 like the training set, a tail beyond
    e = np.array([4.0, 2.0])
    true_err = np.sqrt(
        (a * std) ** 2 + (e * distance[:, None] * std) ** 2 + (b * capped_bound(bound, PRIOR)) ** 2 + c**2
    )
    residual = rng.normal(0.0, true_err)
    calibration = fit_error_calibration(residual, std, bound, NAMES, PRIOR, distance=distance)
    without = fit_error_calibration(residual, std, bound, NAMES, PRIOR)
    err = calibration.total_error(std, bound, distance=distance)
    for k, name in enumerate(NAMES):
        # a and e share the std: the total std weight at the typical distance is what must be right.
        model = calibration.labels[name]
        assert np.hypot(model.a, model.e) == pytest.approx(np.hypot(a[k], e[k]), rel=0.2)
        assert model.e == pytest.approx(e[k], rel=0.4)
        assert np.sqrt(np.mean((err[:, k] / true_err[:, k] - 1) ** 2)) < 0.15
        miss = without.total_error(std, bound)[:, k] / true_err[:, k] - 1
        assert np.sqrt(np.mean(miss**2)) > 1.5 * np.sqrt(np.mean((err[:, k] / true_err[:, k] - 1) ** 2))
    assert calibration.uses_distance and not without.uses_distance and not calibration.uses_aleatoric
    # model.json: version 3 holds e (and d, 0 here); versions 1 and 2 are written where it is unused.
    document = json.loads(json.dumps(calibration.to_dict(), allow_nan=False))
    assert document["version"] == 3 and document["uses_distance"] is True
    assert document["uses_aleatoric"] is False and document["labels"]["feh"]["d"] == 0.0
    again = ErrorCalibration.from_dict(document)
    np.testing.assert_array_equal(again.total_error(std, bound, distance=distance), err)
    assert without.to_dict()["version"] == 1
    with pytest.raises(InputError, match="pass distance"):
        calibration.total_error(std, bound)
    with pytest.raises(InputError, match="does not match"):
        fit_error_calibration(residual, std, bound, NAMES, PRIOR, distance=distance[:-1])
    # A one-member ensemble has no std, so nothing for the distance to scale: the term is dropped.
    no_std = fit_error_calibration(residual, None, bound, NAMES, PRIOR, distance=distance)
    assert not no_std.uses_distance and no_std.version == 1


def test_the_anomaly_check_gets_the_errors_at_a_typical_distance():
    """RowErrors.screening: the distance term at most a typical training spectrum's (1), so a
    spectrum far from the training set (what the anomaly check looks for) does not widen its own
    tolerance; rows at most that far get the catalogue's err itself."""
    residual, std, _, _, _ = synthetic_rows(10, n=300)
    distance = np.random.default_rng(11).uniform(0.5, 4.0, len(std))
    residual = residual * np.sqrt(1 + distance[:, None] ** 2)  # error growing with the distance
    calibration = fit_error_calibration(residual, std, None, NAMES, PRIOR, distance=distance)
    assert all(m.e > 0 for m in calibration.labels.values())
    mean = np.zeros_like(std)
    errors = row_errors(calibration, None, mean, std, None, None, distance=distance)
    np.testing.assert_array_equal(errors.err, calibration.total_error(std, distance=distance))
    near, far = distance <= 1, distance > 1
    np.testing.assert_array_equal(errors.screening[near], errors.err[near])
    at_one = calibration.total_error(std, distance=np.ones(len(std)))
    np.testing.assert_array_equal(errors.screening[far], at_one[far])
    assert (errors.screening[far] < errors.err[far]).all()
    # Without the distance term both are the same array.
    plain = fit_error_calibration(residual, std, None, NAMES, PRIOR)
    same = row_errors(plain, None, mean, std, None, None)
    assert same.screening is same.err
