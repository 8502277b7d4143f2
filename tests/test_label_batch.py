"""The label job's pure parts: preparation, catalogue rows, flags, the output stream, the pre-pass."""

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.contract import QUARANTINE_SCHEMA, spectra_schema
from speclabel.core.errors import ConfigError, UsageError
from speclabel.core.fingerprints import spectrum_sha256
from speclabel.core.flags import Flag
from speclabel.core.setups import Setup
from speclabel.model.ensemble import Prediction
from speclabel.model.saliency import SaliencyAccumulator, summarise
from speclabel.pipeline.catalogue.layout import saliency_column
from speclabel.pipeline.labelling import batch as B
from speclabel.pipeline.labelling.inputs import (
    ParquetInput,
    duplicate_rows,
    footer_bytes,
    inspect_file,
    read_spectra,
)
from speclabel.pipeline.labelling.job import LabelOptions, decide_release, plan_resources, usable_resources
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


def test_duplicates_keep_the_first_occurrence_by_path_then_row(tmp_path):
    from speclabel.pipeline.labelling.inputs import InputFile

    files = [InputFile("a.parquet", 0, 4), InputFile("b.parquet", 0, 5)]
    ids = [
        pa.chunked_array([["x", "y", "x", None]]),
        pa.chunked_array([["z", "y", "", "x"], [""]]),
    ]
    found = duplicate_rows(files, ids)
    assert found["a.parquet"].tolist() == [2]
    assert found["b.parquet"].tolist() == [1, 3]


def test_resources_leave_a_cpu_for_reading_and_refuse_impossible_plans():
    plan = plan_resources(LabelOptions(), {"CPU": 2.0})
    assert (plan.actors, plan.cpus_per_actor, plan.threads_per_actor, plan.prepare_cpus) == (2, 0.5, 1, 1.0)
    plan = plan_resources(LabelOptions(batch_size=10), {"CPU": 2.0}, rows=7)
    assert plan.actors == 1  # one batch of work: one actor loads the model, not two
    plan = plan_resources(LabelOptions(), {"CPU": 16.0})
    assert plan.actors == 16 and plan.actors * plan.cpus_per_actor + plan.prepare_cpus <= 16
    plan = plan_resources(LabelOptions(gpus=2), {"CPU": 8.0, "GPU": 4.0})
    assert (plan.actors, plan.gpus_per_actor) == (2, 1)
    with pytest.raises(ConfigError, match="GPUs"):
        plan_resources(LabelOptions(gpus=2), {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="wait forever"):
        plan_resources(LabelOptions(actors=4, cpus_per_actor=1.0), {"CPU": 2.0})


def test_release_and_option_rules():
    assert decide_release("DR9", ["DR1", "DR2"]) == "DR9"
    assert decide_release(None, ["DR1"]) == "DR1"
    with pytest.raises(UsageError, match="several releases"):
        decide_release(None, ["DR1", "DR2"])
    with pytest.raises(UsageError, match="--release"):
        decide_release(None, [])
    with pytest.raises(UsageError, match="saliency-sample"):
        LabelOptions(saliency="full")
    with pytest.raises(UsageError, match="need --saliency full"):
        LabelOptions(saliency_sample=3)


def test_prepass_refuses_whole_files_and_fingerprints_footers(tiny_setup, survey, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(survey, folder / "a.parquet")
    other = Setup.from_dict({**tiny_setup.to_dict(), "name": "other-setup"})
    pq.write_table(survey.cast(spectra_schema(other, labelled=True)), folder / "b.parquet")
    (folder / "c.parquet").write_bytes(b"not parquet at all")
    pq.write_table(survey.select(["spectrum_id", "ra", "dec"]), folder / "d.parquet")  # no flux at all
    source = ParquetInput.open(str(folder), tiny_setup)
    refused = {f.path.rsplit("/", 1)[1]: f.refused for f in source.files}
    assert refused["a.parquet"] is None
    assert refused["b.parquet"].startswith("wrong_setup: ") and "other-setup" in refused["b.parquet"]
    assert refused["c.parquet"].startswith("corrupt_file: ")
    assert refused["d.parquet"].startswith("wrong_schema: ") and "flux_blue" in refused["d.parquet"]
    assert source.rows_in == 3 * survey.num_rows and source.releases == ["SIM"]
    quarantined = pa.concat_tables(source.refused_quarantine())
    assert quarantined.num_rows == 2 * survey.num_rows + 1
    assert (
        quarantined.column("spectrum_id").to_pylist()[: survey.num_rows]
        == survey.column("spectrum_id").to_pylist()
    )
    assert sorted(set(quarantined.column("reason").to_pylist())) == [
        "corrupt_file",
        "wrong_schema",
        "wrong_setup",
    ]

    again = ParquetInput.open(str(folder), tiny_setup)
    assert again.fingerprint == source.fingerprint
    changed = survey.set_column(
        survey.schema.get_field_index("teff"), "teff", pa.array(np.zeros(12, np.float32))
    )
    pq.write_table(changed, folder / "a.parquet")
    assert ParquetInput.open(str(folder), tiny_setup).fingerprint != source.fingerprint
    info = inspect_file(source.fs, str(folder / "a.parquet"), tiny_setup)
    assert footer_bytes(source.fs, info.path, info.size) is not None


def test_release_values_from_statistics_or_the_column(tmp_path):
    from speclabel.core.storage import filesystem_and_path
    from speclabel.pipeline.labelling.inputs import release_values

    fs, _ = filesystem_and_path(str(tmp_path))
    table = pa.table({"spectrum_id": ["a", "b", "c", "d"], "release": ["DR1", "DR1", "DR2", None]})
    pq.write_table(table, tmp_path / "grouped.parquet", row_group_size=2)  # groups: {DR1}, {DR2, null}
    assert release_values(fs, str(tmp_path / "grouped.parquet")) == {"DR1", "DR2"}
    pq.write_table(table.slice(1, 2), tmp_path / "mixed.parquet")  # one group holding DR1 and DR2
    assert release_values(fs, str(tmp_path / "mixed.parquet")) == {"DR1", "DR2"}


def test_unchanged_rows_are_carried_and_never_read(tiny_setup, tmp_path):
    """reuse_unchanged: rows equal (id and content hash) to a live row are left out of the read; a
    row group made only of such rows is not read at all; duplicates are never carried."""
    survey = simulate_chunk(tiny_setup, SurveyConfig(n=9, seed=4, chunk_size=9), 0)
    survey = pa.concat_tables([survey, survey.slice(0, 1)])  # row 9 repeats row 0 exactly
    sha = spectrum_sha256(spectra_arrays(survey, tiny_setup), tiny_setup)
    assert sha[9] == sha[0]
    pq.write_table(
        survey.append_column("input_sha256", pa.array(sha)), tmp_path / "in.parquet", row_group_size=4
    )
    ids = survey.column("spectrum_id").to_pylist()
    live = {ids[i]: sha[i] for i in range(8)}
    live[ids[5]] = sha[6]  # spectrum 5 changed since it was labelled; 8 is new
    source = ParquetInput.open(str(tmp_path / "in.parquet"), tiny_setup)
    source.scan_ids()
    assert source.carry_unchanged(live) == {ids[i] for i in (0, 1, 2, 3, 4, 6, 7)}
    (path,) = source.rows_by_source()
    assert source.carried[path].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert source.carried_by_source() == {path: 7}
    items = source.read_tasks()
    assert [item["row_group"] for item in items] == [1, 2]  # group 0 (rows 0-3) is not read
    rows = pa.concat_tables(read_spectra(pa.Table.from_pylist(items), source.fs, read_rows=3))
    assert rows.column("spectrum_id").to_pylist() == [ids[5], ids[8], ids[9]]
    assert rows.column(B.DUPLICATE).to_pylist() == [False, False, True]
    assert source.carry_unchanged({}) == set() and source.carried == {}


def test_pools_are_planned_on_the_cpus_free_now():
    # A submitted job's driver holds one of the head's CPUs for the whole run.
    total = {"CPU": 2.0, "memory": 1e9}
    usable = usable_resources(total, {"CPU": 1.0, "memory": 1e9})
    assert usable == {"CPU": 1.0, "memory": 1e9}
    plan = plan_resources(LabelOptions(), usable)
    assert plan.actors * plan.cpus_per_actor + plan.prepare_cpus <= 1.0
    assert usable_resources(total, {"CPU": 0.5}) == total  # work still finishing: plan on the total
    assert usable_resources({"CPU": 8.0, "GPU": 2.0}, {"CPU": 7.0, "GPU": 1.0}) == {"CPU": 7.0, "GPU": 2.0}
