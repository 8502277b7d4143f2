"""The fused engine against the member-by-member reference: labels, members, saliency, edge cases."""

import logging
import pickle
import threading

import numpy as np
import pytest
import torch
from tiny import LABELS, TINY_ARCH
from torch import nn

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.errors import ConfigError
from speclabel.model.arch import DEFAULT, PAPER, build_network
from speclabel.model.ensemble import NEAR_TIE_FRACTION, Ensemble, InferenceOptions
from speclabel.model.fused import FusedEnsemble, fusable, fusable_ensemble
from speclabel.model.saliency import SaliencyAccumulator
from speclabel.model.scaling import LabelScaler

# Every axis of ArchConfig the fast path must serve: branches, mask channel, channel counts, kernel,
# pooling (none, odd windows with a remainder), dense layers (none, several), the leaky slope (ReLU,
# and a slope above 1, which the network allows).
ARCHS = {
    "tiny": TINY_ARCH,
    "per-arm+mask": TINY_ARCH.replace(arms="per_arm", mask_channel=True),
    "three-layers-pool3": TINY_ARCH.replace(
        conv_channels=(4, 3, 2), kernel_size=3, pool_size=3, leaky_slope=0.1
    ),
    "no-pool-no-hidden": TINY_ARCH.replace(conv_channels=(2,), kernel_size=7, pool_size=1, dense_units=()),
    "two-hidden-relu": TINY_ARCH.replace(dense_units=(6, 4), leaky_slope=0.0, kernel_size=4),
    "one-channel-then-five-steep-slope": TINY_ARCH.replace(
        conv_channels=(1, 5), kernel_size=2, pool_size=4, leaky_slope=1.5
    ),
}


def make_ensemble(setup, arch, n_members=4, *, seed=7, dtype=torch.float32, **inference):
    torch.manual_seed(seed)
    networks = [build_network(arch, setup).to(dtype) for _ in range(n_members)]
    return Ensemble(setup, arch, LabelScaler.fit(LABELS), networks, inference=InferenceOptions(**inference))


def spectra(setup, n, *, seed=1, masked_runs=True):
    """Random flux with scattered masked pixels and, in the first spectrum, long masked runs: the
    continuum there makes exactly equal activations, so max-pool ties must be broken as PyTorch does."""
    rng = np.random.default_rng(seed)
    flux = rng.uniform(0.4, 1.05, (n, setup.n_pixels)).astype(np.float32)
    mask = rng.random(flux.shape) > 0.05
    if masked_runs and n:
        mask[0, 20:45] = False
        mask[0, setup.n_pixels - 30 :] = False
    flux[~mask] = 1.0
    return flux, mask


def assert_matches_reference(ensemble, flux, mask, **kwargs):
    fast = ensemble.predict(flux, mask, members=True, saliency="full", embedding=True, **kwargs)
    ref = ensemble.predict(
        flux, mask, members=True, saliency="full", embedding=True, engine="reference", **kwargs
    )
    span = ensemble.scaler.train_max - ensemble.scaler.train_min
    assert np.all(np.abs(fast.mean - ref.mean) <= 1e-5 * span)
    assert np.all(np.abs(fast.members - ref.members) <= 1e-5 * span)
    assert np.allclose(fast.std, ref.std, rtol=1e-3, atol=1e-5 * span.max())
    assert fast.saliency_maps.shape == ref.saliency_maps.shape == (len(flux), 5, ensemble.setup.n_pixels)
    assert fast.saliency_maps.dtype == ref.saliency_maps.dtype
    for k in range(5):  # per label: Teff gradients are ~1000x those of the abundances
        peak = np.abs(ref.saliency_maps[:, k]).max()
        assert np.abs(fast.saliency_maps[:, k] - ref.saliency_maps[:, k]).max() <= 1e-4 * peak
    assert (fast.saliency_maps[~np.broadcast_to(mask[:, None], fast.saliency_maps.shape)] == 0).all()
    width = ensemble.n_members * ensemble.arch.embedding_units(ensemble.setup)
    assert fast.embedding.shape == ref.embedding.shape == (len(flux), width)
    assert np.abs(fast.embedding - ref.embedding).max() <= 1e-5 * max(np.abs(ref.embedding).max(), 1e-30)
    return fast, ref


@pytest.mark.parametrize("name", list(ARCHS))
def test_fused_matches_reference_on_every_architecture_axis(tiny_setup, name):
    ensemble = make_ensemble(tiny_setup, ARCHS[name], tile=3)
    flux, mask = spectra(tiny_setup, 7)
    # Batches of 4 and 3 through tiles of 3: tiles of 3, 1 and 3.
    assert_matches_reference(ensemble, flux, mask, batch_size=4)
    assert ensemble.fused_engine() is not None  # the fused path ran, not a silent fallback


def test_paper_preset_on_the_giraffe_setup(setup):
    ensemble = make_ensemble(setup, PAPER, n_members=3)
    flux, mask = spectra(setup, 2)
    fast, _ = assert_matches_reference(ensemble, flux, mask)
    assert fast.saliency.shares.shape[:2] == (2, 5)


def test_default_preset_with_a_centred_input_on_the_giraffe_setup(setup):
    # The default measures its input from the training pool's mean spectrum: masked pixels must
    # still read zero, not reference - 1.
    ensemble = make_ensemble(setup, DEFAULT, n_members=3)
    reference = np.random.default_rng(5).uniform(0.7, 1.0, setup.n_pixels)
    for network in ensemble.networks:
        network.set_reference(reference)
    flux, mask = spectra(setup, 3)
    assert_matches_reference(ensemble, flux, mask)
    assert ensemble.fused_engine() is not None


def test_members_with_different_references_are_left_to_the_reference_engine(tiny_setup, caplog):
    ensemble = make_ensemble(tiny_setup, TINY_ARCH.replace(center_input=True), n_members=2)
    ensemble.networks[1].set_reference(np.full(tiny_setup.n_pixels, 0.9))
    assert "different reference spectra" in fusable_ensemble(ensemble.networks)
    flux, mask = spectra(tiny_setup, 3)
    with caplog.at_level(logging.WARNING):
        fast = ensemble.predict(flux, mask, saliency="full")
    assert "different reference spectra" in caplog.text and ensemble.fused_engine() is None
    ref = ensemble.predict(flux, mask, saliency="full", engine="reference")
    assert np.array_equal(fast.mean, ref.mean)


def test_simulated_survey_spectra_agree_up_to_max_pool_near_ties(setup, small_survey):
    """On realistic spectra the continuum makes neighbouring activations close: where the two values
    of a pooling window are equal within float rounding, the engines may pick different (equally
    valid) subgradients. Labels still agree; the saliency agrees except in such small patches."""
    flux, mask = model_inputs(spectra_arrays(small_survey.slice(0, 3), setup), setup)
    ensemble = make_ensemble(setup, PAPER, n_members=2)
    fast = ensemble.predict(flux, mask, saliency="full")
    ref = ensemble.predict(flux, mask, saliency="full", engine="reference")
    span = ensemble.scaler.train_max - ensemble.scaler.train_min
    assert np.all(np.abs(fast.mean - ref.mean) <= 1e-5 * span)
    peak = np.abs(ref.saliency_maps).max(axis=(0, 2))[None, :, None]
    outside = np.abs(fast.saliency_maps - ref.saliency_maps) > 1e-4 * peak
    assert outside.mean() <= NEAR_TIE_FRACTION
    assert np.allclose(fast.saliency.shares, ref.saliency.shares, atol=0.02)


def test_float64_networks_stay_float64_and_match_to_rounding(tiny_setup):
    ensemble = make_ensemble(tiny_setup, ARCHS["per-arm+mask"], dtype=torch.float64)
    flux, mask = spectra(tiny_setup, 3)
    fast, ref = assert_matches_reference(ensemble, flux.astype(np.float64), mask)
    assert fast.saliency_maps.dtype == np.float64
    assert np.allclose(fast.saliency_maps, ref.saliency_maps, rtol=1e-9, atol=1e-12)


def test_batch_of_one_empty_batch_and_no_mask(tiny_setup):
    ensemble = make_ensemble(tiny_setup, TINY_ARCH, tile=4)
    flux, mask = spectra(tiny_setup, 1)
    assert_matches_reference(ensemble, flux, mask)
    empty = ensemble.predict(flux[:0], mask[:0], members=True, saliency="full")
    assert empty.mean.shape == (0, 5) and empty.members.shape == (4, 0, 5)
    assert empty.saliency_maps.shape == (0, 5, tiny_setup.n_pixels)
    flux, _ = spectra(tiny_setup, 5, masked_runs=False)
    fast = ensemble.predict(flux, saliency="full")
    ref = ensemble.predict(flux, saliency="full", engine="reference")
    assert np.allclose(
        fast.saliency_maps, ref.saliency_maps, rtol=1e-4, atol=1e-4 * np.abs(ref.saliency_maps).max()
    )


def test_summary_and_accumulator_come_out_the_same(tiny_setup):
    ensemble = make_ensemble(tiny_setup, TINY_ARCH)
    flux, mask = spectra(tiny_setup, 6)
    sums = {engine: SaliencyAccumulator.empty(5, tiny_setup.n_pixels) for engine in ("fused", "reference")}
    out = {
        engine: ensemble.predict(flux, mask, saliency="summary", accumulator=sums[engine], engine=engine)
        for engine in sums
    }
    assert np.allclose(out["fused"].saliency.shares, out["reference"].saliency.shares, atol=1e-4)
    assert np.array_equal(out["fused"].saliency.peak_wave, out["reference"].saliency.peak_wave)
    assert np.allclose(sums["fused"].mean_abs, sums["reference"].mean_abs, rtol=1e-4, atol=1e-6)
    assert sums["fused"].count == 6


def test_tile_size_does_not_change_the_numbers(tiny_setup):
    flux, mask = spectra(tiny_setup, 9)
    results = []
    for tile in (1, 2, 4, 9):
        ensemble = make_ensemble(tiny_setup, TINY_ARCH, tile=tile)
        results.append(ensemble.predict(flux, mask, saliency="full", batch_size=5))
    for other in results[1:]:
        assert np.allclose(other.mean, results[0].mean, rtol=1e-6)
        assert np.allclose(other.saliency_maps, results[0].saliency_maps, rtol=1e-5, atol=1e-6)


def test_tiles_run_on_several_threads_give_the_same_numbers(tiny_setup):
    """With n torch threads the CPU engine runs n tiles at once, one thread each."""
    ensemble = make_ensemble(tiny_setup, TINY_ARCH, tile=2)
    flux, mask = spectra(tiny_setup, 7)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(ensemble.predict(flux, mask, saliency="full"))
            assert torch.get_num_threads() == n  # restored after the call
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(results[0].mean, results[1].mean)
    assert np.array_equal(results[0].saliency_maps, results[1].saliency_maps)


def test_first_layer_chunking_does_not_change_the_numbers(tiny_setup):
    """CPU engines run the first layer's backward in cache-sized wavelength chunks, GPU engines in
    one piece: both, and chunks of a single position, give the same maps."""
    ensemble = make_ensemble(tiny_setup, ARCHS["per-arm+mask"])
    flux, mask = spectra(tiny_setup, 5)
    x, good, weights = torch.as_tensor(flux), torch.as_tensor(mask), torch.ones(5)
    maps = []
    for chunk_bytes in (1, 2**12, 2**62):
        engine = FusedEnsemble(ensemble.networks, tile=2)
        engine.chunk_bytes = chunk_bytes
        maps.append(engine.run(x, good, weights)[1])
    assert all(torch.allclose(m, maps[0], rtol=1e-5, atol=1e-6) for m in maps[1:])


def test_weights_changed_in_place_rebuild_the_engine(tiny_setup):
    ensemble = make_ensemble(tiny_setup, TINY_ARCH)
    flux, mask = spectra(tiny_setup, 2)
    before = ensemble.predict(flux, mask).mean
    first = ensemble.fused_engine()
    with torch.no_grad():
        ensemble.networks[0].head[-1].bias.add_(1.0)
    after = ensemble.predict(flux, mask).mean
    assert ensemble.fused_engine() is not first
    assert np.allclose(after, ensemble.predict(flux, mask, engine="reference").mean, rtol=1e-6)
    assert not np.allclose(before, after)


def test_unsupported_network_falls_back_to_the_reference(tiny_setup, caplog):
    ensemble = make_ensemble(tiny_setup, TINY_ARCH, n_members=2)
    for network in ensemble.networks:
        network.branches[0][2] = nn.AvgPool1d(2)  # a layer the fused path does not know
    assert "unsupported pooling" in fusable(ensemble.networks[0])
    flux, mask = spectra(tiny_setup, 3)
    with caplog.at_level(logging.WARNING):
        fast = ensemble.predict(flux, mask, saliency="full")
    assert "does not cover" in caplog.text and ensemble.fused_engine() is None
    ref = ensemble.predict(flux, mask, saliency="full", engine="reference")
    assert np.array_equal(fast.mean, ref.mean) and np.array_equal(fast.saliency_maps, ref.saliency_maps)


def test_a_fused_engine_that_disagrees_is_not_used(tiny_setup, caplog, monkeypatch):
    ensemble = make_ensemble(tiny_setup, TINY_ARCH, n_members=2)
    run = FusedEnsemble.run

    def off_by_a_little(self, flux, good=None, label_weights=None, *, embed=False):
        outs, grads, embedding = run(self, flux, good, label_weights, embed=embed)
        return outs + 1e-3, grads, embedding

    monkeypatch.setattr(FusedEnsemble, "run", off_by_a_little)
    flux, mask = spectra(tiny_setup, 3)
    with caplog.at_level(logging.WARNING):
        fast = ensemble.predict(flux, mask)
    assert "disagrees with the reference" in caplog.text and "of its training range" in caplog.text
    assert np.array_equal(fast.mean, ensemble.predict(flux, mask, engine="reference").mean)


def test_bf16_is_used_only_within_its_tolerance(tiny_setup):
    flux, mask = spectra(tiny_setup, 4)
    loose = make_ensemble(
        tiny_setup, TINY_ARCH, precision="bf16", label_tolerance=0.2, saliency_tolerance=0.5
    )
    labels = loose.predict(flux, mask).mean
    assert loose.fused_engine().precision == "bf16"
    exact = loose.predict(flux, mask, engine="reference").mean
    span = loose.scaler.train_max - loose.scaler.train_min
    assert np.abs(labels - exact).max() > 0  # bf16 really ran
    assert np.all(np.abs(labels - exact) <= 0.2 * span)
    strict = make_ensemble(tiny_setup, TINY_ARCH, precision="bf16", label_tolerance=1e-9)
    with pytest.raises(ConfigError, match="check 'precision'"):
        strict.predict(flux, mask)
    auto = make_ensemble(tiny_setup, TINY_ARCH, precision="auto")
    auto.predict(flux, mask)
    assert auto.fused_engine().precision == "float32"  # no reduced precision is tried on a CPU


def test_an_enclosing_bf16_autocast_selects_the_bf16_engine(tiny_setup):
    """As the reference engine would compute in bf16 under torch.autocast, so does the fused one."""
    ensemble = make_ensemble(tiny_setup, TINY_ARCH)
    flux, mask = spectra(tiny_setup, 4)
    exact = ensemble.predict(flux, mask).mean
    float32_engine = ensemble.fused_engine()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reduced = ensemble.predict(flux, mask).mean
        assert ensemble.fused_engine().precision == "bf16"
    span = ensemble.scaler.train_max - ensemble.scaler.train_min
    assert 0 < np.abs(reduced - exact).max() and np.all(np.abs(reduced - exact) <= 0.2 * span)
    assert np.array_equal(ensemble.predict(flux, mask).mean, exact)
    assert ensemble.fused_engine() is float32_engine  # kept, not rebuilt and checked again


def test_inference_options_are_checked():
    with pytest.raises(ConfigError, match="engine"):
        InferenceOptions(engine="fast")
    with pytest.raises(ConfigError, match="precision"):
        InferenceOptions(precision="fp8")
    with pytest.raises(ConfigError, match="needs the fused engine"):
        InferenceOptions(engine="reference", precision="bf16")
    with pytest.raises(ConfigError, match="tile"):
        InferenceOptions(tile=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            InferenceOptions(device="cuda")
        with pytest.raises(ConfigError, match="tf32"):
            FusedEnsemble([build_network(TINY_ARCH, _two_arm())], precision="tf32")


def test_threads_sharing_one_engine_get_their_own_buffers(tiny_setup):
    ensemble = make_ensemble(tiny_setup, TINY_ARCH, tile=2)
    engine = ensemble.fused_engine()
    flux, mask = spectra(tiny_setup, 6)
    x, good = torch.as_tensor(flux), torch.as_tensor(mask)
    weights = torch.ones(5)
    expected = engine.run(x, good, weights)[1]
    results = [None] * 4

    def work(i):
        for _ in range(5):
            results[i] = engine.run(x, good, weights)[1]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(r, expected) for r in results)


def test_ensembles_and_engines_pickle_as_ray_ships_them(tiny_setup):
    ensemble = make_ensemble(tiny_setup, TINY_ARCH)
    flux, mask = spectra(tiny_setup, 3)
    before = ensemble.predict(flux, mask, saliency="full")
    engine = ensemble.fused_engine()
    copy = pickle.loads(pickle.dumps(ensemble))
    after = copy.predict(flux, mask, saliency="full")
    assert np.array_equal(before.mean, after.mean)
    assert np.array_equal(before.saliency_maps, after.saliency_maps)
    engine_copy = pickle.loads(pickle.dumps(engine))
    x, good = torch.as_tensor(flux), torch.as_tensor(mask)
    assert torch.equal(engine_copy.run(x, good, torch.ones(5))[1], engine.run(x, good, torch.ones(5))[1])


def _two_arm():
    from speclabel.core.setups import Setup

    arm = {"wave_step": 0.5, "n_pixels": 40, "resolution": 5000.0}
    return Setup.from_dict(
        {
            "name": "two",
            "arms": [{"name": "a", "wave_start": 5000.0, **arm}, {"name": "b", "wave_start": 8000.0, **arm}],
        }
    )


@pytest.mark.parametrize("name", ["tiny", "no-pool-no-hidden", "two-hidden-relu"])
def test_the_embedding_is_what_each_output_layer_reads(tiny_setup, name):
    """Each member's output layer applied to its slice of the embedding gives that member's labels."""
    ensemble = make_ensemble(tiny_setup, ARCHS[name], n_members=3)
    flux, mask = spectra(tiny_setup, 5)
    prediction = ensemble.predict(flux, mask, members=True, embedding=True)
    units = ensemble.arch.embedding_units(tiny_setup)
    for m, network in enumerate(ensemble.networks):
        output = network.head[-1]
        part = prediction.embedding[:, m * units : (m + 1) * units].astype(np.float64)
        scaled = part @ output.weight.double().numpy().T + output.bias.double().numpy()
        assert np.allclose(ensemble.scaler.inverse(scaled), prediction.members[m], rtol=1e-5, atol=1e-3)


def test_a_fused_engine_with_a_wrong_embedding_is_not_used(tiny_setup, caplog, monkeypatch):
    ensemble = make_ensemble(tiny_setup, TINY_ARCH, n_members=2)
    run = FusedEnsemble.run

    def shifted_embedding(self, flux, good=None, label_weights=None, *, embed=False):
        outs, grads, embedding = run(self, flux, good, label_weights, embed=embed)
        return outs, grads, None if embedding is None else embedding * 1.01

    monkeypatch.setattr(FusedEnsemble, "run", shifted_embedding)
    with caplog.at_level(logging.WARNING):
        ensemble.predict(*spectra(tiny_setup, 3))
    assert "penultimate layer off by" in caplog.text and ensemble.fused_engine() is None
