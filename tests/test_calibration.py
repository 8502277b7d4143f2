"""model/calibration.py: the error model's fit recovers known errors; closed forms; model.json round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speclabel.core.errors import InputError, IntegrityError
from speclabel.model.calibration import (
    ErrorCalibration,
    capped_bound,
    fit_error_calibration,
    model_calibration,
)
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
