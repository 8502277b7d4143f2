"""Post-training fits of speclabel train: the forward model on the training rows, in memory or streamed."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from forward_data import WINDOW_SETUP, survey
from tiny import TINY_ARCH

from speclabel.core.reporting import Reporter
from speclabel.jobs.train.trust import fit_calibration, fit_forward, fit_trust, training_pool_batches
from speclabel.model.arch import build_network
from speclabel.model.calibration import fit_error_calibration, model_calibration
from speclabel.model.ensemble import Ensemble
from speclabel.model.forward import fit_forward_model
from speclabel.model.scaling import LabelScaler
from speclabel.model.splits import SplitRule
from speclabel.pipeline.training_data import InMemoryRows, StreamingRows, resolve_input


def _ensemble(labels):
    torch.manual_seed(0)
    return Ensemble(
        WINDOW_SETUP, TINY_ARCH, LabelScaler.fit(labels, "minmax"), [build_network(TINY_ARCH, WINDOW_SETUP)]
    )


SPLIT = SplitRule(test_fraction=0.2)


def _reference():
    """Independent reference: the fit on exactly the non-test rows, picked here by hand."""
    table, arrays = survey(120, 7)
    pool = ~SPLIT.is_test(arrays["spectrum_id"])
    reference = fit_forward_model(
        arrays["flux"][pool],
        arrays["ivar"][pool],
        arrays["mask"][pool],
        arrays["labels"][pool],
        ("teff", "logg", "feh", "mgfe", "alfe"),
        ("hr10", "hr21"),
        (760, 1100),
    )
    return table, arrays, pool, reference


def test_forward_model_is_fitted_on_the_training_rows_in_memory():
    _, arrays, pool, reference = _reference()
    split = SPLIT
    lines = []
    in_memory = _ensemble(arrays["labels"])
    fit_forward(in_memory, InMemoryRows(arrays), split, Reporter(lines.append))
    assert in_memory.forward.fit["rows"] == pool.sum() < 120
    assert np.allclose(in_memory.forward.coefficients, reference.coefficients)
    assert "forward model on" in lines[-1] and "anomaly thresholds" in lines[-1]


@pytest.mark.ray
def test_forward_model_is_fitted_on_the_same_rows_streamed(ray_session, tmp_path):
    table, arrays, pool, reference = _reference()
    split, lines = SPLIT, []
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=25)
    streamed_input = resolve_input(str(tmp_path / "train.parquet"), WINDOW_SETUP)
    streaming = StreamingRows(streamed_input, WINDOW_SETUP, frozenset())
    first = [len(b[0]) for b in training_pool_batches(streaming, split)()]
    assert sum(first) == pool.sum()
    streamed = _ensemble(arrays["labels"])
    fit_forward(streamed, streaming, split, Reporter(lines.append))
    assert np.allclose(streamed.forward.coefficients, reference.coefficients, rtol=1e-6, atol=1e-9)
    assert streamed.forward.chi2_threshold == pytest.approx(reference.chi2_threshold)


def test_too_few_training_rows_give_no_forward_model():
    _, arrays = survey(120, 7)
    few = {k: (v[:30] if v is not None else None) for k, v in arrays.items()}
    lines = []
    ensemble = _ensemble(arrays["labels"])
    fit_forward(ensemble, InMemoryRows(few), SplitRule(test_fraction=0.1), Reporter(lines.append))
    assert ensemble.forward is None and "no forward model" in lines[-1] and "at least 42" in lines[-1]


def test_error_calibration_is_fitted_on_the_test_rows_with_the_bound():
    _, arrays = survey(120, 7)
    split, lines = SplitRule(test_fraction=0.5), []
    torch.manual_seed(1)
    ensemble = Ensemble(
        WINDOW_SETUP,
        TINY_ARCH,
        LabelScaler.fit(arrays["labels"]),
        [build_network(TINY_ARCH, WINDOW_SETUP) for _ in range(3)],
    )
    fit_trust(ensemble, InMemoryRows(arrays), split, Reporter(lines.append))
    # Independent reference: the test rows picked by hand, predicted and bounded here.
    test = split.is_test(arrays["spectrum_id"])
    prediction = ensemble.predict(arrays["flux"][test], arrays["mask"][test], embedding=True)
    bound = ensemble.forward.label_bound(prediction.mean, arrays["ivar"][test], arrays["mask"][test])
    # The embedding reference is fitted first (on the training rows) and scales the std.
    assert ensemble.ood is not None and ensemble.ood.n_fitted == (~test).sum()
    distance = ensemble.ood.distances(prediction.embedding) / np.median(ensemble.ood.loo)
    reference = fit_error_calibration(
        prediction.mean - arrays["labels"][test],
        prediction.std,
        bound,
        ensemble.label_names,
        ensemble.forward.label_scale,
        distance=distance,
    )
    stored = model_calibration(ensemble.info)
    assert stored.uses_bound and stored.uses_distance and stored.fitted_on["n_rows"] == test.sum()
    assert stored.fitted_on["rows"] == "common test split"
    for name in ensemble.label_names:
        assert stored.labels[name] == reference.labels[name]
    assert (
        "error calibration (std, forward-model bound, std x distance from the training set, floor) on"
        in lines[-1]
    )
    # Too few test rows: no calibration, said so, and a stale one does not survive a refit.
    few = {k: (v[:80] if v is not None else None) for k, v in arrays.items()}
    fit_calibration(ensemble, InMemoryRows(few), SplitRule(test_fraction=0.1), Reporter(lines.append))
    assert model_calibration(ensemble.info) is None and "no error calibration" in lines[-1]
