"""The ONNX export: the graph run with onnxruntime against Ensemble.predict, masking done inside the
graph, metadata, the check that refuses a graph that disagrees, and `speclabel export`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.jobs.cli import main
from speclabel.jobs.commands import export as export_command
from speclabel.model import export_onnx
from speclabel.model.arch import ArchConfig, build_network
from speclabel.model.ensemble import Ensemble
from speclabel.model.fit import EnsembleConfig, fit_ensemble, prepare_arrays
from speclabel.model.io import load_model, save_model
from speclabel.model.scaling import LabelScaler
from speclabel.model.splits import SplitRule
from speclabel.model.training import TrainConfig

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

# Per arm, centred input and a mask channel: every path of the network's input handling.
ARCH = ArchConfig(
    name="tiny-centred",
    conv_channels=(3, 2),
    kernel_size=5,
    pool_size=8,
    dense_units=(8,),
    dropout=0.1,
    arms="per_arm",
    mask_channel=True,
    center_input=True,
)
MATCH = 1e-5  # of each label's training range: float32 graph against the float64-reduced reference


@pytest.fixture(scope="module")
def trained_model(small_survey, setup, tmp_path_factory):
    """A 3-member ensemble trained for 2 epochs on the 40-row survey and saved."""
    arrays = prepare_arrays(small_survey, setup)
    ensemble = fit_ensemble(
        arrays,
        setup,
        ARCH,
        TrainConfig(epochs=2, batch_size=8),
        EnsembleConfig(n_members=3, split=SplitRule(test_fraction=0.2, val_fraction=0.25)),
        data={"location": "small_survey"},
    )
    folder = tmp_path_factory.mktemp("export") / "model"
    save_model(ensemble, str(folder))
    return str(folder)


def survey_inputs(table, setup):
    """``(raw flux with garbage, good from ivar only, model_inputs flux, model_inputs mask)``.

    The graph gets the raw flux with NaN, inf and huge values at masked pixels and a NaN at one
    pixel whose ivar says it is good; the reference gets what core.arrays.model_inputs makes of it."""
    arrays = spectra_arrays(table, setup)
    raw, ivar = arrays.concatenated(setup)
    raw = raw.copy()
    rng = np.random.default_rng(3)
    masked = ivar <= 0
    masked[:, :30] |= rng.random((raw.shape[0], 30)) < 0.5  # more masked pixels than the simulator's
    masked[:10, 5000:5400] = True  # and a masked run (a bad column, a telluric band)
    ivar = np.where(masked, 0.0, ivar).astype(np.float32)
    garbage = rng.choice(np.array([np.nan, np.inf, -np.inf, 3e38, -50.0], np.float32), size=raw.shape)
    raw = np.where(masked, garbage, raw)
    raw[4, 100] = np.nan  # a pixel ivar calls good: model_inputs masks non-finite flux too
    assert ivar[4, 100] > 0
    arrays.flux = {a.name: raw[:, s] for a, s in zip(setup.arms, setup.arm_slices.values(), strict=True)}
    arrays.ivar = {a.name: ivar[:, s] for a, s in zip(setup.arms, setup.arm_slices.values(), strict=True)}
    flux, mask = model_inputs(arrays, setup)
    assert not mask[4, 100] and mask.mean() < 0.995
    return raw, ivar > 0, flux, mask, ivar


def run_graph(path_or_bytes, flux, good):
    session = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return session, dict(zip(names, session.run(None, {"flux": flux, "good": good}), strict=True))


def assert_matches(got: dict, want, scaler: LabelScaler, tolerance: float = MATCH):
    span = scaler.train_max - scaler.train_min
    for name in ("mean", "std"):
        assert got[name].shape == getattr(want, name).shape
        assert np.abs(got[name] - getattr(want, name)).max(axis=0) / span == pytest.approx(0, abs=tolerance)
    assert got["members"].shape == want.members.shape
    assert (np.abs(got["members"] - want.members).max(axis=(0, 1)) / span).max() <= tolerance
    assert ("aleatoric" in got) == (want.aleatoric is not None)
    if want.aleatoric is not None:
        assert np.abs(got["aleatoric"] - want.aleatoric).max(axis=0) / span == pytest.approx(0, abs=tolerance)


def test_cli_export_matches_predict_with_garbage_in_masked_pixels(
    trained_model, small_survey, setup, tmp_path, capsys
):
    out = tmp_path / "model.onnx"
    assert main(["export", trained_model, "--format", "onnx", "--out", str(out)]) == 0
    ensemble = load_model(trained_model)
    message = capsys.readouterr().out
    assert f"model {ensemble.model_id}" in message and str(out) in message

    raw, good, flux, mask, _ = survey_inputs(small_survey, setup)
    session, got = run_graph(str(out), raw, good)
    want = ensemble.predict(flux, mask, members=True)
    assert np.isfinite(got["mean"]).all() and np.isfinite(got["std"]).all()
    assert_matches(got, want, ensemble.scaler)
    # The std is the sample std over members, computed here from the graph's own members.
    np.testing.assert_allclose(got["std"], got["members"].std(axis=0, ddof=1), rtol=1e-4, atol=1e-6)
    # Any batch size, including one spectrum.
    _, one = run_graph(str(out), raw[7:8], good[7:8])
    np.testing.assert_allclose(one["mean"], got["mean"][7:8], rtol=1e-6)

    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert inputs == {
        "flux": ("tensor(float)", ["n_spectra", setup.n_pixels]),
        "good": ("tensor(bool)", ["n_spectra", setup.n_pixels]),
    }
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["model_id"] == ensemble.model_id
    assert json.loads(meta["labels"]) == list(ensemble.label_names)
    assert json.loads(meta["setup"]) == ensemble.setup.to_dict()
    assert meta["n_members"] == "3" and meta["std_ddof"] == "1" and meta["good_dtype"] == "bool"
    assert json.loads(meta["label_training_ranges"])["teff"] == [
        ensemble.scaler.train_min[0],
        ensemble.scaler.train_max[0],
    ]


def test_float_good_takes_an_inverse_variance(trained_model, small_survey, setup, tmp_path):
    out = tmp_path / "model.onnx"
    assert main(["export", trained_model, "--out", str(out), "--good-type", "float32"]) == 0
    raw, _, flux, mask, ivar = survey_inputs(small_survey, setup)
    _, got = run_graph(str(out), raw, ivar)  # > 0 is usable
    ensemble = load_model(trained_model)
    assert_matches(got, ensemble.predict(flux, mask, members=True), ensemble.scaler)


@pytest.mark.parametrize(
    "arch",
    [
        ArchConfig(name="joined", conv_channels=(3,), kernel_size=7, pool_size=4, dense_units=(6, 4)),
        ArchConfig(
            name="per-arm-centred",
            conv_channels=(2, 2),
            kernel_size=5,
            pool_size=2,
            arms="per_arm",
            center_input=True,
        ),
        ArchConfig(name="variance-head", conv_channels=(3,), kernel_size=7, pool_size=4, variance_head=True),
    ],
    ids=lambda a: a.name,
)
def test_architectures_and_float64_networks(arch, tiny_setup):
    """Untrained networks with a non-trivial reference, held in float64 by the caller."""
    rng = np.random.default_rng(0)
    labels = rng.normal([5000, 3, -0.5, 0.1, 0.0], [500, 1, 0.5, 0.1, 0.1], (30, 5))
    torch.manual_seed(1)
    networks = [build_network(arch, tiny_setup) for _ in range(4)]
    for network in networks:
        network.set_reference(rng.uniform(0.7, 1.0, tiny_setup.n_pixels))
        network.double()
    ensemble = Ensemble(tiny_setup, arch, LabelScaler.fit(labels), networks)
    graph, check = export_onnx.export_onnx(ensemble)
    assert check.passed and check.worst < MATCH
    flux, good, clean = export_onnx.probe_spectra(ensemble, n=5, seed=9)
    _, got = run_graph(graph, flux, good)
    assert_matches(got, ensemble.predict(clean, good, members=True), ensemble.scaler)
    assert ensemble.dtype == torch.float64  # the export copied the networks, not converted them


def test_single_member_std_is_nan(tiny_setup):
    rng = np.random.default_rng(0)
    arch = ArchConfig(name="one", conv_channels=(2,), kernel_size=5, pool_size=4)
    ensemble = Ensemble(
        tiny_setup, arch, LabelScaler.fit(rng.normal(size=(10, 5))), [build_network(arch, tiny_setup)]
    )
    graph, _ = export_onnx.export_onnx(ensemble)
    flux, good, clean = export_onnx.probe_spectra(ensemble, n=3)
    _, got = run_graph(graph, flux, good)
    assert np.isnan(got["std"]).all() and np.isnan(ensemble.predict(clean, good).std).all()
    assert got["members"].shape == (1, 3, 5)


class Perturbed(torch.nn.Module):
    """The exported graph with the mean of one label off by 1e-3 of its training range."""

    def __init__(self, graph, shift):
        super().__init__()
        self.graph = graph
        self.register_buffer("shift", shift)

    def forward(self, flux, good):
        mean, std, members = self.graph(flux, good)
        return mean + self.shift, std, members


def test_refuses_a_graph_that_disagrees(trained_model, tmp_path, monkeypatch, capsys):
    real = export_onnx.ensemble_graph

    def perturbed(ensemble, good_dtype):
        span = ensemble.scaler.train_max - ensemble.scaler.train_min
        shift = torch.zeros(len(span))
        shift[2] = float(1e-3 * span[2])
        return Perturbed(real(ensemble, good_dtype), shift)

    monkeypatch.setattr(export_onnx, "ensemble_graph", perturbed)
    out = tmp_path / "model.onnx"
    assert main(["export", trained_model, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (
        "check 'ONNX matches PyTorch'" in err
        and "mean feh off by 0.001" in err
        and "nothing was written" in err
    )
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_and_missing_extra(trained_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    assert main(["export", trained_model, "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"old"
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    assert main(["export", trained_model, "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "needs the 'onnxruntime' package" in err and "pip install 'speclabel[export]'" in err
    assert out.read_bytes() == b"old"


def test_command_choices_are_the_module_s():
    assert export_command.GOOD_TYPES == export_onnx.GOOD_DTYPES
