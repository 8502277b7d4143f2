"""speclabel evaluate: test-split rows of a model, catalogue joins, metrics.json and the rendered report."""

from __future__ import annotations

import json
import math
import re

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from tiny import TINY_ARCH

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.errors import InputError, IntegrityError
from speclabel.core.flags import Flag
from speclabel.core.labels import LABEL_NAMES
from speclabel.jobs.cli import main
from speclabel.model.arch import build_network
from speclabel.model.calibration import ErrorCalibration, LabelErrorModel
from speclabel.model.ensemble import Ensemble
from speclabel.model.io import save_model
from speclabel.model.ood import OODConfig, fit_embedding_reference
from speclabel.model.saliency import SaliencyAccumulator
from speclabel.model.scaling import LabelScaler
from speclabel.model.splits import SplitRule
from speclabel.pipeline.catalogue import write_release
from speclabel.pipeline.catalogue.layout import saliency_column
from speclabel.pipeline.evaluation import from_catalogue, from_model, render_markdown, write_report
from speclabel.pipeline.evaluation import report as report_module
from speclabel.pipeline.evaluation.population import read_run_saliency
from speclabel.pipeline.publish import Dataset
from speclabel.pipeline.simulate.catalogue import SyntheticCatalogue, synthetic_label_rows

# A large test fraction, so that a 40-spectrum survey has a test split worth plotting.
SPLIT = SplitRule(test_fraction=0.6)
TINY = TINY_ARCH.replace(conv_channels=(2,), pool_size=16, dense_units=(4,))


@pytest.fixture(scope="module")
def survey_file(small_survey, tmp_path_factory):
    path = tmp_path_factory.mktemp("survey") / "survey.parquet"
    pq.write_table(small_survey, path, row_group_size=16)  # several row groups and batches
    return path


@pytest.fixture(scope="module")
def model_dir(setup, small_survey, survey_file, tmp_path_factory):
    torch.manual_seed(3)
    labels = np.stack([small_survey.column(n).to_numpy() for n in LABEL_NAMES], axis=1).astype(np.float64)
    ensemble = Ensemble(
        setup,
        TINY,
        LabelScaler.fit(labels),
        [build_network(TINY, setup) for _ in range(3)],
        info={"training": {"split": SPLIT.to_dict(), "data": {"location": str(survey_file)}}},
    )
    # An out-of-distribution reference of the training rows (the ones outside the test split).
    train = small_survey.filter(pa.array(~SPLIT.is_test(small_survey.column("spectrum_id"))))
    flux, mask = model_inputs(spectra_arrays(train, setup), setup)
    ensemble.ood = fit_embedding_reference(
        [(train.column("spectrum_id").to_pylist(), ensemble.predict(flux, mask, embedding=True).embedding)],
        OODConfig(k=3, components=4),
    )
    path = tmp_path_factory.mktemp("model") / "model"
    save_model(ensemble, str(path))
    return path


@pytest.fixture(scope="module")
def model_evaluation(model_dir):
    return from_model(str(model_dir))


@pytest.fixture(scope="module")
def report(model_evaluation, tmp_path_factory):
    """One rendered report of the model evaluation (figures take seconds): its folder and document."""
    out = tmp_path_factory.mktemp("report") / "report"
    return out, write_report(model_evaluation, str(out))


def test_model_mode_labels_exactly_the_test_split(setup, small_survey, model_dir, model_evaluation):
    from speclabel.model.io import load_model

    ev = model_evaluation
    test = SPLIT.is_test(small_survey.column("spectrum_id"))
    assert 0 < test.sum() < small_survey.num_rows
    rows = small_survey.filter(pa.array(test))
    assert list(ev.spectrum_id) == rows.column("spectrum_id").to_pylist()
    assert ev.rows == {
        "read": small_survey.num_rows,
        "test_split": int(test.sum()),
        "evaluated": int(test.sum()),
        "quarantined": 0,
        "quarantine_reasons": {},
    }
    # predictions and saliency sums against the ensemble run once on all test rows
    flux, mask = model_inputs(spectra_arrays(rows, setup), setup)
    reference = load_model(str(model_dir)).predict(flux, mask, saliency="full")
    np.testing.assert_allclose(ev.predicted, reference.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ev.std, reference.std, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(ev.true[:, 0], rows.column("teff").to_numpy())
    np.testing.assert_array_equal(ev.snr, rows.column("snr").to_numpy())
    assert ev.saliency.count == test.sum()
    np.testing.assert_allclose(ev.saliency.sum, reference.saliency_maps.sum(axis=0), rtol=1e-4, atol=1e-7)
    assert ev.source["model_id"] and ev.source["data"] == ev.source["training_data"]


def test_bad_rows_are_refused_and_counted(setup, small_survey, model_dir, tmp_path):
    test_rows = np.flatnonzero(SPLIT.is_test(small_survey.column("spectrum_id")))
    flux = small_survey.column("flux_hr10").to_pylist()
    flux[test_rows[0]][100] = float("nan")  # an unmasked NaN pixel in a test-split row
    column = pa.FixedSizeListArray.from_arrays(pa.array(np.array(flux, np.float32).ravel()), len(flux[0]))
    bad = small_survey.set_column(small_survey.schema.get_field_index("flux_hr10"), "flux_hr10", column)
    bad = pa.concat_tables([bad, bad.slice(int(test_rows[1]), 1)])  # and a duplicate of a test row
    path = tmp_path / "bad.parquet"
    pq.write_table(bad, path, row_group_size=16)
    ev = from_model(str(model_dir), str(path), saliency=False)
    rows = ev.rows
    assert rows["test_split"] == len(test_rows) + 1
    assert rows["quarantined"] == 2 and rows["evaluated"] == len(test_rows) - 1
    assert rows["quarantine_reasons"] == {"duplicate_id": 1, "nonfinite_flux": 1}
    assert rows["test_split"] == rows["evaluated"] + rows["quarantined"]
    assert ev.saliency is None and ev.source["training_data"] != ev.source["data"]
    document = write_report(ev, str(tmp_path / "report"))
    quarantine = pq.read_table(tmp_path / "report" / "quarantine.parquet")
    assert sorted(quarantine.column("reason").to_pylist()) == ["duplicate_id", "nonfinite_flux"]
    assert document["quarantine_file"] == "quarantine.parquet"


def test_metrics_json_holds_the_numbers_numpy_gives(model_evaluation, report):
    ev = model_evaluation
    text = (report[0] / "metrics.json").read_text()
    document = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    for k, name in enumerate(ev.labels):
        r = ev.predicted[:, k] - ev.true[:, k]
        m = document["metrics"]["all"][name]
        assert m["bias"] == pytest.approx(np.mean(r), rel=1e-12)
        assert m["scatter"] == pytest.approx(np.std(r, ddof=1), rel=1e-12)
        assert m["robust_scatter"] == pytest.approx(1.4826 * np.median(np.abs(r - np.median(r))), rel=1e-12)
        assert m["frac_within_std"] == pytest.approx(np.mean(np.abs(r) < ev.std[:, k]))
        high = ev.snr >= 50
        assert document["metrics"]["snr>=50"][name]["n"] == high.sum()
        low = ev.snr < 20
        assert document["metrics"]["snr<20"][name]["n"] == low.sum()
        assert document["metrics"]["snr<20"][name]["bias"] == (
            pytest.approx(np.mean(r[low])) if low.any() else None
        )
    # full precision: the JSON float is the float64 itself
    r = ev.predicted[:, 0] - ev.true[:, 0]
    assert document["metrics"]["all"][ev.labels[0]]["bias"] == float(r.mean())


def test_report_renders_with_real_figures(report):
    out, document = report
    expected = {"one_to_one", "snr", "calibration", "kiel", "abundances", "saliency", "saliency_shares"}
    expected |= {"embedding_map"}
    assert set(document["figures"]) == expected
    report = (out / "report.md").read_text()
    for name in document["figures"].values():
        path = out / name
        assert path.stat().st_size > 8_000
        image = mpimg.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 200
        rgb = np.round(image[..., :3] * 255).astype(np.uint32)
        colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
        assert len(colours) > 50  # axes, points, text: not a blank or single-colour canvas
        assert f"]({name})" in report
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.json", "report.md", *document["figures"].values()]
    )


def test_report_md_shows_only_numbers_from_metrics_json(report):
    out = report[0]
    document = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    assert render_markdown(document) == report  # report.md is a function of metrics.json alone
    known = set()
    for value in _numbers(document):
        known |= {str(value)} if isinstance(value, int) else {f"{value:.4g}", f"{value:.6g}"}
    tables = [line for line in report.splitlines() if line.startswith("|") and not line.startswith("|---")]
    assert len(tables) > 20
    for line in tables:
        for token in re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]\d+)?", line.split("|", 2)[2]):
            assert token in known, f"{token!r} in report.md line {line!r} is not a number of metrics.json"


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def test_saliency_shares_against_the_window_masks(setup, model_evaluation, report):
    saliency = report[1]["saliency"]
    assert saliency["method"] == "population" and saliency["n_spectra"] == model_evaluation.n
    masks = setup.window_masks()
    magnitude = model_evaluation.saliency.sum_abs
    for k, name in enumerate(model_evaluation.labels):
        own = np.zeros(setup.n_pixels, bool)
        for group in setup.label_lines[name]:
            own |= masks[group]
        entry = saliency["labels"][name]
        assert entry["own_share"] == pytest.approx(magnitude[k, own].sum() / magnitude[k].sum())
        assert entry["own_pixel_fraction"] == pytest.approx(own.mean())
        assert entry["own_enrichment"] == pytest.approx(entry["own_share"] / entry["own_pixel_fraction"])
        assert entry["group_shares"]["Mg I"] == pytest.approx(
            magnitude[k, masks["Mg I"]].sum() / magnitude[k].sum()
        )


def test_an_existing_report_is_replaced_and_other_folders_are_refused(
    model_evaluation, tmp_path, monkeypatch
):
    monkeypatch.setattr(report_module, "draw_figures", lambda ev, document: {})  # folder handling only
    out = tmp_path / "report"
    write_report(model_evaluation, str(out))
    (out / "stale.png").write_bytes(b"old")
    write_report(model_evaluation, str(out))
    assert not (out / "stale.png").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="other than a speclabel evaluation report"):
        write_report(model_evaluation, str(precious))
    assert (precious / "thesis.tex").read_text() == "years of work"


# -- catalogue mode ---------------------------------------------------------------------------------


OFFSETS = {"teff": 40.0, "logg": -0.1, "feh": 0.05, "mgfe": 0.0, "alfe": 0.02}


@pytest.fixture
def catalogue(setup, tmp_path):
    rows = synthetic_label_rows(setup, SyntheticCatalogue(release="DR1", n_members=0), 0, 300)
    location = str(tmp_path / "catalogue")
    result = write_release(location, "DR1", [rows], model_id="m1")
    return location, rows, result.run_id


def _truth(rows: pa.Table, drop: int, extra: int) -> pa.Table:
    """True labels = catalogue labels - offset + noise, for all but ``drop`` rows, plus ``extra`` ids."""
    rng = np.random.default_rng(5)
    kept = rows.slice(drop)
    columns = {"spectrum_id": kept.column("spectrum_id").to_pylist() + [f"other-{i}" for i in range(extra)]}
    for name in LABEL_NAMES:
        values = kept.column(name).to_numpy().astype(np.float64) - OFFSETS[name]
        values = values + rng.normal(0, 0.01, values.size)
        columns[name] = np.concatenate([values, np.zeros(extra)])
    return pa.table(columns)


def test_catalogue_mode_joins_on_spectrum_id_and_counts(setup, catalogue, tmp_path):
    location, rows, _ = catalogue
    truth = _truth(rows, drop=20, extra=7)
    pq.write_table(truth, tmp_path / "truth.parquet")
    ev = from_catalogue(location, str(tmp_path / "truth.parquet"), setup=setup)
    assert ev.rows == {
        "catalogue": 300,
        "truth": 287,
        "matched": 280,
        "unmatched_catalogue": 20,
        "unmatched_truth": 7,
        "evaluated": 280,
    }
    # the join pairs each row with its own truth, whatever the catalogue's (HEALPix) row order
    by_id = dict(zip(truth.column("spectrum_id").to_pylist(), truth.column("feh").to_pylist(), strict=True))
    np.testing.assert_allclose(ev.true[:, 2], [by_id[i] for i in ev.spectrum_id])
    document = write_report(ev, str(tmp_path / "report"))
    for name in LABEL_NAMES:
        assert document["metrics"]["all"][name]["bias"] == pytest.approx(OFFSETS[name], abs=0.01)
    assert document["rows"]["matched"] == 280
    assert document["saliency"]["method"] == "row_mean"
    # the row-mean share of a group is the mean of the catalogue's summary column over matched rows
    matched = rows.filter(pc.is_in(rows.column("spectrum_id"), pa.array(ev.spectrum_id.tolist())))
    column = matched.column(saliency_column("mgfe", "Mg I")).to_numpy()
    assert document["saliency"]["labels"]["mgfe"]["own_share"] == pytest.approx(column.mean(), rel=1e-6)
    assert {"one_to_one", "kiel", "abundances", "saliency_shares"} <= set(document["figures"])
    assert "saliency" not in document["figures"]  # no population sums stored: no maps to draw


def _population_file(accumulator: SaliencyAccumulator, labels, wave) -> pa.Table:
    """A population saliency table as ``speclabel label`` stores it: one row per label."""
    n = len(labels)
    return pa.table(
        {
            "label": list(labels),
            "count": [accumulator.count] * n,
            "wave": [wave.tolist()] * n,
            "mean": [row.tolist() for row in accumulator.mean.astype(np.float32)],
            "mean_abs": [row.tolist() for row in accumulator.mean_abs.astype(np.float32)],
            "sum": [row.tolist() for row in accumulator.sum],
            "sum_abs": [row.tolist() for row in accumulator.sum_abs],
        }
    )


def test_catalogue_population_saliency_is_read_back_and_merged(setup, tiny_setup, catalogue, tmp_path):
    location, rows, run_id = catalogue
    dataset = Dataset.open(location)
    folder = tmp_path / "catalogue" / "_population_saliency" / "release=DR1" / f"run={run_id}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    parts = []
    for part in ("a", "b"):
        accumulator = SaliencyAccumulator.empty(len(LABEL_NAMES), setup.n_pixels)
        accumulator.add(rng.normal(size=(3, len(LABEL_NAMES), setup.n_pixels)))
        parts.append(accumulator)
        # stored in another label order: the reader puts rows back in the order asked for
        reordered = SaliencyAccumulator(accumulator.sum[::-1], accumulator.sum_abs[::-1], accumulator.count)
        pq.write_table(_population_file(reordered, LABEL_NAMES[::-1], setup.wave), folder / f"{part}.parquet")
    merged = read_run_saliency(dataset, "DR1", run_id, LABEL_NAMES, setup)
    assert merged.count == 6
    np.testing.assert_array_equal(merged.sum, parts[0].sum + parts[1].sum)
    np.testing.assert_array_equal(merged.sum_abs, parts[0].sum_abs + parts[1].sum_abs)
    with pytest.raises(IntegrityError, match="check 'saliency grid'"):
        read_run_saliency(dataset, "DR1", run_id, LABEL_NAMES, tiny_setup)
    pq.write_table(_truth(rows, 0, 0), tmp_path / "truth.parquet")
    ev = from_catalogue(location, str(tmp_path / "truth.parquet"), setup=setup)
    assert ev.saliency.count == 6 and ev.saliency_row_shares is None
    document = write_report(ev, str(tmp_path / "report"))
    assert document["saliency"]["method"] == "population" and "saliency" in document["figures"]


def test_catalogue_with_a_spectrum_in_two_releases_needs_a_release(setup, catalogue, tmp_path):
    location, rows, _ = catalogue
    write_release(location, "DR2", [rows.slice(0, 50)], model_id="m1")
    pq.write_table(_truth(rows, 0, 0), tmp_path / "truth.parquet")
    with pytest.raises(InputError, match=r"check 'one row per spectrum'.*--release"):
        from_catalogue(location, str(tmp_path / "truth.parquet"), setup=setup)
    ev = from_catalogue(location, str(tmp_path / "truth.parquet"), setup=setup, releases=["DR2"])
    assert ev.rows["catalogue"] == 50 and ev.source["releases"] == ["DR2"]
    with pytest.raises(InputError, match="one row per spectrum"):  # a filter keeps both releases' copies
        from_catalogue(location, str(tmp_path / "truth.parquet"), setup=setup, where="snr >= 50")
    ev = from_catalogue(
        location, str(tmp_path / "truth.parquet"), setup=setup, releases=["DR1"], where="snr >= 50"
    )
    assert ev.rows["catalogue"] == int((rows.column("snr").to_numpy() >= 50).sum())
    assert not math.isnan(ev.snr.min()) and ev.snr.min() >= 50


# -- the command line -------------------------------------------------------------------------------


def test_cli_model_mode_writes_the_report(model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    argv = [
        "evaluate",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--snr-bins",
        "30",
        "80",
        "--no-saliency",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "spectra evaluated" in printed and "teff" in printed
    document = json.loads((out / "metrics.json").read_text())
    assert document["snr"]["selections"] == ["snr>=50", "snr<30", "30<=snr<80", "snr>=80"]


def test_a_relative_recorded_data_path_outside_the_training_folder(
    setup, small_survey, survey_file, tmp_path, monkeypatch, capsys
):
    """A model.json written before training data locations were recorded absolute."""
    torch.manual_seed(3)
    labels = np.stack([small_survey.column(n).to_numpy() for n in LABEL_NAMES], axis=1).astype(np.float64)
    ensemble = Ensemble(
        setup,
        TINY,
        LabelScaler.fit(labels),
        [build_network(TINY, setup) for _ in range(2)],
        info={"training": {"split": SPLIT.to_dict(), "data": {"location": "survey.parquet"}}},
    )
    model = tmp_path / "model"
    save_model(ensemble, str(model))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "--model", str(model), "--out", str(tmp_path / "report")]) == 1
    err = capsys.readouterr().err
    assert "input 'survey.parquet' does not exist" in err
    assert (
        "relative to the folder `speclabel train` ran in" in err
        and "give the labelled spectra with --data" in err
    )
    assert not (tmp_path / "report").exists()
    assert from_model(str(model), str(survey_file), saliency=False).rows["evaluated"] > 0
    monkeypatch.chdir(survey_file.parent)  # where it was trained: the recorded path works
    assert from_model(str(model), saliency=False).rows["evaluated"] > 0


def test_cli_usage_and_job_errors(model_dir, tmp_path, capsys):
    out = str(tmp_path / "report")
    assert main(["evaluate", "--model", str(model_dir), "--out", out, "--truth", "t.parquet"]) == 2
    assert "go with --catalogue" in capsys.readouterr().err
    assert main(["evaluate", "--catalogue", str(tmp_path), "--out", out]) == 2
    assert "--truth" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "nothing"), "--out", out]) == 1
    assert "model.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--out", out])
    assert exit_info.value.code == 2


# -- the calibrated total error ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated_model_dir(setup, small_survey, survey_file, tmp_path_factory):
    """The tiny model with a std-and-floor calibration (no forward model: the bound term is dropped)."""
    torch.manual_seed(3)
    labels = np.stack([small_survey.column(n).to_numpy() for n in LABEL_NAMES], axis=1).astype(np.float64)
    calibration = ErrorCalibration(
        LABEL_NAMES,
        {
            n: LabelErrorModel(a=3.0, b=0.0, c=0.5 * s, prior_width=s)
            for n, s in zip(LABEL_NAMES, labels.std(axis=0), strict=True)
        },
        uses_bound=False,
        fitted_on={"rows": "common test split"},
    )
    ensemble = Ensemble(
        setup,
        TINY,
        LabelScaler.fit(labels),
        [build_network(TINY, setup) for _ in range(3)],
        info={
            "training": {"split": SPLIT.to_dict(), "data": {"location": str(survey_file)}},
            "calibration": calibration.to_dict(),
        },
    )
    path = tmp_path_factory.mktemp("calibrated") / "model"
    save_model(ensemble, str(path))
    return path, calibration


def test_calibrated_err_before_and_after_by_hand(calibrated_model_dir, model_evaluation, tmp_path):
    path, calibration = calibrated_model_dir
    ev = from_model(str(path), saliency=False)
    np.testing.assert_allclose(ev.err, calibration.total_error(ev.std), rtol=1e-12)
    assert model_evaluation.err is None  # a model without a calibration: no err
    document = write_report(ev, str(tmp_path / "report"))
    for selection, rows in (("all", np.ones(ev.n, bool)), ("snr<20", ev.snr < 20), ("snr>=50", ev.snr >= 50)):
        for k, name in enumerate(ev.labels):
            m = document["metrics"][selection][name]
            error = np.abs(ev.predicted[rows, k] - ev.true[rows, k])
            err, std = ev.err[rows, k], ev.std[rows, k]
            if not rows.any():
                assert m["err_ratio"] is None
                continue
            assert m["err_ratio"] == pytest.approx(np.sqrt(np.mean(err**2) / np.mean(error**2)))
            assert m["frac_within_err"] == pytest.approx(np.mean(error < err))
            assert m["frac_within_2err"] == pytest.approx(np.mean(error < 2 * err))
            assert m["frac_within_2std"] == pytest.approx(np.mean(error < 2 * std))
    assert "error_calibration" in document["figures"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Calibrated total error" in report and "in-sample" in report
    assert "](error_calibration.png)" in report
    assert render_markdown(document) == report


def test_catalogue_err_columns_are_read_and_null_ones_ignored(setup, catalogue, tmp_path):
    location, rows, _ = catalogue
    pq.write_table(_truth(rows, 0, 0), tmp_path / "truth.parquet")
    plain = from_catalogue(location, str(tmp_path / "truth.parquet"), setup=setup)
    assert plain.err is None
    errors = {name: np.full(rows.num_rows, 0.1 * (k + 1), np.float32) for k, name in enumerate(LABEL_NAMES)}
    with_err = rows
    for name, values in errors.items():
        with_err = with_err.append_column(f"{name}_err", pa.array(values))
    second = str(tmp_path / "with-err")
    write_release(second, "DR1", [with_err], model_id="m2")
    ev = from_catalogue(second, str(tmp_path / "truth.parquet"), setup=setup)
    expected = np.tile([0.1 * (k + 1) for k in range(len(LABEL_NAMES))], (ev.n, 1))
    np.testing.assert_allclose(ev.err, expected, rtol=1e-6)
    nulls = rows
    for name in LABEL_NAMES:
        nulls = nulls.append_column(f"{name}_err", pa.nulls(rows.num_rows, pa.float32()))
    third = str(tmp_path / "null-err")
    write_release(third, "DR1", [nulls], model_id="m3")
    ev = from_catalogue(third, str(tmp_path / "truth.parquet"), setup=setup)
    assert np.isnan(ev.err).all()
    document = write_report(ev, str(tmp_path / "report"))
    assert "err_ratio" not in document["metrics"]["all"]["teff"]
    assert "error_calibration" not in document["figures"]
    assert "No calibrated error is available" in (tmp_path / "report" / "report.md").read_text()


def test_the_ood_section_and_map_follow_the_model(model_dir, model_evaluation, report):
    """Scores and flags as the model gives them; the map covers the evaluated rows."""
    from speclabel.core.flags import Flag
    from speclabel.model.io import load_model

    ev = model_evaluation
    ensemble = load_model(str(model_dir))
    document = report[1]
    assert ev.embedding.shape == (ev.n, ensemble.ood.components.shape[0]) and list(ev.embedding_rows) == list(
        range(ev.n)
    )
    ood = document["ood"]
    assert ood["n"] == ev.n and ood["mean_score"] == pytest.approx(float(np.mean(ev.ood_score)))
    assert ood["flagged_out_of_distribution"] == int(np.sum(ev.ood_score > ensemble.ood.threshold))
    assert int(np.sum((ev.flags & Flag.OUT_OF_DISTRIBUTION) != 0)) == ood["flagged_out_of_distribution"]
    assert document["embedding_map"]["rows"] == ev.n
    assert "## Out of distribution" in (report[0] / "report.md").read_text()


def test_the_screening_section_counts_flagged_rows_per_injected_defect(setup, tmp_path):
    rows = synthetic_label_rows(setup, SyntheticCatalogue(release="DR1", n_members=0), 0, 60)
    flags = rows.column("flags").to_numpy().copy()
    flags[:12] |= Flag.ANOMALOUS_SPECTRUM  # rows 0-11 flagged, 12-13 out of distribution only
    flags[12:14] |= Flag.OUT_OF_DISTRIBUTION
    rows = rows.set_column(rows.schema.get_field_index("flags"), "flags", pa.array(flags))
    location = str(tmp_path / "catalogue")
    write_release(location, "DR1", [rows], model_id="m1")
    # Defects: binaries in rows 0-9 (all flagged), emission in 10-19 (2 by chi2, 2 out of distribution).
    defect = ["binary"] * 10 + ["emission"] * 10 + [None] * 40
    truth = _truth(rows, drop=0, extra=0).append_column("defect", pa.array(defect, pa.string()))
    pq.write_table(truth, tmp_path / "truth.parquet")
    ev = from_catalogue(location, str(tmp_path / "truth.parquet"), setup=setup)
    document = report_module.evaluation_document(ev)
    section = document["screening"]
    assert section["anomalous_spectrum"] == 12 and section["out_of_distribution"] == 2
    assert section["defects"] == {
        "binary": {"n": 10, "anomalous_spectrum": 10, "flagged": 10},
        "emission": {"n": 10, "anomalous_spectrum": 2, "flagged": 4},
        "clean": {"n": 40, "anomalous_spectrum": 0, "flagged": 0},
    }
    ids = rows.column("spectrum_id").to_pylist()
    assert len(section["examples"]) == 5 and set(section["examples"]) <= set(ids[:14])
    text = render_markdown(document)
    assert "| emission | 10 | 2 | 4 | 0.4 |" in text and section["examples"][0] in text


def test_refined_catalogue_rows_are_compared_with_their_network_labels(setup, catalogue, tmp_path):
    location, rows, _ = catalogue
    pq.write_table(_truth(rows, 0, 0), tmp_path / "truth.parquet")
    rng = np.random.default_rng(8)
    network = {"teff": rows.column("teff").to_numpy() + rng.normal(0, 50.0, rows.num_rows)}
    refined = rows.append_column("teff_cnn", pa.array(network["teff"].astype(np.float32)))
    write_release(str(tmp_path / "refined"), "DR1", [refined], model_id="m2")
    ev = from_catalogue(str(tmp_path / "refined"), str(tmp_path / "truth.parquet"), setup=setup)
    assert np.isnan(ev.network[:, 1:]).all() and np.isfinite(ev.network[:, 0]).all()
    document = write_report(ev, str(tmp_path / "report"))
    section = document["refinement"]
    assert section["labels"] == ["teff"] and set(section["refined"]) == {"all", "snr>=50"}
    truth = ev.true[:, 0]
    high = ev.snr >= 50
    assert section["network"]["all"]["teff"]["scatter"] == pytest.approx(
        np.std(ev.network[:, 0] - truth, ddof=1)
    )
    assert section["refined"]["snr>=50"]["teff"]["scatter"] == pytest.approx(
        np.std((ev.predicted[:, 0] - truth)[high], ddof=1)
    )
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "### Refined labels against the network's" in markdown
    assert f"| teff | K | all | {ev.n} |" in markdown
    plain = write_report(
        from_catalogue(location, str(tmp_path / "truth.parquet"), setup=setup), str(tmp_path / "r2")
    )
    assert plain["refinement"] is None and "Refined labels" not in (tmp_path / "r2" / "report.md").read_text()


def test_a_model_with_reference_spectra_is_evaluated_refined(
    setup, small_survey, model_dir, model_evaluation, tmp_path
):
    from speclabel.model.io import load_model
    from speclabel.model.refine import ReferenceLibrary, RefineConfig, Refinement, refine_labels
    from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk

    ensemble = load_model(str(model_dir))
    reference = simulate_chunk(setup, SurveyConfig(n=60, seed=21, chunk_size=60, noise_free=True), 0)
    flux, _ = spectra_arrays(reference, setup).concatenated(setup)
    labels = np.stack([reference.column(n).to_numpy() for n in LABEL_NAMES], 1)
    config = RefineConfig(prior_width=(300.0, 0.6, 0.3, 0.1, 0.15), neighbours=40, iterations=1)
    ensemble.refinement = Refinement(ReferenceLibrary(labels, flux, np.ones(flux.shape, bool), setup), config)
    save_model(ensemble, str(tmp_path / "refined"))
    ev = from_model(str(tmp_path / "refined"))
    # Every label refined: the abundances from their own lines (the setup names Mg I and Al I windows).
    assert ev.source["refined"] == list(LABEL_NAMES) and ev.err is None  # no refined calibration
    np.testing.assert_array_equal(ev.network, model_evaluation.predicted)
    test = small_survey.filter(pa.array(SPLIT.is_test(small_survey.column("spectrum_id"))))
    arrays = spectra_arrays(test, setup)
    inputs, good = model_inputs(arrays, setup)
    ivar = np.where(good, arrays.concatenated(setup)[1], 0.0)
    fitted, _ = refine_labels(
        ensemble.refinement.library, config, inputs, ivar, good, model_evaluation.predicted
    )
    np.testing.assert_allclose(ev.predicted, fitted, rtol=1e-6)
