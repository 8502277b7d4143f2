"""labelling/batch.py: preparation, catalogue rows, flags, the output stream."""

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.contract import QUARANTINE_SCHEMA
from speclabel.core.fingerprints import spectrum_sha256
from speclabel.core.flags import Flag
from speclabel.core.setups import Setup
from speclabel.model.ensemble import Prediction
from speclabel.model.saliency import SaliencyAccumulator, summarise
from speclabel.pipeline.catalogue.layout import saliency_column
from speclabel.pipeline.labelling import batch as B
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk

LABELS = ("teff", "logg", "feh", "mgfe", "alfe")


@pytest.fixture(scope="module")
def survey(tiny_setup):
    return simulate_chunk(tiny_setup, SurveyConfig(n=12, seed=5, chunk_size=12), 0)


def _with_bad_rows(table: pa.Table, setup: Setup) -> pa.Table:
    """Row 1: NaN flux at an unmasked pixel; row 2: a flux array one pixel short; row 3: null id;
    row 4: flagged as a duplicate by the (simulated) pre-pass."""
    arm = setup.arms[0]
    flux = [list(v) for v in table.column(arm.flux_column).to_pylist()]
    flux[1][5] = float("nan")
    flux[2] = flux[2][:-1]
    ids = table.column("spectrum_id").to_pylist()
    ids[3] = None
    table = table.set_column(
        table.schema.get_field_index(arm.flux_column), arm.flux_column, pa.array(flux, pa.list_(pa.float32()))
    )
    table = table.set_column(0, "spectrum_id", pa.array(ids, pa.string()))
    table = table.append_column(B.SOURCE, pa.array(["in.parquet"] * table.num_rows))
    duplicate = np.zeros(table.num_rows, dtype=bool)
    duplicate[4] = True
    return table.append_column(B.DUPLICATE, pa.array(duplicate))


def test_prepare_routes_bad_rows_and_keeps_the_network_inputs(tiny_setup, survey):
    table = _with_bad_rows(survey, tiny_setup)
    prepared = B.prepare(table, tiny_setup)
    assert prepared.num_rows == table.num_rows
    reasons = prepared.column(B.REASON).to_pylist()
    assert reasons[:5] == [None, "nonfinite_flux", "wrong_length", "missing_id", "duplicate_id"]
    assert all(r is None for r in reasons[5:])
    rows, flux, mask = B.model_batch(prepared)
    good = [0, *range(5, table.num_rows)]
    assert rows.tolist() == good
    expected_flux, expected_mask = model_inputs(spectra_arrays(survey, tiny_setup), tiny_setup)
    np.testing.assert_array_equal(flux, expected_flux[good])
    np.testing.assert_array_equal(mask, expected_mask[good])
    sha = spectrum_sha256(spectra_arrays(survey, tiny_setup), tiny_setup)
    assert prepared.column("input_sha256").to_pylist()[5:] == sha[5:]
    masked = 1 - expected_mask[good].mean(axis=1)
    np.testing.assert_allclose(np.asarray(prepared.column(B.MASKED_FRACTION))[good], masked, rtol=1e-6)
    np.testing.assert_array_equal(
        prepared.column("snr").to_numpy()[good], survey.column("snr").to_numpy()[good]
    )


def test_flag_snr_uses_the_input_snr_or_estimates_it():
    rng = np.random.default_rng(0)
    flux = 1 + 0.01 * rng.standard_normal((3, 50))
    ivar = np.full((3, 50), 40.0**2)
    good = np.ones((3, 50), dtype=bool)
    good[2, :45] = False
    out = B.flag_snr(np.array([12.0, np.nan, np.nan]), flux, ivar, good)
    assert out[0] == 12.0
    assert out[1] == pytest.approx(np.median(flux[1] * 40.0))
    assert out[2] == pytest.approx(np.median(flux[2, 45:] * 40.0))
    assert np.isnan(B.flag_snr(np.array([np.nan]), flux[:1], None, good[:1]))[0]


def _spec(setup, saliency="summary", members=True):
    return B.OutputSpec(LABELS, tuple(setup.line_windows), saliency, members, setup.n_pixels)


def test_label_rows_and_flags_follow_the_prediction(tiny_setup):
    rng = np.random.default_rng(1)
    n, m = 4, 3
    members = 1e-3 * rng.normal(size=(m, n, 5)) + np.array([5000, 3, -0.5, 0.1, 0.1])
    maps = rng.normal(size=(n, 5, tiny_setup.n_pixels)).astype(np.float32)
    outside = np.zeros((n, 5), dtype=bool)
    outside[2, 3] = True
    prediction = Prediction(
        mean=members.mean(axis=0),
        std=members.std(axis=0, ddof=1),
        members=members,
        saliency=summarise(maps, tiny_setup),
        saliency_maps=maps,
        outside_training_range=outside,
    )
    prediction.std[1, 0] = 500.0  # teff std above its threshold
    good = pa.table(
        {
            "spectrum_id": ["a", "b", "c", "d"],
            "ra": pa.array([1.0, None, 3.0, 4.0]),
            "dec": [1.0, 2.0, 3.0, 4.0],
            "snr": pa.array([50, 50, 50, 5], pa.float32()),
            "object": ["x", "y", "z", None],
            "input_sha256": ["h1", "h2", "h3", "h4"],
            B.FLAG_SNR: pa.array([50, 50, 50, 5], pa.float32()),
            B.MASKED_FRACTION: pa.array([0.0, 0.0, 0.5, 0.0], pa.float32()),
            B.SOURCE: ["f"] * 4,
        }
    )
    spec = _spec(tiny_setup, saliency="full")
    rows = B.label_rows(
        good,
        prediction,
        spec,
        B.FlagThresholds(),
        model_id="m",
        run_id="r",
        processed_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        map_rows=np.array([True, False, False, True]),
    )
    np.testing.assert_allclose(rows.column("feh").to_numpy(), prediction.mean[:, 2].astype(np.float32))
    np.testing.assert_allclose(rows.column("teff_std").to_numpy(), prediction.std[:, 0].astype(np.float32))
    assert rows.column("alfe_members").to_pylist()[1] == pytest.approx(members[:, 1, 4].tolist(), rel=1e-6)
    expected = [0, Flag.HIGH_STD, Flag.EXTRAPOLATED | Flag.HEAVILY_MASKED, Flag.LOW_SNR]
    assert rows.column("flags").to_pylist() == [int(f) for f in expected]
    group = next(iter(tiny_setup.line_windows))
    share = rows.column(saliency_column("mgfe", group)).to_numpy()
    window = tiny_setup.window_masks()[group]
    np.testing.assert_allclose(
        share, np.abs(maps[:, 3, window]).sum(1) / np.abs(maps[:, 3]).sum(1), rtol=1e-5
    )
    peak = rows.column(saliency_column("teff", "peak_wave")).to_numpy()
    np.testing.assert_allclose(peak, tiny_setup.wave[np.abs(maps[:, 0]).argmax(1)].astype(np.float32))
    full = rows.column("saliency_logg").to_pylist()
    assert full[1] is None and full[2] is None
    np.testing.assert_array_equal(np.asarray(full[3], np.float32), maps[3, 1])

    output = B.output_table(
        [rows, B.quarantine_rows(good.slice(0, 1), ["model_error: x"])], B.output_schema(spec)
    )
    catalogue, quarantine, saliency_maps, summaries = B.split_output(output, spec)
    assert catalogue.column_names == [f.name for f in B.catalogue_fields(spec)]
    assert catalogue.num_rows == 4 and summaries.num_rows == 0
    assert quarantine.schema == QUARANTINE_SCHEMA and quarantine.column("reason").to_pylist() == [
        "model_error"
    ]
    assert saliency_maps.column("spectrum_id").to_pylist() == ["a", "d"]


def test_ood_score_flag_and_extrapolated_labels(tiny_setup):
    """The score as float32 (NaN as null), the flag where the model says so, and which labels lie
    outside the training range; a model without a reference gives null scores and no flag."""
    n = 4
    mean = np.tile([5000.0, 3.0, -0.5, 0.1, 0.1], (n, 1))
    outside = np.zeros((n, 5), dtype=bool)
    outside[1, 0] = outside[1, 2] = True
    outside[3, 4] = True
    good = pa.table(
        {
            "spectrum_id": list("abcd"),
            **{name: pa.nulls(n, pa.float64()) for name in ("ra", "dec")},
            "snr": pa.array([50.0] * n, pa.float32()),
            "object": pa.nulls(n, pa.string()),
            "input_sha256": list("hijk"),
            B.FLAG_SNR: pa.array([50.0] * n, pa.float32()),
            B.MASKED_FRACTION: pa.array([0.0] * n, pa.float32()),
            B.SOURCE: ["f"] * n,
        }
    )
    spec = _spec(tiny_setup, saliency=None, members=False)

    def rows_of(prediction):
        return B.label_rows(
            good,
            prediction,
            spec,
            B.FlagThresholds(),
            model_id="m",
            run_id="r",
            processed_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        )

    scored = rows_of(
        Prediction(
            mean=mean,
            std=np.full((n, 5), 1e-4),
            outside_training_range=outside,
            ood_score=np.array([12.5, 99.5, np.nan, 100.0]),
            out_of_distribution=np.array([False, True, False, True]),
        )
    )
    assert scored.schema.field("ood_score").type == pa.float32()
    assert scored.column("ood_score").to_pylist() == [12.5, 99.5, None, 100.0]
    assert scored.column("extrapolated_labels").to_pylist() == ["", "teff,feh", "", "alfe"]
    ood, extrapolated = int(Flag.OUT_OF_DISTRIBUTION), int(Flag.EXTRAPOLATED)
    assert scored.column("flags").to_pylist() == [0, ood | extrapolated, 0, ood | extrapolated]
    unscored = rows_of(Prediction(mean=mean, std=np.full((n, 5), 1e-4), outside_training_range=outside))
    assert unscored.column("ood_score").null_count == n
    assert unscored.column("flags").to_pylist() == [0, extrapolated, 0, extrapolated]
    output = B.output_table([scored], B.output_schema(spec))
    catalogue = B.split_output(output, spec)[0]
    assert catalogue.column_names[-2:] == ["ood_score", "extrapolated_labels"]
    assert catalogue.column("extrapolated_labels").to_pylist() == ["", "teff,feh", "", "alfe"]


def test_population_sums_merge_exactly_across_batches(tiny_setup):
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(30, 5, tiny_setup.n_pixels)).astype(np.float32)
    parts = []
    for lo, hi in ((0, 7), (7, 8), (8, 30)):
        acc = SaliencyAccumulator.empty(5, tiny_setup.n_pixels)
        acc.add(maps[lo:hi])
        parts.append(B.summary_row(hi - lo, {"actor": str(lo)}, acc))
    spec = _spec(tiny_setup)
    merged = B.summary_accumulator(B.output_table(parts, B.output_schema(spec)), 5, tiny_setup.n_pixels)
    assert merged.count == 30
    np.testing.assert_allclose(merged.mean, maps.astype(np.float64).mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(merged.mean_abs, np.abs(maps.astype(np.float64)).mean(axis=0), rtol=1e-12)
