"""model.metrics against values worked out by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from speclabel.model.metrics import label_metrics, metrics_by_snr, snr_bin_name, snr_bins

# One label; residuals predicted - true = [1, -1, 2, 0].
PREDICTED = np.array([[11.0], [9.0], [12.0], [10.0]])
TRUE = np.array([[10.0], [10.0], [10.0], [10.0]])
STD = np.array([[1.0], [2.0], [1.0], [1.0]])


def test_bias_scatter_and_robust_scatter_by_hand():
    m = label_metrics(PREDICTED, TRUE, ["x"])["x"]
    assert m["n"] == 4
    assert m["bias"] == 0.5  # (1 - 1 + 2 + 0) / 4
    # deviations from the mean 0.5, -1.5, 1.5, -0.5: squares sum to 5, over n - 1 = 3
    assert m["scatter"] == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    assert m["rmse"] == pytest.approx(math.sqrt(6 / 4), rel=1e-15)
    # median 0.5; absolute deviations 0.5, 1.5, 1.5, 0.5 have median 1
    assert m["robust_scatter"] == pytest.approx(1.4826, rel=1e-15)
    assert "std_ratio" not in m


def test_calibration_by_hand():
    m = label_metrics(PREDICTED, TRUE, ["x"], std=STD)["x"]
    assert m["rms_std"] == pytest.approx(math.sqrt(7 / 4), rel=1e-15)  # (1 + 4 + 1 + 1) / 4
    assert m["std_ratio"] == pytest.approx(math.sqrt(7 / 6), rel=1e-15)  # rms std / rms error
    # |error| < std: 1 < 1 no, 1 < 2 yes, 2 < 1 no, 0 < 1 yes
    assert m["frac_within_std"] == 0.5
    # |error| < 2 std: 1 < 2, 1 < 4, 2 < 2 no, 0 < 2
    assert m["frac_within_2std"] == 0.75


def test_calibrated_error_numbers_by_hand():
    # err 2, 1, 0.5, nan (the last row has no err): errors 1, 1, 2 on the other three
    err = np.array([[2.0], [1.0], [0.5], [np.nan]])
    m = label_metrics(PREDICTED, TRUE, ["x"], std=STD, err=err)["x"]
    assert m["rms_err"] == pytest.approx(math.sqrt((4 + 1 + 0.25) / 3), rel=1e-15)
    assert m["err_ratio"] == pytest.approx(math.sqrt(5.25 / 6), rel=1e-15)  # rms(err) / rms(1, 1, 2)
    assert m["frac_within_err"] == pytest.approx(1 / 3)  # 1 < 2 yes, 1 < 1 no, 2 < 0.5 no
    assert m["frac_within_2err"] == pytest.approx(2 / 3)  # 1 < 4, 1 < 2 yes, 2 < 1 no
    assert m["frac_within_std"] == 0.5  # the std numbers still use all four rows


def test_nonfinite_rows_are_left_out_per_label():
    predicted = np.array([[1.0, np.nan], [2.0, 5.0], [4.0, 7.0]])
    true = np.zeros((3, 2))
    std = np.array([[np.nan, 1.0], [1.0, 1.0], [1.0, 1.0]])
    m = label_metrics(predicted, true, ["a", "b"], std=std)
    assert m["a"]["n"] == 3 and m["b"]["n"] == 2
    assert m["b"]["bias"] == 6.0 and m["b"]["scatter"] == pytest.approx(math.sqrt(2.0))
    # calibration of "a" uses the two rows with a finite std: errors 2 and 4, std 1 and 1
    assert m["a"]["rms_std"] == 1.0
    assert m["a"]["std_ratio"] == pytest.approx(1 / math.sqrt(10.0))
    assert m["a"]["frac_within_std"] == 0.0


def test_single_row_has_no_scatter_and_empty_has_nan_everywhere():
    one = label_metrics(PREDICTED[:1], TRUE[:1], ["x"])["x"]
    assert one["n"] == 1 and one["bias"] == 1.0 and math.isnan(one["scatter"])
    empty = label_metrics(PREDICTED[:0], TRUE[:0], ["x"], std=STD[:0])["x"]
    assert empty["n"] == 0
    assert all(math.isnan(v) for k, v in empty.items() if k != "n")


def test_snr_bins_and_cuts_select_the_right_rows():
    # S/N 10, 30, 40, 60, 120, NaN; errors 1, 2, 4, 8, 16, 32
    snr = np.array([10.0, 30.0, 40.0, 60.0, 120.0, np.nan])
    true = np.zeros((6, 1))
    predicted = np.array([[1.0], [2.0], [4.0], [8.0], [16.0], [32.0]])
    out = metrics_by_snr(predicted, true, ["x"], snr, snr_cuts=(50.0,), snr_edges=(20.0, 50.0, 100.0))
    assert list(out) == ["all", "snr>=50", "snr<20", "20<=snr<50", "50<=snr<100", "snr>=100"]
    assert out["all"]["x"]["n"] == 6  # the row without an S/N counts in "all" only
    assert out["snr>=50"]["x"]["bias"] == 12.0  # (8 + 16) / 2
    assert out["snr<20"]["x"]["bias"] == 1.0
    assert out["20<=snr<50"]["x"]["bias"] == 3.0
    assert out["20<=snr<50"]["x"]["scatter"] == pytest.approx(math.sqrt(2.0))  # 2, 4 about 3
    assert out["50<=snr<100"]["x"]["n"] == 1
    assert out["snr>=100"]["x"]["bias"] == 16.0
    assert sum(out[k]["x"]["n"] for k in ("snr<20", "20<=snr<50", "50<=snr<100", "snr>=100")) == 5


def test_bin_names_and_edges():
    assert snr_bins([20, 50]) == [(-np.inf, 20.0), (20.0, 50.0), (50.0, np.inf)]
    assert [snr_bin_name(lo, hi) for lo, hi in snr_bins([20, 50])] == ["snr<20", "20<=snr<50", "snr>=50"]
    with pytest.raises(ValueError, match="increase"):
        snr_bins([50, 20])
