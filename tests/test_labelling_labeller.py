"""labelling/labeller.py: the actor's call, in process: labels equal the ensemble's, bad rows go to
quarantine, one summary row per batch, the label.batch fault, a model changed under the run."""

import json

import numpy as np
import pyarrow as pa
import pytest
from forward_data import WINDOW_SETUP, noise_free_survey, survey, window_forward_model
from label_data import tiny_ensemble
from labeller_batches import labeller, prepared_batch

from speclabel.core.arrays import spectra_arrays
from speclabel.core.errors import ConfigError
from speclabel.core.faults import Fault, InjectedFault
from speclabel.core.flags import Flag
from speclabel.core.labels import LABEL_NAMES as LABELS
from speclabel.model.calibration import ErrorCalibration, LabelErrorModel
from speclabel.model.io import save_model
from speclabel.model.refine import ReferenceLibrary, RefineConfig, Refinement, refine_labels
from speclabel.pipeline.labelling import batch as B
from speclabel.pipeline.labelling.labeller import EnsembleLabeller, LabellerSettings


def test_a_batch_becomes_catalogue_quarantine_and_summary_rows(tiny_setup, tmp_path):
    batch = prepared_batch(tiny_setup)
    ids = batch.column("spectrum_id").to_pylist()
    actor, ensemble = labeller(tiny_setup, tmp_path / "model", map_ids=frozenset({ids[3], ids[1]}))
    out = actor(batch)
    catalogue, quarantine, maps, summaries = B.split_output(out, actor.settings.spec)
    assert sorted(quarantine.column("reason").to_pylist()) == ["duplicate_id", "nonfinite_flux"]
    good = [i for i in range(batch.num_rows) if i not in (1, 2)]
    assert catalogue.column("spectrum_id").to_pylist() == [ids[i] for i in good]
    _, flux, mask = B.model_batch(batch)
    expected = ensemble.predict(flux, mask, saliency="full")
    np.testing.assert_allclose(catalogue.column("teff").to_numpy(), expected.mean[:, 0], rtol=1e-5, atol=1e-4)
    assert set(catalogue.column("run_id").to_pylist()) == {"run-1"}
    assert maps.column("spectrum_id").to_pylist() == [ids[3]]  # ids[1] was quarantined
    assert summaries.num_rows == 1 and summaries.column(B.BATCH_ROWS).to_pylist() == [batch.num_rows]
    population = B.summary_accumulator(summaries, len(ensemble.label_names), tiny_setup.n_pixels)
    assert population.count == len(good)
    np.testing.assert_allclose(
        population.mean, expected.saliency_maps.astype(np.float64).mean(axis=0), rtol=1e-4, atol=1e-9
    )


def test_the_label_batch_fault_fails_the_actor_after_its_batches(tiny_setup, tmp_path):
    actor, _ = labeller(
        tiny_setup, tmp_path / "model", saliency=None, fault=Fault("label.batch", {"batches": "1"})
    )
    batch = prepared_batch(tiny_setup, n=4)
    actor(batch)
    with pytest.raises(InjectedFault, match=r"label\.batch"):
        actor(batch)


def test_a_model_changed_during_the_run_is_refused(tiny_setup, tmp_path):
    actor, _ = labeller(tiny_setup, tmp_path / "model", saliency=None)
    changed = LabellerSettings(**{**actor.settings.__dict__, "model_id": "0" * 16})
    with pytest.raises(ConfigError, match="changed during the run"):
        EnsembleLabeller(changed)
    with pytest.raises(ConfigError, match="precision"):
        LabellerSettings(**{**actor.settings.__dict__, "precision": "fp8"})


def test_rows_carry_the_forward_models_chi2_and_anomaly_flag(tmp_path):
    table, _ = survey(200, 202)
    table = table.slice(0, 12).append_column(B.SOURCE, pa.array(["in.parquet"] * 12))
    ensemble = tiny_ensemble(WINDOW_SETUP)
    plain_model = tmp_path / "plain"
    save_model(ensemble, str(plain_model))
    ensemble.forward = window_forward_model()
    save_model(ensemble, str(tmp_path / "model"))
    spec = B.OutputSpec(ensemble.label_names, (), None, False, WINDOW_SETUP.n_pixels, ("hr10", "hr21"))
    chi2_fields = [pa.field(c, pa.float32()) for c in ("chi2", "chi2_hr10", "chi2_hr21")]
    fields = B.catalogue_fields(spec)
    first = [f.name for f in fields].index("chi2")
    assert fields[first : first + 3] == chi2_fields

    def label(model, with_ivar):
        settings = LabellerSettings(
            model_location=str(model),
            setup=WINDOW_SETUP,
            spec=spec,
            thresholds=B.FlagThresholds(low_snr=0),
            run_id="run-1",
            model_id=_model_id(model),
            with_ivar=with_ivar,
        )
        prepared = B.prepare(table, WINDOW_SETUP, with_ivar=with_ivar)
        return prepared, B.split_output(EnsembleLabeller(settings)(prepared), spec)[0]

    prepared, catalogue = label(tmp_path / "model", True)
    rows, flux, mask = B.model_batch(prepared)
    ivar = B.ivar_batch(prepared, rows)
    # Independent: ivar straight from the input table, labels and their errors from the ensemble
    # itself (no calibration: the ensemble std is the error propagated into the pixel variances).
    _, input_ivar = spectra_arrays(table, WINDOW_SETUP).concatenated(WINDOW_SETUP)
    np.testing.assert_array_equal(ivar, np.where(mask, input_ivar, 0))
    prediction = ensemble.predict(flux, mask)
    chi2 = ensemble.forward.chi2(flux, input_ivar, mask, prediction.mean, prediction.std)
    assert not np.allclose(
        chi2["total"], ensemble.forward.chi2(flux, input_ivar, mask, prediction.mean)["total"]
    )
    for column, key in (("chi2", "total"), ("chi2_hr10", "hr10"), ("chi2_hr21", "hr21")):
        np.testing.assert_allclose(catalogue.column(column).to_numpy(), chi2[key], rtol=1e-4)
    flagged = (np.asarray(catalogue.column("flags")) & Flag.ANOMALOUS_SPECTRUM) > 0
    np.testing.assert_array_equal(flagged, ensemble.forward.anomalous(chi2))
    # A model without a forward model: the same columns, null.
    _, catalogue = label(plain_model, False)
    assert catalogue.column("chi2").null_count == catalogue.num_rows == 12
    assert not any(f & Flag.ANOMALOUS_SPECTRUM for f in catalogue.column("flags").to_pylist())


def test_rows_carry_the_calibrated_err(tmp_path):
    table, _ = survey(200, 202)
    table = table.slice(0, 12).append_column(B.SOURCE, pa.array(["in.parquet"] * 12))
    ensemble = tiny_ensemble(WINDOW_SETUP)
    ensemble.forward = window_forward_model()
    calibration = ErrorCalibration(
        ensemble.label_names,
        {
            n: LabelErrorModel(a=2.0, b=1.5, c=0.01 * w, prior_width=w)
            for n, w in zip(ensemble.label_names, ensemble.forward.label_scale, strict=True)
        },
        uses_bound=True,
    )
    ensemble.info["calibration"] = calibration.to_dict()
    save_model(ensemble, str(tmp_path / "model"))
    ensemble.forward = None
    save_model(ensemble, str(tmp_path / "no-forward"))  # its calibration needs the bound: null err
    spec = B.OutputSpec(
        ensemble.label_names, (), None, False, WINDOW_SETUP.n_pixels, ("hr10", "hr21"), error_columns=True
    )
    names = [f.name for f in B.catalogue_fields(spec)]
    first = names.index(f"{ensemble.label_names[0]}_err")
    expected = [f"{n}_err" for n in ensemble.label_names] + ["chi2", "chi2_hr10", "chi2_hr21"]
    assert names[first : first + len(expected)] == expected

    def label(model, with_ivar):
        settings = LabellerSettings(
            model_location=str(model),
            setup=WINDOW_SETUP,
            spec=spec,
            thresholds=B.FlagThresholds(low_snr=0),
            run_id="run-1",
            model_id=_model_id(model),
            with_ivar=with_ivar,
        )
        prepared = B.prepare(table, WINDOW_SETUP, with_ivar=with_ivar)
        return prepared, B.split_output(EnsembleLabeller(settings)(prepared), spec)[0]

    prepared, catalogue = label(tmp_path / "model", True)
    _, flux, mask = B.model_batch(prepared)
    # Independent: ivar from the input table, the bound at the ensemble's labels, the stated form.
    _, input_ivar = spectra_arrays(table, WINDOW_SETUP).concatenated(WINDOW_SETUP)
    prediction = ensemble.predict(flux, mask)
    bound = window_forward_model().label_bound(prediction.mean, np.where(mask, input_ivar, 0), mask)
    for k, name in enumerate(ensemble.label_names):
        p = bound[:, k] / np.sqrt(1 + (bound[:, k] / calibration.labels[name].prior_width) ** 2)
        floor = calibration.labels[name].c
        expected = np.sqrt((2.0 * prediction.std[:, k]) ** 2 + (1.5 * p) ** 2 + floor**2)
        np.testing.assert_allclose(catalogue.column(f"{name}_err").to_numpy(), expected, rtol=1e-5)
    assert catalogue.schema.field("alfe_err").type == pa.float32()
    _, catalogue = label(tmp_path / "no-forward", False)
    assert catalogue.column("alfe_err").null_count == catalogue.num_rows == 12


def _model_id(folder) -> str:
    return json.loads((folder / "model.json").read_text())["model_id"]


def test_a_model_with_reference_spectra_refines_and_keeps_the_network_labels(tmp_path):
    table, arrays = survey(200, 202)
    table = table.slice(0, 12).append_column(B.SOURCE, pa.array(["in.parquet"] * 12))
    ensemble = tiny_ensemble(WINDOW_SETUP)
    plain = ErrorCalibration(
        ensemble.label_names,
        {n: LabelErrorModel(a=2.0, b=0.0, c=1.0, prior_width=1.0) for n in LABELS},
        False,
    )
    refined_errors = ErrorCalibration(
        ensemble.label_names,
        {n: LabelErrorModel(a=0.5, b=0.0, c=0.1, prior_width=1.0) for n in LABELS},
        False,
    )
    ensemble.info["calibration"] = plain.to_dict()
    reference = noise_free_survey(120, 7)
    library = ReferenceLibrary(
        np.stack([reference.column(n).to_numpy() for n in LABELS], 1),
        np.concatenate([spectra_arrays(reference, WINDOW_SETUP).flux[a.name] for a in WINDOW_SETUP.arms], 1),
        np.ones((120, WINDOW_SETUP.n_pixels), bool),
        WINDOW_SETUP,
    )
    config = RefineConfig(prior_width=(300.0, 0.6, 0.3, 0.1, 0.15), neighbours=40)
    ensemble.refinement = Refinement(library, config, calibration=refined_errors)
    save_model(ensemble, str(tmp_path / "model"))

    def label(refine):
        spec = B.OutputSpec(
            ensemble.label_names,
            (),
            None,
            False,
            WINDOW_SETUP.n_pixels,
            error_columns=True,
            refined_labels=config.kept if refine else (),
        )
        settings = LabellerSettings(
            model_location=str(tmp_path / "model"),
            setup=WINDOW_SETUP,
            spec=spec,
            thresholds=B.FlagThresholds(low_snr=0),
            run_id="run-1",
            model_id=_model_id(tmp_path / "model"),
            with_ivar=True,
            refine=refine,
        )
        prepared = B.prepare(table, WINDOW_SETUP, with_ivar=True)
        return prepared, B.split_output(EnsembleLabeller(settings)(prepared), spec)[0]

    prepared, refined = label(True)
    _, network = label(False)
    _, flux, mask = B.model_batch(prepared)
    prediction = ensemble.predict(flux, mask)
    _, ivar = spectra_arrays(table, WINDOW_SETUP).concatenated(WINDOW_SETUP)
    fitted, _ = refine_labels(library, config, flux, np.where(mask, ivar, 0), mask, prediction.mean)
    assert "teff_cnn" not in network.column_names
    for k, name in enumerate(LABELS):
        column = refined.column(name).to_numpy()
        std = prediction.std[:, k]
        if name in config.kept:
            np.testing.assert_allclose(column, fitted[:, k], rtol=1e-6)
            np.testing.assert_allclose(
                refined.column(f"{name}_cnn").to_numpy(), prediction.mean[:, k], rtol=1e-6
            )
            np.testing.assert_array_equal(
                network.column(name).to_numpy(), refined.column(f"{name}_cnn").to_numpy()
            )
        else:
            np.testing.assert_array_equal(column, network.column(name).to_numpy())
        # Each run's errors come from its own calibration.
        np.testing.assert_allclose(
            refined.column(f"{name}_err").to_numpy(), np.hypot(0.5 * std, 0.1), rtol=1e-5
        )
        np.testing.assert_allclose(
            network.column(f"{name}_err").to_numpy(), np.hypot(2.0 * std, 1.0), rtol=1e-5
        )
    # The fit moved Teff towards the truth (untrained networks start far off).
    truth = arrays["labels"][:12, 0]
    assert (
        np.abs(refined.column("teff").to_numpy() - truth).mean()
        < 0.5 * np.abs(prediction.mean[:, 0] - truth).mean()
    )
