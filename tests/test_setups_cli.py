"""`speclabel setups` against the TOML files, and each new setup end to end on simulated spectra:
simulate FITS (+ label catalogue) -> ingest -> label with a tiny model trained on that setup -> query."""

import json
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from tiny import TINY_ARCH

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.setups import available_setups, get_setup
from speclabel.jobs.cli import main
from speclabel.model.fit import EnsembleConfig, fit_ensemble, prepare_arrays
from speclabel.model.io import save_model
from speclabel.model.splits import SplitRule
from speclabel.model.training import TrainConfig
from speclabel.pipeline.catalogue.layout import saliency_column
from speclabel.pipeline.labelling import LabelOptions, label_spectra
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk

SHIPPED = Path(__file__).resolve().parents[1] / "core" / "setups"


def _toml(name: str) -> dict:
    return tomllib.loads((SHIPPED / f"{name}.toml").read_text())


def test_the_table_lists_every_arm_of_every_toml_file(capsys):
    assert main(["setups"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["setup", "arm", "from", "to", "step", "pixels", "R", "medium"]
    rows = {(p[0], p[1]): p[2:] for p in (line.split() for line in lines[1:]) if len(p) == 8}
    files = sorted(p.stem for p in SHIPPED.glob("*.toml"))
    assert files == available_setups() and {"giraffe-hr15n", "4most-hrs"} <= set(files)
    for name in files:
        raw = _toml(name)
        for arm in raw["arms"]:
            end = arm["wave_start"] + arm["wave_step"] * (arm["n_pixels"] - 1)
            assert rows[(name, arm["name"])] == [
                f"{arm['wave_start']:.2f}",
                f"{end:.2f}",
                f"{arm['wave_step']:g}",
                str(arm["n_pixels"]),
                f"{arm['resolution']:.0f}",
                raw["medium"],
            ]
        total = [line.split() for line in lines if line.startswith(f"{name} ") and "(all)" in line]
        if len(raw["arms"]) > 1:
            assert total[0][2] == str(sum(a["n_pixels"] for a in raw["arms"]))
    assert "4most-hrs          (all)" in "\n".join(lines)


def test_json_names_the_arms_windows_and_label_lines(capsys, tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text(
        'name = "mine"\n[[arms]]\nname = "b"\nwave_start = 5000.0\nwave_step = 0.1\n'
        "n_pixels = 11\nresolution = 5000.0\n"
    )
    assert main(["setups", "giraffe-hr15n", str(mine), "--json"]) == 0
    hr15n, own = json.loads(capsys.readouterr().out)
    raw = _toml("giraffe-hr15n")
    assert hr15n["name"] == "giraffe-hr15n" and hr15n["n_pixels"] == 7441
    assert hr15n["arms"] == [
        {**arm, "wave_end": pytest.approx(arm["wave_start"] + arm["wave_step"] * (arm["n_pixels"] - 1))}
        for arm in raw["arms"]
    ]
    assert hr15n["line_groups"] == list(raw["line_windows"]) and hr15n["label_lines"] == raw["label_lines"]
    assert own["name"] == "mine" and own["arms"][0]["wave_end"] == pytest.approx(5001.0)
    assert main(["setups", "no-such-setup"]) == 1


def _tiny_model(setup):
    """A tiny two-member ensemble trained for one epoch on 24 simulated spectra of ``setup``."""
    train = simulate_chunk(setup, SurveyConfig(n=24, seed=7, chunk_size=24), 0)
    return fit_ensemble(
        prepare_arrays(train, setup),
        setup,
        TINY_ARCH,
        TrainConfig(epochs=1, batch_size=8),
        EnsembleConfig(n_members=2, split=SplitRule(test_fraction=0.2, val_fraction=0.25)),
        data={"location": "simulated"},
    )


@pytest.mark.parametrize("name", ["giraffe-hr15n", "4most-hrs"])
def test_fits_of_a_new_setup_come_back_on_its_grid_and_a_tiny_model_labels_them(tmp_path, name):
    """Ingest's per-star science (no Ray): each arm's file found by its SETUP header, shifted to the
    rest frame and resampled onto the setup's grid; then a tiny model of the setup labels the rows."""
    from speclabel.pipeline.ingest.options import IngestOptions
    from speclabel.pipeline.ingest.prepare import assemble_star, star_table

    setup = get_setup(name)
    sim = tmp_path / "sim"
    simulate = ["simulate", "--n", "4", "--format", "fits", "--out", str(sim), "--setup", name, "--seed", "5"]
    assert main([*simulate, "--workers", "1"]) == 0
    survey = simulate_chunk(setup, SurveyConfig(n=4, seed=5), 0)
    options = IngestOptions(release="SIM")
    stars = []
    for row in survey.to_pylist():
        files = [
            (str(f), f.read_bytes()) for f in sorted((sim / "spectra").rglob(f"{row['spectrum_id']}_*.fits"))
        ]
        assert len(files) == len(setup.arms)
        star = assemble_star(row["object"], files, setup, options)
        assert star.quarantine == [] and sorted(star.arms) == sorted(a.name for a in setup.arms)
        stars.append(star)
        for arm in setup.arms:
            flux, ivar = np.array(row[arm.flux_column]), np.array(row[arm.ivar_column])
            good = ivar > 0
            np.testing.assert_array_equal(star.arms[arm.name].ivar > 0, good)
            np.testing.assert_allclose(star.arms[arm.name].flux[good], flux[good], rtol=1e-5, atol=1e-6)
    table = star_table(stars, setup)
    ensemble = _tiny_model(setup)
    flux, mask = model_inputs(spectra_arrays(table, setup), setup)
    labels = ensemble.predict(flux, mask, saliency="summary")
    assert labels.mean.shape == (4, len(ensemble.label_names)) and np.isfinite(labels.mean).all()


@pytest.mark.ray
@pytest.mark.parametrize("name", ["giraffe-hr15n", "4most-hrs"])
def test_a_new_setup_end_to_end(ray_session, tmp_path, capsys, name):
    setup = get_setup(name)
    sim, store, catalogue = tmp_path / "sim", tmp_path / "store", tmp_path / "cat"
    ges = tmp_path / "ges.fits"
    simulate = ["simulate", "--n", "10", "--chunk-size", "5", "--format", "fits", "--out", str(sim)]
    simulate += ["--setup", name, "--seed", "2", "--workers", "1", "--label-catalogue", str(ges)]
    assert main(simulate) == 0
    assert len(list((sim / "spectra").rglob("*.fits"))) == 10 * len(setup.arms)
    ingest = ["ingest", str(sim / "spectra"), "--out", str(store), "--release", "SIM", "--setup", name]
    assert main(ingest) == 0
    stored = pads.dataset(str(store), partitioning="hive").to_table()
    truth = pq.read_table(sim / "labels.parquet")
    assert sorted(stored.column("spectrum_id").to_pylist()) == sorted(truth.column("spectrum_id").to_pylist())
    for arm in setup.arms:
        assert stored.schema.field(arm.flux_column).type.list_size == arm.n_pixels

    ensemble = _tiny_model(setup)
    save_model(ensemble, str(tmp_path / "model"))
    result = label_spectra(
        str(store), str(tmp_path / "model"), str(catalogue), LabelOptions(batch_size=8, progress=False)
    )
    assert result.labelled == 10 and sum(result.quarantined.values()) == 0

    out = tmp_path / "rows.parquet"
    assert main(["query", str(catalogue), "--where", "teff > 0", "--out", str(out)]) == 0
    rows = pq.read_table(out)
    assert sorted(rows.column("spectrum_id").to_pylist()) == sorted(truth.column("spectrum_id").to_pylist())
    # The label catalogue joins to the labelled rows by CNAME = spectrum_id.
    from astropy.table import Table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy does not parse "dex" as a unit
        cnames = set(Table.read(ges)["CNAME"])
    assert cnames == set(rows.column("spectrum_id").to_pylist())
    # Saliency summaries over this setup's window groups; the groups share no pixel, so the
    # shares of one label add up to at most 1.
    for label in ensemble.label_names:
        assert np.isfinite(rows.column(label).to_numpy()).all()
        shares = sum(rows.column(saliency_column(label, g)).to_numpy() for g in setup.line_windows)
        assert (shares <= 1.0 + 1e-5).all() and (shares > 0).all(), label
