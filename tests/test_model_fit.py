"""The in-process ensemble fit end to end on simulated spectra, and the metrics."""

import json

import numpy as np
import pytest
from tiny import TINY_ARCH

from speclabel.core.labels import LABEL_NAMES
from speclabel.model import io
from speclabel.model.fit import EnsembleConfig, fit_ensemble, prepare_arrays
from speclabel.model.fit import test_metrics as ensemble_test_metrics
from speclabel.model.metrics import label_metrics, metrics_by_snr
from speclabel.model.splits import SplitRule
from speclabel.model.training import TrainConfig

ARCH = TINY_ARCH.replace(conv_channels=(2, 2), pool_size=8, dropout=0.1)


def test_fit_select_save_load(small_survey, setup, tmp_path):
    arrays = prepare_arrays(small_survey, setup)
    config = EnsembleConfig(
        n_members=2, n_candidates=3, split=SplitRule(test_fraction=0.2, val_fraction=0.25)
    )
    epochs = []
    ensemble = fit_ensemble(
        arrays,
        setup,
        ARCH,
        TrainConfig(epochs=2, batch_size=8),
        config,
        data={"location": "small_survey"},
        on_epoch=lambda seed, metrics, state: epochs.append((seed, metrics.epoch)),
    )
    assert epochs == [(s, e) for s in (0, 1, 2) for e in (1, 2)]
    assert ensemble.n_members == 2
    candidates = ensemble.info["training"]["candidates"]
    kept = sorted(c["best_val_loss"] for c in candidates if c["kept"])
    assert kept == sorted(c["best_val_loss"] for c in candidates)[:2]
    path = tmp_path / "model"
    io.save_model(ensemble, str(path))
    document = json.loads((path / "model.json").read_text())
    data = document["training"]["data"]
    assert data["location"] == "small_survey" and data["n_rows"] == 40 and len(data["fingerprint"]) == 32
    assert document["training"]["split"]["test_fraction"] == 0.2
    assert [m["seed"] for m in document["members"]] == [c["seed"] for c in candidates if c["kept"]]
    assert set(document["metrics"]["test"]["all"]) == set(LABEL_NAMES)
    test_rows = SplitRule(test_fraction=0.2).is_test(arrays["spectrum_id"])
    assert document["metrics"]["test"]["all"]["teff"]["n"] == test_rows.sum()
    loaded = io.load_model(str(path), setup=setup)
    pred = loaded.predict(arrays["flux"][test_rows], arrays["mask"][test_rows])
    residual = pred.mean[:, 0] - arrays["labels"][test_rows, 0]
    assert document["metrics"]["test"]["all"]["teff"]["bias"] == pytest.approx(residual.mean(), rel=1e-6)


def test_a_one_member_model_json_has_the_shape_the_job_writes(small_survey, setup, tmp_path):
    """One member has no spread: no calibration keys (not nulls), as model.fit.test_metrics gives the job."""
    arrays = prepare_arrays(small_survey, setup)
    config = EnsembleConfig(n_members=1, split=SplitRule(test_fraction=0.2, val_fraction=0.25))
    ensemble = fit_ensemble(arrays, setup, ARCH, TrainConfig(epochs=1, batch_size=8), config, data={})
    io.save_model(ensemble, str(tmp_path / "model"))
    test = json.loads((tmp_path / "model" / "model.json").read_text())["metrics"]["test"]
    assert set(test["all"]["teff"]) == {"n", "bias", "scatter", "rmse", "robust_scatter"}
    rows = config.split.is_test(arrays["spectrum_id"])
    batches = [
        {k: arrays[k][rows][i : i + 3] for k in ("flux", "mask", "labels", "snr")} for i in range(0, 40, 3)
    ]
    batched = ensemble_test_metrics(ensemble, batches)
    assert batched.keys() == test.keys()
    for cut, per_label in test.items():
        for label, values in per_label.items():
            assert batched[cut][label] == pytest.approx(values, rel=1e-6)


def test_metrics_against_numpy():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(200, 2))
    predicted = true + rng.normal(0.1, 0.5, size=(200, 2))
    std = np.full((200, 2), 0.25)
    snr = rng.uniform(10, 100, 200)
    out = metrics_by_snr(predicted, true, ("a", "b"), snr, std=std)
    r = predicted - true
    assert out["all"]["a"]["bias"] == pytest.approx(r[:, 0].mean())
    assert out["all"]["b"]["scatter"] == pytest.approx(r[:, 1].std(ddof=1))
    assert out["all"]["a"]["std_ratio"] == pytest.approx(0.25 / np.sqrt((r[:, 0] ** 2).mean()))
    high = snr >= 50
    assert out["snr>=50"]["a"]["n"] == high.sum()
    assert out["snr>=50"]["a"]["rmse"] == pytest.approx(np.sqrt((r[high, 0] ** 2).mean()))
    assert label_metrics(predicted[:1], true[:1], ("a", "b"))["a"]["n"] == 1
