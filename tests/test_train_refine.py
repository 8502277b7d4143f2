"""jobs.train.refine: the label refinement fitted after the members, its prior widths, its own
calibration and test metrics, against computations made here by hand."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from forward_data import WINDOW_SETUP, noise_free_survey, survey
from label_data import tiny_ensemble

from speclabel.core.errors import ConfigError, InputError
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.reporting import Reporter
from speclabel.jobs.train.refine import fit_refinement, validation_scatter
from speclabel.model.calibration import fit_error_calibration, prior_widths
from speclabel.model.refine import RefineConfig, refine_labels
from speclabel.model.splits import SplitRule
from speclabel.pipeline.training_data import InMemoryRows

SPLIT = SplitRule(test_fraction=0.25)
SCATTER = {"teff": (80.0, 120.0, 100.0), "logg": (0.2, 0.3, 0.25), "feh": (0.1, 0.2, 0.15)}
SCATTER |= {"mgfe": (0.05, 0.07, 0.06), "alfe": (0.08, 0.1, 0.12)}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    _, arrays = survey(120, 7)
    ensemble = tiny_ensemble(WINDOW_SETUP, labels=arrays["labels"])
    ensemble.member_info = [
        {"seed": i, "validation": {n: {"scatter": s[i]} for n, s in SCATTER.items()}} for i in range(3)
    ]
    path = tmp_path_factory.mktemp("reference") / "reference.parquet"
    pq.write_table(noise_free_survey(120, 7), path)
    lines = []
    fit_refinement(ensemble, InMemoryRows(arrays), SPLIT, str(path), RefineConfig(), Reporter(lines.append))
    return ensemble, arrays, lines


def test_prior_widths_are_the_members_median_validation_scatter(fitted):
    ensemble, arrays, lines = fitted
    refinement = ensemble.refinement
    assert refinement.config.prior_width == (100.0, 0.25, 0.15, 0.06, 0.1)
    # The abundances are kept from their own-lines fit (WINDOW_SETUP names Mg I and Al I lines).
    assert refinement.config.kept == LABEL_NAMES and refinement.config.own_lines == ("mgfe", "alfe")
    # The test split's own stars are not among the references.
    assert len(refinement.library.labels) == (~SPLIT.is_test(arrays["spectrum_id"])).sum()
    assert "label refinement of teff, logg, feh, mgfe, alfe" in lines[-2]
    assert "prior widths teff 100" in lines[-2]
    n_test = SPLIT.is_test(arrays["spectrum_id"]).sum()
    assert lines[-1].startswith(
        f"train: error calibration of the refined labels (std, floor) on {n_test} test rows"
    )


def test_calibration_and_metrics_are_the_refined_labels(fitted):
    ensemble, arrays, _ = fitted
    refinement = ensemble.refinement
    test = SPLIT.is_test(arrays["spectrum_id"])
    flux, ivar, mask, truth = (arrays[k][test] for k in ("flux", "ivar", "mask", "labels"))
    network = ensemble.predict(flux, mask)
    fitted_labels, _ = refine_labels(refinement.library, refinement.config, flux, ivar, mask, network.mean)
    residual = fitted_labels - truth
    expected = fit_error_calibration(
        residual, network.std, None, ensemble.label_names, prior_widths(ensemble)
    )
    stored = refinement.calibration
    assert stored.fitted_on["labels"]["teff"]["n"] == test.sum()
    for name in ensemble.label_names:
        assert stored.labels[name].a == pytest.approx(expected.labels[name].a, rel=1e-4, abs=1e-6)
        assert stored.labels[name].c == pytest.approx(expected.labels[name].c, rel=1e-4, abs=1e-9)
    metrics = ensemble.info["metrics"]["test_refined"]["all"]
    assert metrics["teff"]["scatter"] == pytest.approx(residual[:, 0].std(ddof=1))
    assert metrics["mgfe"]["scatter"] == pytest.approx(residual[:, 3].std(ddof=1))
    # Untrained networks start far off; the fit to the spectra brings Teff, log g, [Fe/H] in.
    rms = np.sqrt(((network.mean - truth) ** 2).mean(0))
    assert np.all(np.sqrt((residual**2).mean(0))[:3] < 0.5 * rms[:3])


def test_a_refit_without_reference_spectra_removes_the_refinement(fitted, tmp_path):
    ensemble, arrays, _ = fitted
    rows = InMemoryRows(arrays)
    bad = tmp_path / "bad.parquet"
    pq.write_table(noise_free_survey(120, 7).drop_columns(["feh"]), bad)
    with pytest.raises(InputError, match=r"lack the column\(s\) \['feh'\]"):
        fit_refinement(ensemble, rows, SPLIT, str(bad), RefineConfig(), Reporter(print))
    fit_refinement(ensemble, rows, SPLIT, None, RefineConfig(), Reporter(print))
    assert ensemble.refinement is None and "test_refined" not in ensemble.info.get("metrics", {})


def test_without_validation_scatter_the_prior_widths_must_be_given():
    _, arrays = survey(120, 7)
    ensemble = tiny_ensemble(WINDOW_SETUP, labels=arrays["labels"])
    with pytest.raises(
        ConfigError, match=r"no member has a validation scatter of teff.*\[refine\] prior_width"
    ):
        validation_scatter(ensemble)
