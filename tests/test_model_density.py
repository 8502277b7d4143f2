"""Density weighting (issue 20): rows in sparse regions of label space weigh more in the loss."""

import itertools

import numpy as np
import pytest
import torch
from test_model_training import ARCH, _data, _weights
from tiny import TINY_ARCH

from speclabel.core.errors import ConfigError, InputError
from speclabel.core.labels import LABEL_NAMES
from speclabel.model import io
from speclabel.model.fit import EnsembleConfig, fit_ensemble, member_data, prepare_arrays, sample_weights
from speclabel.model.scaling import LabelScaler
from speclabel.model.splits import SplitRule
from speclabel.model.training import (
    ArrayData,
    AugmentConfig,
    TrainConfig,
    density_weights,
    loss_targets,
    masked_mean,
    train_member,
)


def _lattice(centre, step):
    """A 4 x 4 x 4 lattice of (Teff, log g, [Fe/H]) around ``centre``, ``step`` apart (x 100 K in
    Teff), with [Mg/Fe] and [Al/Fe] that do not count."""
    grid = np.array(list(itertools.product(range(4), repeat=3)), float) - 1.5
    points = np.asarray(centre) + step * grid * [100.0, 0.1, 0.1]
    return np.column_stack([points, np.zeros(len(points)), np.full(len(points), 0.1)])


def _brute_force(labels, beta, k, cap):
    """The weights, independently: every pairwise distance, the k-th nearest other row, d^(3 beta)
    scaled until the capped weights average 1 (bisection on the scale)."""
    x = labels[:, :3]
    z = (x - x.mean(0)) / x.std(0)
    distance = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    raw = np.sort(distance, axis=1)[:, k] ** (3 * beta)
    lo, hi = 0.0, 1e6 / raw.min()
    for _ in range(200):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(c * raw, cap).mean() < 1 else (lo, c)
    return np.minimum(lo * raw, cap)


def test_rows_of_a_sparse_region_weigh_more_by_the_density_ratio():
    """Two copies of one lattice, one twice as coarse (8x less dense in 3-D) and far away: every row
    of the coarse copy weighs (2^3)^beta times its twin in the dense one; the mean is 1."""
    dense, sparse = _lattice([5000.0, 2.5, 0.0], 1.0), _lattice([6500.0, 4.5, -2.0], 2.0)
    labels = np.concatenate([dense, sparse])
    for beta in (0.5, 1.0):
        weights = density_weights(labels, LABEL_NAMES, TrainConfig(density_weighting=beta, density_cap=10))
        assert weights[64:] / weights[:64] == pytest.approx(np.full(64, 8.0**beta), rel=1e-9)
        assert weights.mean() == pytest.approx(1.0)
        # Mean 1 over both halves: the dense half's total is 128 / (1 + 8^beta).
        assert weights[:64].sum() == pytest.approx(128 / (1 + 8.0**beta))
    assert (density_weights(labels, LABEL_NAMES, TrainConfig()) == 1).all()  # beta 0: off


def test_weights_match_an_independent_computation_and_are_capped():
    rng = np.random.default_rng(3)
    labels = np.column_stack(
        [rng.normal(5000, 300, 200), rng.normal(2.5, 0.3, 200), rng.normal(0, 0.2, 200), np.zeros((200, 2))]
    )
    labels[:3, :3] = [[7000.0, 4.8, -2.5], [6900.0, 4.6, -2.4], [3600.0, 0.5, 0.5]]  # lone stars
    config = TrainConfig(density_weighting=1.0, density_neighbours=4, density_cap=5.0)
    weights = density_weights(labels, LABEL_NAMES, config)
    assert weights == pytest.approx(_brute_force(labels, 1.0, 4, 5.0), rel=1e-6)
    assert weights.mean() == pytest.approx(1.0) and weights.max() == pytest.approx(5.0)
    assert (weights[:3] == 5.0).all() and (weights < 5.0).sum() > 150  # the lone stars are capped
    # A row lacking Teff weighs 1 and is nobody's neighbour; the label order comes from the names.
    with_missing = np.concatenate([labels, [[np.nan, 2.5, 0.0, 0.0, 0.0]]])
    weights_missing = density_weights(with_missing, LABEL_NAMES, config)
    assert weights_missing[-1] == 1.0 and weights_missing[:-1] == pytest.approx(weights)
    names = ("feh", "mgfe", "teff", "alfe", "logg")
    shuffled = labels[:, [LABEL_NAMES.index(n) for n in names]]
    assert density_weights(shuffled, names, config) == pytest.approx(weights)
    with pytest.raises(ConfigError, match="logg"):
        density_weights(labels[:, [0, 2]], ("teff", "feh"), config)


def test_a_row_s_weight_scales_its_loss_and_its_gradient():
    """The loss against a hand computation, and a row of weight 2 counts as that row twice."""
    rng = np.random.default_rng(1)
    scaler = LabelScaler.fit(rng.normal([5000, 3, 0, 0.1, 0.1], [500, 1, 0.5, 0.1, 0.1], (50, 5)))
    labels = scaler.inverse(rng.normal(size=(5, 5)))
    labels[1, 3] = np.nan
    predicted = rng.normal(size=(5, 5))
    weight = np.array([2.0, 0.5, 1.0, 3.0, 0.0])
    config = TrainConfig(density_weighting=1.0)
    batch = {"labels": torch.as_tensor(labels), "sample_weight": torch.as_tensor(weight)}
    target, weights = loss_targets(batch, scaler, config)
    output = torch.tensor(predicted, dtype=torch.float32, requires_grad=True)
    loss = masked_mean((output - target) ** 2, weights)
    loss.backward()
    sq = (predicted - (labels - scaler.offset) / scaler.scale) ** 2
    present = np.isfinite(labels)
    w = weight[:, None] * present
    per_label = np.nansum(w * np.where(present, sq, 0.0), axis=0) / w.sum(0)
    assert float(loss.detach()) == pytest.approx(per_label.mean(), rel=1e-5)
    # d loss / d output[i, k] = 2 w_i (output - target) / (5 sum_i w_i): proportional to the weight.
    residual = np.where(present, predicted - (labels - scaler.offset) / scaler.scale, 0.0)
    expected_grad = 2 * w * residual / w.sum(0) / 5
    assert output.grad.numpy() == pytest.approx(expected_grad, rel=1e-4, abs=1e-7)
    assert (output.grad.numpy()[4] == 0).all()  # weight 0: no pull at all

    twice = {"labels": torch.as_tensor(np.concatenate([labels, labels[:1]]))}
    target2, weights2 = loss_targets(twice, scaler, TrainConfig())
    output2 = torch.as_tensor(np.concatenate([predicted, predicted[:1]]), dtype=torch.float32)
    single = {"labels": torch.as_tensor(labels), "sample_weight": torch.tensor([2.0, 1, 1, 1, 1])}
    target1, weights1 = loss_targets(single, scaler, config)
    assert float(masked_mean((output2 - target2) ** 2, weights2)) == pytest.approx(
        float(masked_mean((output.detach() - target1) ** 2, weights1)), rel=1e-6
    )
    with pytest.raises(InputError, match="sample_weight"):
        loss_targets({"labels": torch.as_tensor(labels)}, scaler, config)


def test_rows_of_weight_zero_train_like_rows_left_out(tiny_setup):
    """Through ArrayData's batches into train_member: poisoned rows of weight 0 change nothing."""
    train, val = _data(tiny_setup, 64, 0), _data(tiny_setup, 24, 1)
    scaler = LabelScaler.fit(train.labels)
    arch = ARCH.replace(dropout=0.0)
    config = TrainConfig(epochs=3, batch_size=64, learning_rate=3e-3, seed=1, augment=AugmentConfig())
    labels = train.labels.copy()
    labels[:8] += 1000.0
    weight = np.r_[np.zeros(8), np.full(56, 1.7)]  # the others' common factor cancels in the mean
    poisoned = ArrayData(train.flux, train.mask, labels, sample_weight=weight)
    without = ArrayData(train.flux[8:], train.mask[8:], train.labels[8:])
    a = train_member(arch, tiny_setup, scaler, config.replace(density_weighting=1.0), poisoned, val)
    b = train_member(arch, tiny_setup, scaler, config, without, val)
    for key, value in _weights(a.network).items():
        assert torch.allclose(value, _weights(b.network)[key], rtol=1e-4, atol=1e-6), key
    with pytest.raises(InputError, match="sample_weight"):
        train_member(arch, tiny_setup, scaler, config.replace(density_weighting=1.0), without, val)


def test_config_without_the_density_fields_loads_and_validates():
    config = TrainConfig(density_weighting=0.5, density_neighbours=8, density_cap=6.0)
    assert TrainConfig.from_dict(config.to_dict()) == config
    old = TrainConfig().to_dict()  # a model.json written before density weighting existed
    for key in ("density_weighting", "density_neighbours", "density_cap"):
        del old[key]
    assert TrainConfig.from_dict(old) == TrainConfig() and TrainConfig().density_weighting == 0.0
    for bad in ({"density_weighting": -1}, {"density_neighbours": 0}, {"density_cap": 0.5}):
        with pytest.raises(ConfigError, match="density"):
            TrainConfig(**bad)


def test_fit_ensemble_weighs_by_the_pool_and_records_it(small_survey, setup, tmp_path):
    """The in-process fit: weights from the rows outside the test split (1 inside it), the same for
    every member, and density_weighting in model.json."""
    arrays = prepare_arrays(small_survey, setup)
    split = SplitRule(test_fraction=0.2, val_fraction=0.25)
    config = TrainConfig(epochs=1, batch_size=8, density_weighting=1.0, density_neighbours=3)
    pool = ~split.is_test(arrays["spectrum_id"])
    weights = sample_weights(arrays, pool, config)
    assert (weights[~pool] == 1).all()
    assert weights[pool] == pytest.approx(density_weights(arrays["labels"][pool], LABEL_NAMES, config))
    assert sample_weights(arrays, pool, TrainConfig()) is None
    train, _ = member_data({**arrays, "sample_weight": weights}, split, 1)
    assert train.sample_weight is not None and len(train.sample_weight) == len(train)

    arch = TINY_ARCH.replace(conv_channels=(2, 2), pool_size=8)
    ensemble = fit_ensemble(arrays, setup, arch, config, EnsembleConfig(n_members=1, split=split), data={})
    io.save_model(ensemble, str(tmp_path / "model"))
    loaded = io.load_model(str(tmp_path / "model"), setup=setup)
    recorded = TrainConfig.from_dict(loaded.info["training"]["config"])
    assert recorded.density_weighting == 1.0 and recorded.density_neighbours == 3
