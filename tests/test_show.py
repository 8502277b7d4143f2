"""`speclabel show`: one star of a catalogue against its model, without Ray (the catalogue is written
with the catalogue writer, its run manifest recording the model and the spectra as the label job does)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from forward_data import WINDOW_SETUP, survey, window_forward_model
from label_data import tiny_ensemble

from speclabel.core.errors import InputError, IntegrityError
from speclabel.core.flags import Flag
from speclabel.core.labels import LABEL_NAMES
from speclabel.jobs.cli import main
from speclabel.model.io import save_model
from speclabel.pipeline.catalogue import write_release
from speclabel.pipeline.evaluation.show import figure, star_view
from speclabel.pipeline.publish import Dataset
from speclabel.pipeline.simulate.catalogue import SyntheticCatalogue, synthetic_label_rows

RUN_ID = "run-show"
N = 6


def _model(folder, forward: bool) -> str:
    ensemble = tiny_ensemble(WINDOW_SETUP)
    ensemble.forward = window_forward_model() if forward else None
    save_model(ensemble, str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    """Six simulated stars on the window setup, their spectra file, a model with a forward model and
    one without, and a catalogue of their rows (true labels plus an offset, chi2 columns, flags,
    full saliency maps for the first two)."""
    root = tmp_path_factory.mktemp("show")
    spectra, _ = survey(N, 7)
    spectra_path = root / "spectra.parquet"
    pq.write_table(spectra, spectra_path)
    model = _model(root / "model", forward=True)
    from speclabel.model.io import read_model_document

    model_id = read_model_document(model)["model_id"]
    config = SyntheticCatalogue(release="DR1", model_id=model_id, run_id=RUN_ID, n_members=0)
    rows = synthetic_label_rows(WINDOW_SETUP, config, 0, N)
    rows = rows.set_column(0, "spectrum_id", spectra.column("spectrum_id"))
    for name in LABEL_NAMES:
        truth = spectra.column(name).to_numpy()
        offset = pa.array((truth * 1.01).astype(np.float32))
        rows = rows.set_column(rows.schema.get_field_index(name), name, offset)
    flags = np.array([Flag.ANOMALOUS_SPECTRUM | Flag.LOW_SNR] + [0] * (N - 1), np.int32)
    rows = rows.set_column(rows.schema.get_field_index("flags"), "flags", pa.array(flags))
    for column in ("chi2", *(f"chi2_{a.name}" for a in WINDOW_SETUP.arms)):
        rows = rows.append_column(column, pa.array(np.linspace(0.9, 3.0, N).astype(np.float32)))
    manifest = {
        "job": "label",
        "model": {"location": model, "model_id": model_id, "setup": WINDOW_SETUP.name},
        "input": {"location": str(spectra_path)},
    }
    catalogue = root / "cat"
    write_release(str(catalogue), "DR1", [rows], model_id=model_id, run_id=RUN_ID, manifest=manifest)
    # DR2: the same stars labelled by a model without a forward model (no chi2 then).
    bare = _model(root / "bare", forward=False)
    bare_id = read_model_document(bare)["model_id"]
    bare_rows = rows.drop_columns([c for c in rows.column_names if c.startswith("chi2")])
    where = bare_rows.schema.get_field_index("model_id")
    bare_rows = bare_rows.set_column(where, "model_id", pa.array([bare_id] * N))
    bare_manifest = {**manifest, "model": {"location": bare, "model_id": bare_id}}
    write_release(str(catalogue), "DR2", [bare_rows], model_id=bare_id, manifest=bare_manifest)
    maps = np.random.default_rng(3).standard_normal((2, WINDOW_SETUP.n_pixels)).astype(np.float32)
    side = Dataset.open(str(catalogue)).side_dir("_saliency", "DR1", RUN_ID)
    import pathlib

    pathlib.Path(side).mkdir(parents=True)
    saliency = {"spectrum_id": spectra.column("spectrum_id").slice(0, 2)}
    saliency |= {f"saliency_{name}": pa.array(list(maps), pa.list_(pa.float32())) for name in LABEL_NAMES}
    pq.write_table(pa.table(saliency), f"{side}/part-0.parquet")
    return {
        "root": root,
        "catalogue": str(catalogue),
        "spectra": spectra,
        "spectra_path": str(spectra_path),
        "model": model,
        "bare": bare,
        "rows": rows,
        "maps": maps,
    }


def _axes_lines(fig):
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


def test_show_writes_a_png_of_spectrum_model_residual_and_saliency(star, tmp_path, capsys):
    first = star["spectra"].column("spectrum_id")[0].as_py()
    out = tmp_path / "star.png"
    assert main(["show", star["catalogue"], first, "--release", "DR1", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(out.read_bytes()), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 500 and pixels.std() > 0.05

    view = star_view(star["catalogue"], first, release="DR1")
    assert view.panels == ("flux", "residual", "saliency")
    fig = figure(view)
    assert len(fig.axes) == len(WINDOW_SETUP.arms) * 3
    row = star["rows"].slice(0, 1).to_pylist()[0]
    labels = np.array([[row[n] for n in LABEL_NAMES]])
    expected = window_forward_model().flux(labels)[0]
    model_lines = [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == "model"]
    assert len(model_lines) == len(WINDOW_SETUP.arms)
    np.testing.assert_allclose(np.concatenate([line.get_ydata() for line in model_lines]), expected)
    # The residual in sigma, computed here from the file's flux and ivar.
    spectrum = star["spectra"].slice(0, 1).to_pylist()[0]
    flux = np.concatenate([spectrum[a.flux_column] for a in WINDOW_SETUP.arms])
    ivar = np.concatenate([spectrum[a.ivar_column] for a in WINDOW_SETUP.arms])
    residual = [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == "residual"]
    drawn = np.concatenate([line.get_ydata() for line in residual])
    good = ivar > 0
    np.testing.assert_allclose(drawn[good], ((flux - expected) * np.sqrt(ivar))[good], rtol=1e-5, atol=1e-5)
    assert np.isnan(drawn[~good]).all()
    feh = [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == "saliency_feh"]
    saliency = np.concatenate([line.get_ydata() for line in feh])
    np.testing.assert_allclose(saliency, star["maps"][0] / np.abs(star["maps"][0]).max(), rtol=1e-6)
    title = fig._suptitle.get_text()
    assert first in title and "low_snr" in title and "anomalous_spectrum" in title
    assert f"{row['feh']:.4g} ± {row['feh_std']:.4g}" in title and "χ² 0.9" in title


def test_spectra_override_and_a_row_without_saliency(star, tmp_path):
    third = star["spectra"].column("spectrum_id")[2].as_py()
    view = star_view(
        star["catalogue"], third, spectra=star["spectra_path"], model=star["model"], release="DR1"
    )
    assert view.panels == ("flux", "residual") and len(figure(view).axes) == 2 * len(WINDOW_SETUP.arms)


def test_a_model_without_a_forward_model_draws_the_spectrum_and_says_so(star, tmp_path, capsys):
    first = star["spectra"].column("spectrum_id")[0].as_py()
    out = tmp_path / "bare.png"
    assert main(["show", star["catalogue"], first, "--release", "DR2", "--out", str(out)]) == 0
    assert "has no forward model: no model spectrum" in capsys.readouterr().out and out.stat().st_size > 0
    view = star_view(star["catalogue"], first, release="DR2")
    fig = figure(view)
    assert view.model_flux is None and len(fig.axes) == len(WINDOW_SETUP.arms)  # flux panels only
    assert "no forward model" in fig._suptitle.get_text() and "no χ²" in fig._suptitle.get_text()
    # The row's model is not the one given: refused, with the way out.
    assert main(["show", star["catalogue"], first, "--release", "DR1", "--model", star["bare"]]) == 1
    assert "was labelled by" in capsys.readouterr().err


def test_clear_errors(star, tmp_path, capsys):
    first = star["spectra"].column("spectrum_id")[0].as_py()
    assert main(["show", star["catalogue"], first, "--out", str(tmp_path / "x.png")]) == 1
    assert "labelled in releases ['DR1', 'DR2']: choose one with --release" in capsys.readouterr().err
    assert main(["show", star["catalogue"], "no-such-star", "--out", str(tmp_path / "x.png")]) == 1
    assert "no spectrum_id 'no-such-star' in the catalogue" in capsys.readouterr().err
    other = tmp_path / "other.parquet"
    pq.write_table(star["spectra"].slice(1, 2), other)
    with pytest.raises(InputError, match="not found in the spectra at"):
        star_view(star["catalogue"], first, spectra=str(other), release="DR1")
    moved, elsewhere = tmp_path / "moved", str(tmp_path / "cat")
    write_release(
        elsewhere,
        "DR1",
        [star["rows"]],
        model_id=star["rows"].column("model_id")[0].as_py(),
        manifest={"model": {"location": str(moved)}, "input": {"location": str(moved)}},
    )
    with pytest.raises(IntegrityError, match="the model directory the label run recorded; --model DIR"):
        star_view(elsewhere, first)
    with pytest.raises(InputError, match="the input the label run recorded; --spectra"):
        star_view(elsewhere, first, model=star["model"])
    assert main(["show", star["catalogue"], first, "--out", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.ray
def test_a_catalogue_from_the_label_job_is_shown_from_its_manifest(star, ray_session, tmp_path, capsys):
    """The real label job records where its model and spectra are; show finds both from the row
    alone, and the title's chi2 is the job's."""
    from speclabel.pipeline.catalogue import Catalogue
    from speclabel.pipeline.labelling import LabelOptions, label_spectra

    catalogue = str(tmp_path / "cat")
    options = LabelOptions(saliency="none", batch_size=8, progress=False, release="DR1")
    label_spectra(star["spectra_path"], star["model"], catalogue, options)
    first = star["spectra"].column("spectrum_id")[0].as_py()
    assert main(["show", catalogue, first, "--out", str(tmp_path / "job.png")]) == 0
    view = star_view(catalogue, first)
    (row,) = Catalogue.open(catalogue).lookup([first]).to_pylist()
    labels = np.array([[row[n] for n in LABEL_NAMES]])
    np.testing.assert_allclose(view.model_flux, window_forward_model().flux(labels)[0])
    assert view.panels == ("flux", "residual")
    assert f"χ² {row['chi2']:.4g}" in figure(view)._suptitle.get_text()
