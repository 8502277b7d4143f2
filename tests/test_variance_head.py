"""The variance head (ArchConfig.variance_head): labels unchanged, the error it learns, the ensemble's
aleatoric term through both engines and through a saved model directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import LABEL_RANGES, TINY_ARCH, uniform_labels

from speclabel.model.arch import LOG_VARIANCE_RANGE, ArchConfig
from speclabel.model.ensemble import Ensemble
from speclabel.model.io import load_model, save_model
from speclabel.model.scaling import LabelScaler
from speclabel.model.training import ArrayData, AugmentConfig, TrainConfig, train_member, variance_loss

ARCH = TINY_ARCH.replace(conv_channels=(4, 4), dense_units=(16,))
HEAD = ARCH.replace(variance_head=True)
ALFE = 4
# Rows hotter than this get [Al/Fe] labels with this much noise; cooler rows exact labels.
HOT, NOISY_ALFE = 5250.0, 0.3


def _stars(setup, n, seed, *, label_noise=True):
    """Spectra whose line depths follow the labels (Teff drives the first line, so the network can see
    which rows are hot); the hot rows' [Al/Fe] labels carry noise that no spectrum explains."""
    rng = np.random.default_rng(seed)
    labels = uniform_labels(rng, n, ((4500.0, 6000.0), *LABEL_RANGES[1:]))
    z = (labels - [5250, 3, -0.8, 0.1, 0.05]) / [430, 1.15, 0.7, 0.17, 0.2]
    x = np.arange(setup.n_pixels)
    lines = np.stack([np.exp(-0.5 * ((x - c) / 2.0) ** 2) for c in (20, 50, 70, 110, 140)])
    clean = 1.0 - 0.3 * (1 + np.tanh(z)) @ lines / 2
    flux = (clean + rng.normal(0, 0.005, clean.shape)).astype(np.float32)
    observed = labels.copy()
    if label_noise:
        hot = labels[:, 0] > HOT
        observed[hot, ALFE] += rng.normal(0, NOISY_ALFE, hot.sum())
    return ArrayData(flux, np.ones(flux.shape, bool), observed), labels


CONFIG = TrainConfig(
    epochs=40, batch_size=16, learning_rate=3e-3, patience=100, seed=2, augment=AugmentConfig()
)


@pytest.fixture(scope="module")
def trained(tiny_setup):
    (train, _), (val, _) = _stars(tiny_setup, 240, 0), _stars(tiny_setup, 48, 1)
    scaler = LabelScaler.fit(train.labels)
    with_head = train_member(HEAD, tiny_setup, scaler, CONFIG, train, val)
    without = train_member(ARCH, tiny_setup, scaler, CONFIG, train, val)
    return scaler, with_head, without


def test_the_head_leaves_every_label_weight_as_without_it(trained):
    _, with_head, without = trained
    head_state, plain_state = with_head.network.state_dict(), without.network.state_dict()
    assert {k for k in head_state if not k.startswith("variance.")} == set(plain_state)
    for key, value in plain_state.items():
        assert torch.equal(head_state[key], value), key
    assert [h["val_loss"] for h in with_head.history] == [h["val_loss"] for h in without.history]
    assert with_head.best_epoch == without.best_epoch


def test_the_head_learns_which_rows_have_noisy_labels(tiny_setup, trained):
    """On held-out stars with the same label noise, the learnt error follows the actual error: large
    for the hot rows' [Al/Fe], several times that of the cool rows', and no split in Teff."""
    scaler, with_head, _ = trained
    test, truth = _stars(tiny_setup, 400, 5)
    prediction = Ensemble(tiny_setup, HEAD, scaler, [with_head.network]).predict(test.flux, test.mask)
    error = prediction.mean - test.labels
    hot = truth[:, 0] > HOT + 150  # away from the edge, where the head cannot be sharp
    cool = truth[:, 0] < HOT - 150

    def rms(x):
        return np.sqrt(np.mean(x**2))

    learnt = prediction.aleatoric
    assert rms(learnt[hot, ALFE]) == pytest.approx(rms(error[hot, ALFE]), rel=0.3)
    actual_ratio = rms(error[hot, ALFE]) / rms(error[cool, ALFE])
    assert rms(learnt[hot, ALFE]) / rms(learnt[cool, ALFE]) > 2 < actual_ratio
    assert 0.6 < rms(learnt[hot, 0]) / rms(learnt[cool, 0]) < 1.6


def _independent_aleatoric(networks, flux, scale):
    variances = []
    with torch.no_grad():
        for network in networks:
            _, log_var = network(torch.as_tensor(flux), log_variance=True)
            variances.append(np.exp(np.clip(log_var.double().numpy(), *LOG_VARIANCE_RANGE)))
    return np.sqrt(np.mean(variances, axis=0)) * scale


def test_the_ensemble_averages_member_variances_through_either_engine_and_a_saved_model(
    tiny_setup, trained, tmp_path
):
    scaler, with_head, _ = trained
    torch.manual_seed(0)
    other = type(with_head.network)(HEAD, tiny_setup)  # a second, untrained member: a different head
    other.load_state_dict(
        {
            **with_head.network.state_dict(),
            **{f"variance.{k}": v for k, v in other.variance.state_dict().items()},
        }
    )
    networks = [with_head.network, other]
    ensemble = Ensemble(tiny_setup, HEAD, scaler, networks)
    test, _ = _stars(tiny_setup, 30, 9)
    expected = _independent_aleatoric(networks, test.flux, scaler.scale)
    for engine in ("reference", "fused"):
        got = ensemble.predict(test.flux, test.mask, engine=engine).aleatoric
        np.testing.assert_allclose(got, expected, rtol=2e-5)
    save_model(ensemble, str(tmp_path / "model"))
    loaded = load_model(str(tmp_path / "model"))
    assert loaded.arch.variance_head
    np.testing.assert_allclose(loaded.predict(test.flux, test.mask).aleatoric, expected, rtol=2e-5)
    # A model without a head: no aleatoric term, and its predictions ask for no embeddings.
    plain = Ensemble(tiny_setup, ARCH, scaler, [trained[2].network])
    assert plain.predict(test.flux, test.mask).aleatoric is None


def test_the_loss_is_the_gaussian_likelihood_and_old_architectures_read_without_a_head():
    sq = torch.tensor([[0.04, 4.0]])
    log_var = torch.log(torch.tensor([[0.04, 1.0]]))
    np.testing.assert_allclose(
        variance_loss(log_var, sq).numpy(), 0.5 * (np.log([[0.04, 1.0]]) + np.array([[1.0, 4.0]])), rtol=1e-6
    )
    # Its minimum over the variance is at the squared residual.
    grid = torch.linspace(-6, 2, 801)[:, None]
    best = grid[variance_loss(grid, torch.full_like(grid, 0.25)).argmin()]
    assert float(best) == pytest.approx(np.log(0.25), abs=0.01)
    old = {k: v for k, v in ARCH.to_dict().items() if k != "variance_head"}
    assert ArchConfig.from_dict(old).variance_head is False
    assert ArchConfig.from_dict(HEAD.to_dict()) == HEAD
