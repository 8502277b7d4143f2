"""One member's training loop: determinism, exact resume, early stopping, weighting, augmentation."""

import math

import numpy as np
import pytest
import torch
from tiny import TINY_ARCH, uniform_labels

from speclabel.core.errors import ConfigError, InputError
from speclabel.core.setups import SPEED_OF_LIGHT_KMS
from speclabel.model.scaling import LabelScaler
from speclabel.model.training import (
    ArrayData,
    AugmentConfig,
    BatchStream,
    TrainConfig,
    TrainingState,
    augment,
    continuum_tilt,
    derived_seed,
    label_balance_weights,
    loss_targets,
    masked_mean,
    rv_shift,
    train_member,
)

ARCH = TINY_ARCH.replace(conv_channels=(4, 2), dropout=0.2)


def _data(setup, n, seed):
    """Spectra whose line depths follow the labels, so that there is something to learn."""
    rng = np.random.default_rng(seed)
    labels = uniform_labels(rng, n)
    z = (labels - labels.mean(0)) / labels.std(0)
    x = np.arange(setup.n_pixels)
    lines = np.stack([np.exp(-0.5 * ((x - c) / 2.0) ** 2) for c in (20, 50, 70, 110, 140)])
    clean = 1.0 - 0.3 * (1 + np.tanh(z)) @ lines / 2
    flux = (clean + rng.normal(0, 0.01, clean.shape)).astype(np.float32)
    mask = np.ones(flux.shape, bool)
    ivar = np.full(flux.shape, 1e4, np.float32)
    err = np.tile([50.0, 0.1, 0.05, 0.03, 0.04], (n, 1))
    return ArrayData(flux, mask, labels, err, ivar, clean.astype(np.float32))


@pytest.fixture(scope="module")
def data(tiny_setup):
    train, val = _data(tiny_setup, 64, 0), _data(tiny_setup, 24, 1)
    return train, val, LabelScaler.fit(train.labels)


def _weights(network):
    return {k: v.clone() for k, v in network.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


CONFIG = TrainConfig(
    epochs=6,
    batch_size=16,
    learning_rate=3e-3,
    patience=50,
    seed=3,
    augment=AugmentConfig(noise=True, snr_range=(30, 100), rv_shift_kms=3.0),
)


def test_training_learns_and_is_deterministic_by_seed(tiny_setup, data):
    train, val, scaler = data
    a = train_member(ARCH, tiny_setup, scaler, CONFIG, train, val)
    b = train_member(ARCH, tiny_setup, scaler, CONFIG, train, val)
    c = train_member(ARCH, tiny_setup, scaler, CONFIG.replace(seed=4), train, val)
    assert _same(_weights(a.network), _weights(b.network))
    assert a.history == [{**h, "seconds": a.history[i]["seconds"]} for i, h in enumerate(b.history)]
    assert not _same(_weights(a.network), _weights(c.network))
    assert a.history[-1]["val_loss"] < a.history[0]["val_loss"]
    assert a.n_train == 64 and a.n_val == 24 and set(a.val_metrics) == set(scaler.names)
    # A global torch seed set by the caller neither changes the result nor is consumed by training.
    torch.manual_seed(123)
    before = torch.get_rng_state()
    d = train_member(ARCH, tiny_setup, scaler, CONFIG, train, val)
    assert torch.equal(torch.get_rng_state(), before) and _same(_weights(a.network), _weights(d.network))


def test_resume_from_saved_state_equals_an_uninterrupted_run(tiny_setup, data, tmp_path):
    train, val, scaler = data
    config = CONFIG.replace(lr_schedule="plateau", plateau_patience=1)
    states = {}
    whole = train_member(
        ARCH, tiny_setup, scaler, config, train, val, on_epoch=lambda m, s: states.setdefault(m.epoch, s)
    )
    states[3].save(tmp_path / "epoch-3")
    assert sorted(p.name for p in (tmp_path / "epoch-3").iterdir()) == ["state.json", "state.safetensors"]
    resumed_state = TrainingState.load(tmp_path / "epoch-3")
    resumed = train_member(ARCH, tiny_setup, scaler, config, train, val, resume=resumed_state)
    assert _same(_weights(whole.network), _weights(resumed.network))
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in whole.history]
    assert resumed.best_epoch == whole.best_epoch
    with pytest.raises(ConfigError, match="another configuration"):
        train_member(
            ARCH, tiny_setup, scaler, config.replace(learning_rate=1e-2), train, val, resume=resumed_state
        )


def test_early_stopping_restores_the_best_weights(tiny_setup, data):
    train, val, scaler = data
    config = TrainConfig(
        epochs=40, batch_size=16, learning_rate=0.3, patience=2, seed=0
    )  # lr this high diverges
    best = {}

    def keep(metrics, state):
        if metrics.best_epoch == metrics.epoch:
            best["weights"] = {k: v.clone() for k, v in state.model.items()}

    result = train_member(ARCH, tiny_setup, scaler, config, train, val, on_epoch=keep)
    assert result.stopped_early and result.epochs_run < 40
    assert result.epochs_run - result.best_epoch == 2 or not math.isfinite(result.history[-1]["val_loss"])
    assert _same(_weights(result.network), best["weights"])
    assert result.best_val_loss == min(h["val_loss"] for h in result.history if math.isfinite(h["val_loss"]))


def test_batch_stream_gives_the_same_result_as_arrays(tiny_setup, data):
    train, val, scaler = data
    config = CONFIG.replace(epochs=2)

    def factory(data, config, seed):
        return BatchStream(lambda epoch: data.batches(epoch, config.batch_size, derived_seed(seed, 3, epoch)))

    a = train_member(ARCH, tiny_setup, scaler, config, train, val)
    streamed = factory(train, config, config.seed)
    torch_batches = BatchStream(
        lambda epoch: (
            {k: torch.from_numpy(v) for k, v in b.items()} for b in streamed.batches(epoch, 0, None)
        )
    )
    b = train_member(
        ARCH, tiny_setup, scaler, config, torch_batches, BatchStream(lambda epoch: val.batches(0, 256, None))
    )
    assert _same(_weights(a.network), _weights(b.network))


def test_inverse_variance_weighting_ignores_rows_with_huge_errors(tiny_setup, data):
    """Rows with enormous label errors and absurd labels train the same network as leaving them out."""
    train, val, scaler = data
    arch = ARCH.replace(
        dropout=0.0
    )  # dropout masks depend on the batch size; without it only the rows matter
    config = TrainConfig(
        epochs=3,
        batch_size=64,
        learning_rate=3e-3,
        seed=1,
        loss_weighting="inverse_variance",
        augment=AugmentConfig(),
    )
    labels, err = train.labels.copy(), train.label_err.copy()
    labels[:8] += 1000.0
    err[:8] = 1e9
    poisoned = ArrayData(train.flux, train.mask, labels, err)
    without = ArrayData(train.flux[8:], train.mask[8:], train.labels[8:], train.label_err[8:])
    a = train_member(arch, tiny_setup, scaler, config, poisoned, val)
    b = train_member(arch, tiny_setup, scaler, config, without, val)
    for key, value in _weights(a.network).items():
        assert torch.allclose(value, _weights(b.network)[key], rtol=1e-4, atol=1e-6), key
    unweighted = train_member(arch, tiny_setup, scaler, config.replace(loss_weighting="none"), poisoned, val)
    assert unweighted.history[0]["train_loss"] > 1000 * a.history[0]["train_loss"]
    assert not torch.allclose(
        _weights(unweighted.network)["head.1.bias"], _weights(b.network)["head.1.bias"], rtol=1e-2
    )
    with pytest.raises(InputError, match="label_err"):
        train_member(arch, tiny_setup, scaler, config, ArrayData(train.flux, train.mask, train.labels), val)


@pytest.mark.parametrize("weighting", ["none", "inverse_variance"])
def test_masked_loss_is_the_mean_over_present_labels_only(data, weighting):
    """The loss of a batch with missing labels, against a hand computation over the present entries."""
    _, _, scaler = data
    rng = np.random.default_rng(5)
    labels = scaler.inverse(rng.normal(size=(6, 5)))
    labels[[0, 2, 3], 3] = np.nan  # three rows lack [Mg/Fe]
    labels[1, [0, 4]] = np.nan
    labels[:, 4] = np.nan  # no row of this batch has [Al/Fe]: that label is left out of the mean
    err = rng.uniform(0.5, 2.0, size=(6, 5)) * scaler.scale
    predicted = rng.normal(size=(6, 5))
    config = TrainConfig(loss_weighting=weighting)
    batch = {"labels": torch.as_tensor(labels), "label_err": torch.as_tensor(err)}
    target, weights = loss_targets(batch, scaler, config)
    output = torch.tensor(predicted, dtype=torch.float32, requires_grad=True)
    loss = masked_mean((output - target) ** 2, weights)
    loss.backward()

    expected = []
    for k in range(4):
        rows = np.isfinite(labels[:, k])
        sq = (predicted[rows, k] - (labels[rows, k] - scaler.offset[k]) / scaler.scale[k]) ** 2
        w = np.ones(rows.sum()) if weighting == "none" else (err[rows, k] / scaler.scale[k]) ** -2.0
        expected.append((w * sq).sum() / w.sum())
    assert float(loss.detach()) == pytest.approx(np.mean(expected), rel=1e-5)
    assert torch.isfinite(output.grad).all()
    missing = ~np.isfinite(labels)
    assert (output.grad.numpy()[missing] == 0).all() and (output.grad.numpy()[~missing] != 0).all()


def test_missing_labels_train_like_entries_of_no_weight(tiny_setup, data):
    """Rows lacking [Mg/Fe] train the same network as those rows with a near-infinite [Mg/Fe] error."""
    train, val, scaler = data
    config = TrainConfig(epochs=3, batch_size=64, learning_rate=3e-3, seed=1, augment=AugmentConfig())
    arch = ARCH.replace(dropout=0.0)
    labels, err = train.labels.copy(), np.ones_like(train.labels) * scaler.scale
    labels[:20, 3] = np.nan
    val_labels = val.labels.copy()
    val_labels[:5, 3] = np.nan
    val_missing = ArrayData(val.flux, val.mask, val_labels)
    a = train_member(arch, tiny_setup, scaler, config, ArrayData(train.flux, train.mask, labels), val_missing)
    err[:20, 3] = 1e12
    weighted = config.replace(loss_weighting="inverse_variance", error_floor=1e-6)
    b = train_member(
        arch, tiny_setup, scaler, weighted, ArrayData(train.flux, train.mask, train.labels, err), val
    )
    for key, value in _weights(a.network).items():
        assert torch.allclose(value, _weights(b.network)[key], rtol=1e-4, atol=1e-6), key
    assert math.isfinite(a.best_val_loss) and a.val_metrics["mgfe"]["n"] == len(val) - 5


def test_rv_shift_matches_numpy_interpolation(tiny_setup):
    rng = np.random.default_rng(0)
    flux = torch.from_numpy(rng.uniform(0.5, 1.0, (3, tiny_setup.n_pixels)))
    mask = torch.ones(flux.shape, dtype=torch.bool)
    mask[1, 30] = False
    velocity = torch.tensor([5.0, -3.0, 0.0], dtype=torch.float64)
    shifted, shifted_mask = rv_shift(flux, mask, tiny_setup, velocity)
    for row in range(3):
        for arm, part in zip(tiny_setup.arms, tiny_setup.arm_slices.values(), strict=True):
            wave = arm.wave
            rest = wave / (1 + velocity[row].item() / SPEED_OF_LIGHT_KMS)
            expected = np.interp(rest, wave, flux[row, part].numpy())
            assert np.allclose(shifted[row, part].numpy(), expected, atol=1e-12)
    assert torch.equal(shifted[2], flux[2])
    assert not shifted_mask[1, 30] and shifted_mask.sum() >= flux.numel() - 2


def test_noise_augmentation_reaches_the_drawn_snr(tiny_setup):
    n, p = 400, tiny_setup.n_pixels
    clean = torch.ones((n, p))
    batch = {
        "flux": clean.clone(),
        "mask": torch.ones((n, p), dtype=torch.bool),
        "flux_clean": clean,
        "ivar": torch.full((n, p), 1e6),
    }
    generator = torch.Generator().manual_seed(0)
    config = AugmentConfig(noise=True, snr_range=(20.0, 20.0))
    noisy, _ = augment(batch, config, tiny_setup, generator)
    assert (noisy - clean).std().item() == pytest.approx(1 / 20, rel=0.02)
    # Without twins: an S/N 1000 spectrum (ivar 1e6) is degraded to the drawn S/N 20.
    observed = {k: v for k, v in batch.items() if k != "flux_clean"}
    degraded, _ = augment(observed, config, tiny_setup, generator)
    assert (degraded - clean).std().item() == pytest.approx(1 / 20, rel=0.02)
    # A spectrum already noisier than the drawn S/N gets no extra noise.
    low = {**observed, "ivar": torch.full((n, p), 100.0)}
    same, _ = augment(low, config, tiny_setup, generator)
    assert torch.equal(same, clean)
    with pytest.raises(InputError, match="needs ivar"):
        augment({"flux": clean, "mask": batch["mask"]}, config, tiny_setup, generator)


def _arm_x(arm):
    """The arm's wavelengths mapped linearly onto [-1, 1], from its first and last wavelength."""
    return np.interp(arm.wave, [arm.wave[0], arm.wave[-1]], [-1.0, 1.0])


def test_continuum_tilt_is_linear_per_arm_and_leaves_masked_pixels(tiny_setup):
    n, p = 3, tiny_setup.n_pixels
    flux = torch.full((n, p), 0.8, dtype=torch.float64)
    mask = torch.ones((n, p), dtype=torch.bool)
    mask[1, 5] = mask[2, 100] = False
    flux[1, 5] = flux[2, 100] = 7.0
    tilt = torch.tensor([[0.01, -0.02], [0.0, 0.03], [-0.005, 0.0]], dtype=torch.float64)
    out = continuum_tilt(flux, mask, tiny_setup, tilt).numpy()
    for a, (arm, part) in enumerate(zip(tiny_setup.arms, tiny_setup.arm_slices.values(), strict=True)):
        expected = 0.8 * (1 + tilt[:, a : a + 1].numpy() * _arm_x(arm)[None, :])
        good = mask[:, part].numpy()
        assert np.allclose(out[:, part][good], expected[good], atol=1e-12)
    assert out[1, 5] == 7.0 and out[2, 100] == 7.0


def test_continuum_tilt_augmentation_is_per_arm_bounded_and_seeded(tiny_setup):
    n, p = 200, tiny_setup.n_pixels
    batch = {"flux": torch.ones((n, p)), "mask": torch.ones((n, p), dtype=torch.bool)}
    batch["mask"][0, 3] = False
    config = AugmentConfig(continuum_tilt=0.01)
    assert config.active
    tilted, mask = augment(batch, config, tiny_setup, torch.Generator().manual_seed(4))
    slopes = []
    for arm, part in zip(tiny_setup.arms, tiny_setup.arm_slices.values(), strict=True):
        x, y = _arm_x(arm), tilted[:, part].double().numpy() - 1
        keep = mask[:, part].numpy()
        fits = [np.polyfit(x[k], row[k], 1) for row, k in zip(y, keep, strict=True)]
        slope, intercept = np.array(fits).T
        assert np.allclose(intercept, 0, atol=1e-6)  # a tilt about the arm's centre: no offset
        assert np.allclose(y[keep], (slope[:, None] * x[None, :])[keep], atol=1e-6)  # linear
        slopes.append(slope)
    slopes = np.array(slopes)  # [arm, row]
    assert np.abs(slopes).max() <= 0.01 and np.abs(slopes).max() > 0.009  # uniform in +-0.01
    assert abs(np.corrcoef(slopes)[0, 1]) < 0.3  # each arm draws its own tilt
    assert tilted[0, 3] == 1.0  # masked pixel untouched
    again, _ = augment(batch, config, tiny_setup, torch.Generator().manual_seed(4))
    other, _ = augment(batch, config, tiny_setup, torch.Generator().manual_seed(5))
    assert torch.equal(again, tilted) and not torch.equal(other, tilted)
    with pytest.raises(ConfigError, match="continuum_tilt"):
        AugmentConfig(continuum_tilt=-0.01)


def test_config_round_trip_and_validation():
    assert TrainConfig.from_dict(CONFIG.to_dict()) == CONFIG
    tilted = CONFIG.replace(augment=AugmentConfig(noise=True, continuum_tilt=0.01))
    assert TrainConfig.from_dict(tilted.to_dict()).augment.continuum_tilt == 0.01
    # A model.json written before continuum_tilt existed reads as no tilt.
    old = CONFIG.to_dict()
    del old["augment"]["continuum_tilt"]
    assert TrainConfig.from_dict(old) == CONFIG
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="loss_weighting"):
        TrainConfig(loss_weighting="huber")


def test_states_and_result_are_on_cpu_whatever_the_device(tiny_setup, data):
    train, val, scaler = data
    devices = []
    config = CONFIG.replace(epochs=2)
    result = train_member(
        ARCH,
        tiny_setup,
        scaler,
        config,
        train,
        val,
        device="cuda" if torch.cuda.is_available() else "cpu",
        on_epoch=lambda m, s: devices.extend(
            v.device.type for v in (*s.model.values(), *s.best_model.values())
        ),
    )
    assert set(devices) == {"cpu"}
    assert {p.device.type for p in result.network.parameters()} == {"cpu"}
    if torch.cuda.is_available():  # the GPU run learns the same function up to float rounding
        reference = train_member(ARCH, tiny_setup, scaler, config, train, val)
        assert result.best_val_loss == pytest.approx(reference.best_val_loss, rel=1e-3)


def test_centred_input_uses_the_training_mean_and_survives_resume(tiny_setup, data, tmp_path):
    train, val, scaler = data
    arch = ARCH.replace(center_input=True)
    config = CONFIG.replace(epochs=3, lr_schedule="cosine")
    states = []
    result = train_member(
        arch, tiny_setup, scaler, config, train, val, on_epoch=lambda m, s: states.append(s)
    )
    expected = (train.flux * train.mask).sum(0) / train.mask.sum(0)
    assert np.allclose(result.network.reference.numpy(), expected, atol=1e-6)
    assert [h["learning_rate"] for h in result.history] == pytest.approx(
        [3e-3 * (0.01 + 0.99 * (1 + math.cos(math.pi * e / 3)) / 2) for e in (1, 2, 3)]
    )
    states[0].save(tmp_path / "s")
    resumed = train_member(
        arch, tiny_setup, scaler, config, train, val, resume=TrainingState.load(tmp_path / "s")
    )
    assert _same(_weights(result.network), _weights(resumed.network))


def test_label_balance_weights_follow_the_last_validation_errors():
    scaler = LabelScaler.fit(np.array([[4000.0, 1.0, -2.0, -0.3, -0.4], [6000.0, 5.0, 0.5, 0.5, 0.4]]))
    config = TrainConfig(label_balance=0.5)
    assert label_balance_weights([], scaler, TrainConfig()) is None  # off by default
    assert torch.equal(label_balance_weights([], scaler, config), torch.ones(5))  # the first epoch
    rmse = np.array([40.0, 0.08, 0.01, np.nan, 0.08])
    history = [{"val_rmse": {}}, {"val_rmse": dict(zip(scaler.names, rmse, strict=True))}]
    got = label_balance_weights(history, scaler, config).numpy()
    # Independently: alpha 0.5 weighs each label by 1 / (its scaled rmse), floored at error_floor;
    # [Mg/Fe] has no validation error and weighs 1; the others average 1.
    scaled = np.maximum(rmse / scaler.scale, config.error_floor)
    known = [0, 1, 2, 4]
    expected = (1 / scaled[known]) / (1 / scaled[known]).mean()
    np.testing.assert_allclose(got[known], expected, rtol=1e-6)
    assert got[3] == 1.0
    assert scaled[2] == config.error_floor  # the floor was used, so it is tested
    # alpha 1 equalises the labels' weighted losses: weight x MSE is the same for every known label.
    full = label_balance_weights(history, scaler, config.replace(label_balance=1.0)).numpy()
    np.testing.assert_allclose(full[known] * scaled[known] ** 2, (full[0] * scaled[0] ** 2), rtol=1e-6)
    with pytest.raises(ConfigError, match="label_balance"):
        TrainConfig(label_balance=-1)
    old = TrainConfig().to_dict()  # a model.json written before label balancing existed
    del old["label_balance"]
    assert TrainConfig.from_dict(old).label_balance == 0


def test_masked_mean_weighs_each_label_after_its_own_mean():
    sq = torch.tensor([[1.0, 4.0], [3.0, 8.0], [5.0, 0.0]])
    weights = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    # Per label: (1 + 3) / 2 = 2 and (4 + 8 + 0) / 3 = 4; weighted 0.5 and 1.5, the mean is 3.5.
    assert float(masked_mean(sq, weights, label_weights=torch.tensor([0.5, 1.5]))) == pytest.approx(3.5)
    assert float(masked_mean(sq, weights)) == pytest.approx(3.0)


def test_label_balance_trains_differently_and_resumes_exactly(tiny_setup, data, tmp_path):
    train, val, scaler = data
    config = CONFIG.replace(epochs=4, label_balance=1.0)
    states = {}
    balanced = train_member(
        ARCH, tiny_setup, scaler, config, train, val, on_epoch=lambda m, s: states.setdefault(m.epoch, s)
    )
    plain = train_member(ARCH, tiny_setup, scaler, config.replace(label_balance=0.0), train, val)
    # The first epoch weighs every label 1, the later ones do not.
    assert balanced.history[0]["train_loss"] == plain.history[0]["train_loss"]
    assert not _same(_weights(balanced.network), _weights(plain.network))
    # The weights are read from the recorded history, so a resumed run trains with the same ones.
    states[2].save(tmp_path / "epoch-2")
    resumed = train_member(
        ARCH, tiny_setup, scaler, config, train, val, resume=TrainingState.load(tmp_path / "epoch-2")
    )
    assert _same(_weights(balanced.network), _weights(resumed.network))
