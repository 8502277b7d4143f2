"""The model directory: round trip, model_id, and every integrity check on load."""

import json
import os

import numpy as np
import pytest
import torch
from tiny import LABELS, TINY_ARCH

from speclabel.core import storage
from speclabel.core.errors import IntegrityError, SpeclabelError
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import Setup
from speclabel.model import io
from speclabel.model.arch import build_network
from speclabel.model.calibration import ErrorCalibration, LabelErrorModel
from speclabel.model.ensemble import Ensemble
from speclabel.model.refine import ReferenceLibrary, RefineConfig, Refinement
from speclabel.model.scaling import LabelScaler

ARCH = TINY_ARCH.replace(dropout=0.1)


@pytest.fixture
def ensemble(tiny_setup):
    torch.manual_seed(7)
    networks = [build_network(ARCH, tiny_setup) for _ in range(3)]
    return Ensemble(
        tiny_setup,
        ARCH,
        LabelScaler.fit(LABELS, "minmax"),
        networks,
        member_info=[{"seed": s, "val_loss": 0.1 * s} for s in range(3)],
        info={"training": {"data": {"location": "x.parquet", "fingerprint": "abc"}}, "metrics": {"test": {}}},
    )


@pytest.fixture
def saved(ensemble, tmp_path):
    path = tmp_path / "model"
    model_id = io.save_model(ensemble, str(path))
    return path, model_id


def test_round_trip_gives_identical_predictions(ensemble, saved, tiny_setup):
    path, model_id = saved
    assert sorted(os.listdir(path)) == ["members", "model.json"]
    assert sorted(os.listdir(path / "members")) == [f"member-{i}.safetensors" for i in range(3)]
    assert not [p for p in os.listdir(path.parent) if p.startswith(".")]  # no staging left behind
    loaded = io.load_model(str(path), setup=tiny_setup)
    assert loaded.model_id == model_id == ensemble.model_id and len(model_id) == 16
    assert loaded.arch == ARCH and loaded.setup == tiny_setup
    assert loaded.scaler.to_dict() == ensemble.scaler.to_dict()
    assert loaded.member_info == [{"seed": s, "val_loss": 0.1 * s} for s in range(3)]
    assert loaded.info["training"]["data"]["fingerprint"] == "abc"
    flux = np.random.default_rng(0).uniform(0.6, 1.0, (4, tiny_setup.n_pixels)).astype(np.float32)
    a = ensemble.predict(flux, members=True)
    b = loaded.predict(flux, members=True)
    assert np.array_equal(a.members, b.members)
    document = json.loads((path / "model.json").read_text())
    assert document["setup"] == tiny_setup.to_dict() and document["std_ddof"] == 1
    assert document["model_id"] == io.compute_model_id(document)
    assert all(len(m["sha256"]) == 64 for m in document["members"])


def test_existing_model_is_not_overwritten_unless_asked(ensemble, saved):
    path, model_id = saved
    with pytest.raises(SpeclabelError, match="already exists"):
        io.save_model(ensemble, str(path))
    ensemble.networks[0].head[-1].bias.data += 1.0
    new_id = io.save_model(ensemble, str(path), overwrite=True)
    assert new_id != model_id and io.load_model(str(path)).model_id == new_id


def _flip_a_byte(path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_weight_file_is_detected(saved):
    path, _ = saved
    _flip_a_byte(path / "members" / "member-1.safetensors")
    with pytest.raises(IntegrityError, match=r"check 'weight sha256'.*member-1"):
        io.load_model(str(path))


def test_edited_model_json_is_detected(saved):
    path, _ = saved
    document = json.loads((path / "model.json").read_text())
    document["scaling"]["labels"]["teff"]["scale"] *= 1.01
    (path / "model.json").write_text(json.dumps(document))
    with pytest.raises(IntegrityError, match="check 'model_id'"):
        io.load_model(str(path))


def test_edited_hashes_and_weights_together_are_still_detected(saved):
    """Someone who replaces a weight file and updates its sha256 must also forge the model_id."""
    path, _ = saved
    weight = path / "members" / "member-0.safetensors"
    (path / "members" / "member-0.safetensors").write_bytes(
        (path / "members" / "member-2.safetensors").read_bytes()
    )
    document = json.loads((path / "model.json").read_text())
    import hashlib

    document["members"][0]["sha256"] = hashlib.sha256(weight.read_bytes()).hexdigest()
    (path / "model.json").write_text(json.dumps(document))
    with pytest.raises(IntegrityError, match="check 'model_id'"):
        io.load_model(str(path))


def test_wrong_setup_stray_files_and_missing_model_are_refused(saved, setup, tmp_path):
    path, _ = saved
    with pytest.raises(IntegrityError, match=r"check 'setup'.*tiny-two-arm.*giraffe-hr10-hr21"):
        io.load_model(str(path), setup=setup)
    shifted = Setup.from_dict({**io.read_model_document(str(path))["setup"]})
    shifted = Setup.from_dict(
        {
            **shifted.to_dict(),
            "arms": [{**a, "wave_start": a["wave_start"] + 0.1} for a in shifted.to_dict()["arms"]],
        }
    )
    with pytest.raises(IntegrityError, match="check 'setup'"):
        io.load_model(str(path), setup=shifted)
    (path / "members" / "member-3.safetensors").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="check 'member files'"):
        io.load_model(str(path))
    with pytest.raises(IntegrityError, match=r"check 'model\.json present'"):
        io.load_model(str(tmp_path / "nothing-here"))


def test_weights_that_do_not_fit_the_architecture_are_refused(ensemble, tiny_setup, tmp_path):
    """A forged model: consistent hashes and id, but weights of another shape."""
    path = tmp_path / "forged"
    io.save_model(ensemble, str(path))
    other = build_network(ARCH.replace(dense_units=(4,)), tiny_setup)
    data = io.member_bytes(other, 0)
    (path / "members" / "member-0.safetensors").write_bytes(data)
    document = json.loads((path / "model.json").read_text())
    import hashlib

    document["members"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    document["model_id"] = io.compute_model_id(document)
    (path / "model.json").write_text(json.dumps(document))
    with pytest.raises(IntegrityError, match="check 'weights fit architecture'"):
        io.load_model(str(path))


def test_a_crash_while_saving_leaves_no_model(ensemble, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "rename", fail)  # the folder write of pipeline.storage
    with pytest.raises(OSError, match="disk full"):
        io.save_model(ensemble, str(tmp_path / "model"))
    assert os.listdir(tmp_path) == []


def test_reference_spectra_round_trip_and_are_checked(ensemble, tiny_setup, tmp_path):
    rng = np.random.default_rng(2)
    labels = LABELS[rng.integers(0, len(LABELS), 30)] + rng.normal(0, 0.01, (30, 5))
    flux = rng.random((30, tiny_setup.n_pixels)).astype(np.float32)
    mask = rng.random(flux.shape) > 0.1
    calibration = ErrorCalibration(
        LABEL_NAMES, {n: LabelErrorModel(a=1.5, b=0.0, c=0.1, prior_width=1.0) for n in LABEL_NAMES}, False
    )
    config = RefineConfig(prior_width=(50.0, 0.1, 0.05, 0.03, 0.06), neighbours=25, kept=("teff", "feh"))
    ensemble.refinement = Refinement(
        ReferenceLibrary(labels, flux, mask, tiny_setup), config, {"rows_read": 30}, calibration
    )
    path = tmp_path / "refined"
    model_id = io.save_model(ensemble, str(path))
    document = json.loads((path / "model.json").read_text())
    assert document["refine"]["file"] == "refine/reference.safetensors"
    assert (
        document["refine"]["config"]["kept"] == ["teff", "feh"] and document["refine"]["reference_rows"] == 30
    )
    loaded = io.load_model(str(path))
    assert loaded.model_id == model_id
    stored = loaded.refinement
    assert np.array_equal(stored.library.labels, labels) and np.array_equal(stored.library.flux, flux)
    assert np.array_equal(stored.library.mask, mask)
    # Stored as narrowed to the model: tiny_setup names no Mg or Al lines, so no own-lines fit.
    assert stored.config == ensemble.refinement.config and stored.config.own_lines == ()
    assert stored.config.kept == config.kept and stored.source == {"rows_read": 30}
    assert stored.calibration.to_dict() == calibration.to_dict()
    # A changed library is caught by its sha256, like a member's weights.
    _flip_a_byte(path / "refine" / "reference.safetensors", -5)
    with pytest.raises(IntegrityError, match=r"check 'reference spectra sha256'"):
        io.load_model(str(path))
