"""Label scaling: round trips in numpy and torch, training ranges, serialisation."""

import json

import numpy as np
import pytest
import torch
from tiny import LABELS

from speclabel.core.errors import ConfigError
from speclabel.model.scaling import LabelScaler


@pytest.mark.parametrize("method", ["standard", "minmax"])
def test_round_trip_and_statistics(method):
    scaler = LabelScaler.fit(LABELS, method)
    scaled = scaler.transform(LABELS)
    if method == "standard":
        assert np.allclose(scaled.mean(axis=0), 0.0) and np.allclose(scaled.std(axis=0), 1.0)
    else:
        assert np.allclose(scaled.min(axis=0), 0.0) and np.allclose(scaled.max(axis=0), 1.0)
    assert np.allclose(scaler.inverse(scaled), LABELS, rtol=0, atol=1e-9)
    back = scaler.inverse(torch.as_tensor(scaled, dtype=torch.float64)).numpy()
    assert np.allclose(back, LABELS, rtol=0, atol=1e-9)
    # model.json is written with sorted keys: the label order must survive that.
    again = LabelScaler.from_dict(json.loads(json.dumps(scaler.to_dict(), sort_keys=True)))
    assert again.names == ("teff", "logg", "feh", "mgfe", "alfe")
    assert again.to_dict() == scaler.to_dict()
    assert np.array_equal(again.transform(LABELS), scaled)


def test_training_range_flags_extrapolation():
    scaler = LabelScaler.fit(LABELS)
    assert np.array_equal(scaler.train_min, LABELS.min(axis=0))
    flags = scaler.outside_training_range(np.array([[4400.0, 3.0, -0.3, 0.5, 0.0]]))
    assert flags.tolist() == [[True, False, False, True, False]]


def test_constant_label_does_not_divide_by_zero_and_bad_input_is_refused():
    labels = LABELS.copy()
    labels[:, 3] = 0.1
    scaler = LabelScaler.fit(labels)
    assert scaler.scale[3] == 1.0 and np.isfinite(scaler.transform(labels)).all()
    with pytest.raises(ConfigError, match="shape"):
        LabelScaler.fit(LABELS[:, :3])
    with pytest.raises(ConfigError, match="must be one of"):
        LabelScaler.fit(LABELS, "log")
