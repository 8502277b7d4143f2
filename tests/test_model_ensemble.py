"""The ensemble against a numpy reference: the network, the scaling, the mean and the std."""

import numpy as np
import pytest
import torch
from tiny import LABELS, TINY_ARCH

from speclabel.core.errors import ConfigError, InputError
from speclabel.model.arch import ArchConfig, build_network
from speclabel.model.ensemble import Ensemble, select_members
from speclabel.model.scaling import LabelScaler

ARCH = TINY_ARCH.replace(dropout=0.3)


def numpy_forward(state: dict, arch: ArchConfig, setup, flux: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The network written out in numpy: valid conv, LeakyReLU, floor max-pooling, dense head."""

    def leaky(v):
        return np.where(v > 0, v, arch.leaky_slope * v)

    sd = {k: v.detach().double().numpy() for k, v in state.items()}
    x = np.where(mask, sd["reference"] - flux, 0.0)[:, None, :]
    if arch.mask_channel:
        x = np.concatenate([x, mask[:, None, :].astype(float)], axis=1)
    slices = (
        [(0, setup.n_pixels)]
        if arch.arms == "joined"
        else [(s.start, s.stop) for s in setup.arm_slices.values()]
    )
    features = []
    for b, (start, stop) in enumerate(slices):
        h = x[:, :, start:stop]
        for layer in range(len(arch.conv_channels)):
            w, bias = sd[f"branches.{b}.{3 * layer}.weight"], sd[f"branches.{b}.{3 * layer}.bias"]
            k = w.shape[2]
            windows = np.stack([h[:, :, i : i + k] for i in range(h.shape[2] - k + 1)], axis=2)  # [B,C,L,K]
            h = leaky(np.einsum("bclk,ock->bol", windows, w) + bias[None, :, None])
            n = h.shape[2] // arch.pool_size
            h = h[:, :, : n * arch.pool_size].reshape(h.shape[0], h.shape[1], n, arch.pool_size).max(axis=3)
        features.append(h.reshape(h.shape[0], -1))
    h = np.concatenate(features, axis=1)
    linears = sorted(
        {k.rsplit(".", 1)[0] for k in sd if k.startswith("head.")}, key=lambda s: int(s.split(".")[1])
    )
    for i, name in enumerate(linears):
        h = h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
        if i < len(linears) - 1:
            h = leaky(h)
    return h


@pytest.mark.parametrize(
    "arch", [ARCH, ARCH.replace(arms="per_arm", mask_channel=True), ARCH.replace(center_input=True)]
)
def test_mean_and_std_match_a_numpy_reference(tiny_setup, arch):
    torch.manual_seed(3)
    scaler = LabelScaler.fit(LABELS)
    networks = [build_network(arch, tiny_setup) for _ in range(4)]
    if arch.center_input:
        for network in networks:
            network.set_reference(np.random.default_rng(0).uniform(0.7, 1.0, tiny_setup.n_pixels))
    ensemble = Ensemble(tiny_setup, arch, scaler, networks)
    rng = np.random.default_rng(1)
    flux = rng.uniform(0.5, 1.1, (7, tiny_setup.n_pixels)).astype(np.float32)
    mask = rng.random(flux.shape) > 0.05
    flux[~mask] = 1.0
    pred = ensemble.predict(flux, mask, members=True, batch_size=3)  # batches of 3, 3, 1
    scaled = np.stack(
        [numpy_forward(n.state_dict(), arch, tiny_setup, flux.astype(float), mask) for n in networks]
    )
    physical = scaled * scaler.scale + scaler.offset
    assert np.allclose(pred.members, physical, rtol=1e-5, atol=1e-6 * np.abs(physical).max())
    assert np.allclose(pred.mean, physical.mean(axis=0), rtol=1e-5)
    assert np.allclose(pred.std, physical.std(axis=0, ddof=1), rtol=1e-4, atol=1e-6)
    assert pred.mean.shape == pred.std.shape == (7, 5) and pred.saliency is None
    # Dropout is off at prediction time: the same input gives the same labels.
    assert np.array_equal(ensemble.predict(flux, mask, batch_size=3).mean, pred.mean)


def test_single_member_std_is_nan_and_bad_input_is_refused(tiny_setup):
    ensemble = Ensemble(tiny_setup, ARCH, LabelScaler.fit(LABELS), [build_network(ARCH, tiny_setup)])
    flux = np.ones((2, tiny_setup.n_pixels), np.float32)
    pred = ensemble.predict(flux)
    assert np.isnan(pred.std).all() and np.isfinite(pred.mean).all()
    flux[0, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        ensemble.predict(flux)
    with pytest.raises(InputError, match="does not fit setup"):
        ensemble.predict(np.ones((2, 10), np.float32))
    with pytest.raises(ConfigError, match="saliency must be"):
        ensemble.predict(np.ones((1, tiny_setup.n_pixels), np.float32), saliency="maps")


def test_select_members():
    losses = [0.5, 0.1, np.nan, 0.3, 0.2, 0.9, 0.25, 0.15, 0.4, 0.35]
    assert select_members(losses, keep=3) == [1, 7, 4]
    # 80th percentile of the 9 finite losses is 0.42: the two worst and the diverged one go.
    assert select_members(losses, percentile=80) == [1, 7, 4, 6, 3, 9, 8]
    assert select_members(losses, keep=8, percentile=80) == [1, 7, 4, 6, 3, 9, 8]
    assert select_members(losses) == [1, 7, 4, 6, 3, 9, 8, 0, 5]
    with pytest.raises(ConfigError, match="diverged"):
        select_members([np.nan, np.inf])
