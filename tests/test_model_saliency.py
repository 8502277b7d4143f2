"""Saliency against central finite differences (float64), the summary and the accumulators."""

import numpy as np
import pytest
import torch
from tiny import LABELS, TINY_ARCH

from speclabel.model.arch import build_network
from speclabel.model.ensemble import Ensemble
from speclabel.model.saliency import SaliencyAccumulator, summarise
from speclabel.model.scaling import LabelScaler


def _ensemble(setup, arch, n=3):
    torch.manual_seed(5)
    networks = [build_network(arch, setup).double() for _ in range(n)]
    if arch.center_input:
        for network in networks:
            network.set_reference(np.random.default_rng(1).uniform(0.7, 1.0, setup.n_pixels))
    return Ensemble(setup, arch, LabelScaler.fit(LABELS), networks)


@pytest.mark.parametrize(
    "arch",
    [TINY_ARCH, TINY_ARCH.replace(arms="per_arm", mask_channel=True), TINY_ARCH.replace(center_input=True)],
)
def test_gradients_match_finite_differences(tiny_setup, arch):
    ensemble = _ensemble(tiny_setup, arch)
    rng = np.random.default_rng(2)
    flux = rng.uniform(0.5, 1.0, (2, tiny_setup.n_pixels))
    mask = np.ones(flux.shape, bool)
    mask[0, [10, 100]] = False
    flux[~mask] = 1.0
    pred = ensemble.predict(flux, mask, saliency="full")
    maps = pred.saliency_maps
    assert maps.shape == (2, 5, tiny_setup.n_pixels) and maps.dtype == np.float64
    eps = 1e-5  # the network is piecewise linear: truncation error is nil, round-off ~1e-16 * 5000 / eps
    numeric = np.zeros_like(maps)
    for p in range(tiny_setup.n_pixels):
        up, down = flux.copy(), flux.copy()
        up[:, p] += eps
        down[:, p] -= eps
        numeric[:, :, p] = (ensemble.predict(up, mask).mean - ensemble.predict(down, mask).mean) / (2 * eps)
    good = np.broadcast_to(mask[:, None, :], maps.shape)
    # Physical units: Teff gradients are ~1000x those of abundances; compare per label.
    for k in range(5):
        ref = numeric[:, k][good[:, k]]
        assert np.allclose(maps[:, k][good[:, k]], ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max())
    assert (maps[~good] == 0).all()
    assert np.abs(numeric[:, 0]).max() > 100 * np.abs(numeric[:, 2]).max()  # scale was applied


def test_batched_saliency_equals_one_by_one(tiny_setup):
    ensemble = _ensemble(tiny_setup, TINY_ARCH)
    flux = np.random.default_rng(4).uniform(0.5, 1.0, (5, tiny_setup.n_pixels))
    together = ensemble.predict(flux, saliency="full", batch_size=5).saliency_maps
    single = np.concatenate(
        [ensemble.predict(flux[i : i + 1], saliency="full").saliency_maps for i in range(5)]
    )
    assert np.allclose(together, single, rtol=1e-12, atol=0)


def test_summary_shares_and_peak_against_numpy(tiny_setup):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 5, tiny_setup.n_pixels)).astype(np.float32)
    maps[1, 2] = 0.0
    summary = summarise(maps, tiny_setup)
    assert summary.groups == ("Fe I", "Ca II")
    wave = tiny_setup.wave
    fe = ((wave >= 5010) & (wave <= 5012)) | ((wave >= 5030) & (wave <= 5031))
    ca = (wave >= 8510) & (wave <= 8515)
    total = np.abs(maps.astype(float)).sum(axis=2)
    with np.errstate(invalid="ignore"):
        assert np.allclose(
            summary.shares[..., 0], np.nan_to_num(np.abs(maps[..., fe]).sum(axis=2) / total), atol=1e-6
        )
        assert np.allclose(
            summary.shares[..., 1], np.nan_to_num(np.abs(maps[..., ca]).sum(axis=2) / total), atol=1e-6
        )
    assert (summary.shares[1, 2] == 0).all()
    assert np.array_equal(summary.peak_wave, wave[np.abs(maps).argmax(axis=2)])
    assert np.allclose(summary.total_abs, total, rtol=1e-6)


def test_accumulators_merge_to_the_whole(tiny_setup):
    ensemble = _ensemble(tiny_setup, TINY_ARCH)
    flux = np.random.default_rng(6).uniform(0.5, 1.0, (6, tiny_setup.n_pixels))
    whole, first, second = (SaliencyAccumulator.empty(5, tiny_setup.n_pixels) for _ in range(3))
    maps = ensemble.predict(flux, saliency="full", accumulator=whole).saliency_maps
    ensemble.predict(flux[:4], accumulator=first)
    ensemble.predict(flux[4:], accumulator=second)
    merged = SaliencyAccumulator.from_arrays(first.merge(second).to_arrays())
    assert merged.count == whole.count == 6
    assert np.allclose(merged.sum, whole.sum) and np.allclose(merged.sum_abs, whole.sum_abs)
    assert np.allclose(whole.mean, maps.mean(axis=0)) and np.allclose(
        whole.mean_abs, np.abs(maps).mean(axis=0)
    )
