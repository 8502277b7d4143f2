"""The ingest job: per-file preparation, star assembly, Parquet pass-through, planning (no Ray), and
end to end on a local Ray instance: a mixed directory of good and bad files, and the round trip of
`speclabel simulate --format fits` through `speclabel ingest`."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from fits_fixtures import giraffe_image, phase3_table, smooth_flux, write

from speclabel.core import contract
from speclabel.core.arrays import spectra_arrays
from speclabel.core.fingerprints import spectrum_sha256
from speclabel.core.setups import SPEED_OF_LIGHT_KMS
from speclabel.jobs.cli import main
from speclabel.pipeline.fits_formats import Unusable
from speclabel.pipeline.ingest import (
    SCAN_SCHEMA,
    TASK_SCHEMA,
    IngestOptions,
    TaskContext,
    assemble_star,
    ingest_task,
    make_plan,
    pass_through,
    prepare_file,
    star_table,
)
from speclabel.pipeline.publish import Dataset
from speclabel.pipeline.resample import air_to_vacuum, to_rest_frame, vacuum_to_air
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk

OPTIONS = IngestOptions(release="T")


def _arm_file(arm, *, snr=50.0, header=None, **kwargs) -> bytes:
    """A normalised wcs1d spectrum covering ``arm``'s grid at S/N ``snr``."""
    return giraffe_image(
        smooth_flux(arm.wave),
        np.full(arm.n_pixels, 1.0 / snr),
        crval=arm.wave_start,
        step=arm.wave_step,
        header={"SETUP": arm.name.upper(), "SNR": snr, **(header or {})},
        **kwargs,
    )


def _reference_rebin(centres, flux, arm):
    """Mean of piecewise-constant flux over each arm pixel via its running integral (contiguous pixels)."""
    edges = np.concatenate([[1.5 * centres[0] - 0.5 * centres[1]], 0.5 * (centres[1:] + centres[:-1])])
    edges = np.append(edges, 1.5 * centres[-1] - 0.5 * centres[-2])
    integral = np.concatenate([[0.0], np.cumsum(flux * np.diff(edges))])
    lo, hi = arm.wave - arm.wave_step / 2, arm.wave + arm.wave_step / 2
    return (np.interp(hi, edges, integral) - np.interp(lo, edges, integral)) / arm.wave_step


# -- one file -------------------------------------------------------------------------------------


def test_vacuum_log_grid_in_nm_with_a_radial_velocity_lands_on_the_setup_grid(setup):
    """A -LOG vacuum spectrum in nm, observed at +75 km/s, against a direct numpy computation."""
    arm = setup.arm("hr10")
    rv = 75.0
    n = 5000
    crval_nm, step_nm = 534.0, 0.0059  # observed-frame vacuum wavelengths, logarithmic
    pixels = np.arange(1, n + 1)
    observed_vacuum_nm = crval_nm * np.exp(step_nm * (pixels - 1) / crval_nm)
    # Shifting before or after the medium conversion differs by 4e-9 of λ; ingest shifts in air.
    rest_air = to_rest_frame(vacuum_to_air(observed_vacuum_nm * 10.0), rv)
    flux = smooth_flux(rest_air)  # the star's lines sit at their rest air wavelengths
    data = giraffe_image(
        flux,
        np.full(n, 0.01),
        crval=crval_nm,
        step=step_nm,
        ctype="WAVE-LOG",
        cunit="nm",
        header={"VRAD": rv, "SPECSYS": "BARYCENT", "OBJECT": "x"},
    )
    prepared = prepare_file("x.fits", data, setup, IngestOptions(release="T", normalised="yes"))
    assert prepared.arm == "hr10"
    expected = _reference_rebin(rest_air, flux.astype(np.float32), arm)
    covered = (arm.wave - arm.wave_step > rest_air[0]) & (arm.wave + arm.wave_step < rest_air[-1])
    assert covered.sum() > 4000
    np.testing.assert_allclose(prepared.flux[covered], expected[covered], rtol=2e-6)
    assert np.all(
        prepared.ivar[~covered & ((arm.wave < rest_air[0] - 0.1) | (arm.wave > rest_air[-1] + 0.1))] == 0
    )
    # The Mg I line is back at its rest air wavelength.
    window = np.abs(arm.wave - 5528.4) < 1.0
    assert arm.wave[window][np.argmin(prepared.flux[window])] == pytest.approx(5528.4, abs=arm.wave_step)
    # Without the shift (or with SPECSYS = SOURCE) the line stays where it was observed.
    unshifted = prepare_file(
        "x.fits", data, setup, IngestOptions(release="T", normalised="yes", rv_shift=False)
    )
    observed = 5528.4 * (1 + rv / SPEED_OF_LIGHT_KMS)
    window = np.abs(arm.wave - observed) < 1.0
    assert arm.wave[window][np.argmin(unshifted.flux[window])] == pytest.approx(observed, abs=arm.wave_step)


def test_unnormalised_phase3_flux_is_continuum_normalised(setup):
    arm = setup.arm("hr21")
    wave_nm = air_to_vacuum(arm.wave) / 10.0  # a vacuum table: no obs.atmos in the UCD
    x = (arm.wave - arm.wave.mean()) / (arm.wave[-1] - arm.wave[0])
    continuum = 2e-15 * (1 + 0.4 * x - 0.3 * x**2)
    normalised = smooth_flux(arm.wave)
    data = phase3_table(
        wave_nm,
        {"FLUX": continuum * normalised, "ERR": continuum * normalised / 200.0},
        wave_ucd="em.wl",
        header={"OBJECT": "y", "SNR": 200.0, "SPEC_RES": 17000.0, "CONTNORM": False},
    )
    prepared = prepare_file("y.fits", data, setup, IngestOptions(release="T", default_medium="vacuum"))
    assert prepared.arm == "hr21" and not prepared.normalised_input
    good = prepared.ivar > 0
    assert good.mean() > 0.99
    np.testing.assert_allclose(prepared.flux[good], normalised[good], atol=0.01)


@pytest.mark.parametrize(
    ("header", "wave_start", "reason"),
    [
        ({"SETUP": "U580", "INSTRUME": "UVES"}, 5339.0, contract.WRONG_SETUP),
        ({"SETUP": "HR21"}, 5339.0, contract.NO_OVERLAP),  # the header says HR21, the WCS says HR10
        ({"SPEC_RES": 47000.0, "INSTRUME": "UVES"}, 5339.0, contract.WRONG_RESOLUTION),
        ({}, 6000.0, contract.NO_OVERLAP),
        ({}, 5500.0, contract.NO_OVERLAP),  # covers only 43 % of HR10 and names no setup
    ],
)
def test_files_of_other_setups_and_instruments_are_refused(setup, header, wave_start, reason):
    data = giraffe_image(np.ones(5601), np.full(5601, 0.01), crval=wave_start, step=0.05, header=header)
    with pytest.raises(Unusable) as info:
        prepare_file("z.fits", data, setup, OPTIONS)
    assert info.value.reason == reason, info.value.detail


def test_arm_from_header_then_from_coverage(setup):
    hr21 = setup.arm("hr21")
    data = giraffe_image(
        np.ones(hr21.n_pixels), np.full(hr21.n_pixels, 0.01), crval=hr21.wave_start, step=0.05
    )
    assert prepare_file("a.fits", data, setup, OPTIONS).arm == "hr21"
    declared = _arm_file(hr21, header={"SETUP": "hr21"})
    assert prepare_file("b.fits", declared, setup, OPTIONS).arm == "hr21"


# -- one star -------------------------------------------------------------------------------------


def test_duplicates_keep_the_highest_snr(setup):
    hr10, hr21 = setup.arms
    files = [
        ("low.fits", _arm_file(hr10, snr=30.0)),
        ("high.fits", _arm_file(hr10, snr=80.0)),
        ("red.fits", _arm_file(hr21, snr=60.0)),
        ("broken.fits", Unusable(contract.CORRUPT_FILE, "cannot read")),
    ]
    star = assemble_star("S1", files, setup, OPTIONS)
    assert star.arms["hr10"].path == "high.fits" and star.arms["hr21"].path == "red.fits"
    reasons = {source: reason for reason, source in star.quarantine}
    assert set(reasons) == {"low.fits", "broken.fits"}
    assert reasons["low.fits"].startswith(
        "duplicate: a second hr10 spectrum of S1 (S/N 30.0); kept high.fits"
    )
    table = star_table([star], setup)
    assert table.column(contract.SOURCE_FILES).to_pylist() == [["high.fits", "red.fits"]]
    assert table.column("snr").to_pylist() == [80.0]
    assert all(r is None for r in contract.validate(table, setup))


def test_missing_arm_quarantines_or_masks(setup):
    files = [("blue.fits", _arm_file(setup.arm("hr10"), header={"RA": 10.5, "DEC": -3.0}))]
    quarantined = assemble_star("S2", files, setup, OPTIONS)
    assert not quarantined.stored
    assert [contract.reason_code(r) for r, _ in quarantined.quarantine] == [contract.MISSING_ARM]
    masked = assemble_star("S2", files, setup, IngestOptions(release="T", missing_arm="mask"))
    table = star_table([masked], setup)
    arrays = spectra_arrays(table, setup)
    assert np.all(arrays.ivar["hr21"] == 0) and np.all(np.isnan(arrays.flux["hr21"]))
    assert (arrays.ivar["hr10"] > 0).all()
    assert table.column("ra").to_pylist() == [10.5]
    assert all(r is None for r in contract.validate(table, setup))
    expected_hash = spectrum_sha256(arrays, setup)
    assert table.column(contract.INPUT_SHA256).to_pylist() == expected_hash


# -- Parquet pass-through and the plan -----------------------------------------------------------


def test_pass_through_keeps_good_rows_exactly_and_quarantines_the_rest(setup, small_survey):
    table = small_survey.slice(0, 6)
    flux = table.column("flux_hr10").to_pylist()
    ivar = table.column("ivar_hr10").to_pylist()
    flux[2][100] = float("nan")  # at an unmasked pixel
    ivar[2][100] = 1.0
    table = table.set_column(
        table.schema.get_field_index("flux_hr10"),
        "flux_hr10",
        pa.array(flux, table.schema.field("flux_hr10").type),
    )
    table = table.set_column(
        table.schema.get_field_index("ivar_hr10"),
        "ivar_hr10",
        pa.array(ivar, table.schema.field("ivar_hr10").type),
    )
    stored, refused = pass_through(table, "in.parquet", 100, [4], setup)
    assert stored.schema.equals(contract.store_schema(setup), check_metadata=True)
    assert stored.column("spectrum_id").to_pylist() == [table["spectrum_id"][i].as_py() for i in (0, 1, 3, 5)]
    assert refused.column("reason").to_pylist() == [contract.NONFINITE_FLUX, contract.DUPLICATE_ID]
    assert refused.column("detail")[1].as_py().endswith("(row 104)")
    original = spectra_arrays(table.take([0, 1, 3, 5]), setup)
    kept = spectra_arrays(stored, setup)
    for arm in setup.arms:
        np.testing.assert_array_equal(kept.flux[arm.name], original.flux[arm.name])
        np.testing.assert_array_equal(kept.ivar[arm.name], original.ivar[arm.name])
    assert stored.column(contract.INPUT_SHA256).to_pylist() == spectrum_sha256(original, setup)
    no_ivar = table.drop_columns(["ivar_hr10", "ivar_hr21"]).slice(0, 2)
    stored, _ = pass_through(no_ivar, "in.parquet", 0, [], setup)
    assert np.all(spectra_arrays(stored, setup).ivar["hr10"] == 1.0)


def test_plan_groups_star_files_and_marks_later_duplicate_ids():
    rows = [
        {"path": "/d/a_hr21.fits", "kind": "fits", "spectrum_id": "A"},
        {"path": "/d/a_hr10.fits", "kind": "fits", "spectrum_id": "A"},
        {"path": "/d/b.fits", "kind": "fits", "spectrum_id": "B"},
        {"path": "/d/bad.fits", "kind": "fits", "reason": "corrupt_file: no END card"},
        {
            "path": "/d/x.parquet",
            "kind": "parquet",
            "ids": ["P1", "A", "P2", "P1", "P3"],
            "row_groups": [3, 2],
        },
        {"path": "/d/w.parquet", "kind": "parquet", "ids": ["P3", "P4"], "row_groups": [2]},
    ]
    scan = pa.Table.from_pylist(rows, schema=SCAN_SCHEMA)
    plan = make_plan(scan, IngestOptions(release="T", stars_per_task=1))
    units = [t.to_pylist() for t in plan.tasks]
    assert [u[0]["task"] for u in units] == list(range(5))
    assert units[0][0]["spectrum_id"] == "A" and units[0][0]["paths"] == ["/d/a_hr10.fits", "/d/a_hr21.fits"]
    assert units[1][0]["paths"] == ["/d/b.fits"]
    # w.parquet sorts first, so its P3 wins; in x.parquet "A" is a FITS star, P1 repeats, P3 was seen.
    assert [(u[0]["paths"], u[0]["row_group"], u[0]["duplicate_rows"]) for u in units[2:]] == [
        (["/d/w.parquet"], 0, []),
        (["/d/x.parquet"], 0, [1]),
        (["/d/x.parquet"], 1, [0, 1]),
    ]
    assert units[4][0]["row_offset"] == 3
    assert plan.spectra_in == 2 + 7
    assert plan.rejected.column("reason").to_pylist() == [contract.CORRUPT_FILE]


# -- end to end on Ray ----------------------------------------------------------------------------


def _mixed_directory(root, setup, small_survey):
    """Good and bad files of every kind, and the outcome each must end with."""
    hr10, hr21 = setup.arms
    expected = {}

    def add(name, data, outcome):
        expected[str(write(root / name, data))] = outcome

    add(
        "A_hr10.fits", _arm_file(hr10, snr=40.0, header={"CNAME": "A", "RA": 1.0, "DEC": 2.0}), ("used", None)
    )
    add(
        "A_hr10_old.fits",
        _arm_file(hr10, snr=20.0, header={"CNAME": "A"}),
        ("quarantined", contract.DUPLICATE),
    )
    nm = giraffe_image(
        smooth_flux(hr21.wave),
        np.full(hr21.n_pixels, 1e-4),
        crval=hr21.wave_start / 10,
        step=hr21.wave_step / 10,
        cunit="nm",
        use_cd=True,
        uncertainty_kind="VARIANCE",
        header={"CNAME": "A", "SETUP": "HR21"},
    )
    add("sub/A_hr21.fits", nm, ("used", None))
    blue_nm = hr10.wave / 10.0
    add(
        "B_blue.fits",
        phase3_table(
            blue_nm,
            {"FLUX": smooth_flux(hr10.wave), "ERR": np.full(hr10.n_pixels, 0.02)},
            flux_unit="",
            header={"OBJECT": "B", "SNR": 50.0},
        ),
        ("used", None),
    )
    red_vacuum = air_to_vacuum(np.array([hr21.wave_start]))[0] + 0.05 * np.arange(hr21.n_pixels)
    red = giraffe_image(
        smooth_flux(vacuum_to_air(red_vacuum)),
        np.full(hr21.n_pixels, 0.02),
        crval=red_vacuum[0],
        step=0.05,
        ctype="WAVE",
        header={"OBJECT": "B"},
    )
    add("B_red.fits.gz", gzip.compress(red), ("used", None))
    add("C_hr10.fits", _arm_file(hr10, header={"CNAME": "C"}), ("quarantined", contract.MISSING_ARM))
    add(
        "D_truncated.fits",
        _arm_file(hr10, header={"CNAME": "D"})[:-5000],
        ("quarantined", contract.CORRUPT_FILE),
    )
    add("garbage.fits", b"\x00not fits\x00" * 500, ("quarantined", contract.CORRUPT_FILE))
    add(
        "E_nowcs.fits",
        _arm_file(hr10, header={"CNAME": "E"}).replace(b"CRVAL1  =", b"CRVALX  ="),
        ("quarantined", contract.MISSING_WCS),
    )
    add(
        "F_freq.fits",
        giraffe_image(
            np.ones(100),
            np.full(100, 0.01),
            crval=5.5e14,
            step=1e9,
            ctype="FREQ",
            cunit="Hz",
            header={"CNAME": "F"},
        ),
        ("quarantined", contract.WRONG_UNITS),
    )
    add(
        "uves.fits",
        giraffe_image(
            np.ones(20000),
            np.full(20000, 0.01),
            crval=4800.0,
            step=0.1,
            header={"CNAME": "G", "SETUP": "U580", "INSTRUME": "UVES"},
        ),
        ("quarantined", contract.WRONG_SETUP),
    )
    add(
        "infrared.fits",
        giraffe_image(np.ones(2000), np.full(2000, 0.01), crval=15100.0, step=0.2, header={"CNAME": "H"}),
        ("quarantined", contract.NO_OVERLAP),
    )
    rows = small_survey.slice(0, 5)
    flux = rows.column("flux_hr21").to_pylist()
    flux[3][7] = float("inf")
    rows = rows.set_column(
        rows.schema.get_field_index("flux_hr21"),
        "flux_hr21",
        pa.array(flux, rows.schema.field("flux_hr21").type),
    )
    pq.write_table(rows, root / "survey.parquet", row_group_size=2)
    expected[str(root / "survey.parquet")] = ("used", None)
    pq.write_table(small_survey.select(["spectrum_id", "teff"]), root / "labels_only.parquet")
    expected[str(root / "labels_only.parquet")] = ("quarantined", contract.WRONG_SCHEMA)
    return expected, rows


@pytest.mark.ray
def test_mixed_directory_ends_with_every_file_accounted_for(
    ray_session, tmp_path, setup, small_survey, capsys
):
    inputs, store = tmp_path / "in", tmp_path / "store"
    expected, parquet_rows = _mixed_directory(inputs, setup, small_survey)
    argv = ["ingest", str(inputs), "--out", str(store), "--release", "DR1", "--stars-per-task", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    used = sum(1 for outcome, _ in expected.values() if outcome == "used")
    assert used == 5 and len(expected) == 14
    assert "spectra: 13 in = 6 stored + 7 quarantined" in printed  # stars A-H and 5 Parquet rows
    assert f"files:   14 in = {used} used + {14 - used} quarantined" in printed

    ds = Dataset.open(str(store))
    entry = ds.release_entry("DR1")
    manifest = ds.manifest("DR1", entry["run_id"])
    counts = manifest["counts"]
    assert counts["files_in"] == counts["files_used"] + counts["files_quarantined"] == len(expected)
    assert counts["spectra_in"] == counts["spectra_stored"] + counts["spectra_quarantined"]
    inputs_table = pq.read_table(store / manifest["inputs_table"]).to_pylist()
    outcomes = {r["path"]: (r["outcome"], r["reason"]) for r in inputs_table}
    assert outcomes == expected
    for row in inputs_table:
        assert row["size"] > 0 and len(row["sha256"]) == 64, row

    live = pads.dataset(str(store), partitioning="hive").to_table()
    ids = sorted(live.column("spectrum_id").to_pylist())
    survey_ids = parquet_rows.column("spectrum_id").to_pylist()
    assert ids == sorted(["A", "B", *(survey_ids[i] for i in (0, 1, 2, 4))])
    assert set(live.column("release").to_pylist()) == {"DR1"}
    assert all(r is None for r in contract.validate(live, setup))
    star_a = live.filter(pc.equal(live["spectrum_id"], "A")).to_pylist()[0]
    assert star_a["source_files"] == [str(inputs / "A_hr10.fits"), str(inputs / "sub/A_hr21.fits")]
    assert (star_a["ra"], star_a["dec"], star_a["snr"]) == (1.0, 2.0, 40.0)
    for arm in setup.arms:  # both normalised arms come back as the function they sampled
        np.testing.assert_allclose(star_a[arm.flux_column], smooth_flux(arm.wave), atol=2e-6)
    star_b = live.filter(pc.equal(live["spectrum_id"], "B")).to_pylist()[0]
    for arm in setup.arms:  # a Phase 3 table in nm (air) and a gzipped vacuum image
        flux, ivar = np.array(star_b[arm.flux_column]), np.array(star_b[arm.ivar_column])
        assert (ivar > 0).sum() >= arm.n_pixels - 3  # the vacuum grid ends 0.14 Å short in air
        np.testing.assert_allclose(flux[ivar > 0], smooth_flux(arm.wave)[ivar > 0], atol=2e-3)

    quarantine = pads.dataset(str(store / manifest["quarantine"]["dir"])).to_table().to_pylist()
    assert sum(manifest["quarantine"]["by_reason"].values()) == len(quarantine) == counts["quarantine_rows"]
    by_source = {r["source"]: r for r in quarantine}
    assert by_source[str(inputs / "survey.parquet")]["reason"] == contract.NONFINITE_FLUX
    assert by_source[str(inputs / "A_hr10_old.fits")]["spectrum_id"] == "A"
    assert by_source[str(inputs / "garbage.fits")]["spectrum_id"] is None
    assert "U580" in by_source[str(inputs / "uves.fits")]["detail"]

    # The same inputs again: nothing to do. Changed options: a new run. --force: a new run.
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert ds.release_entry("DR1")["run_id"] == entry["run_id"]
    assert main([*argv, "--missing-arm", "mask"]) == 0
    masked_run = ds.release_entry("DR1")["run_id"]
    assert masked_run != entry["run_id"]
    assert "C" in pads.dataset(str(store), partitioning="hive").to_table().column("spectrum_id").to_pylist()
    assert main([*argv, "--missing-arm", "mask", "--force"]) == 0
    assert ds.release_entry("DR1")["run_id"] != masked_run
    assert (store / "_versions" / "release=DR1" / entry["run_id"]).is_dir()
    assert not (store / "_staging").exists() or not any((store / "_staging").iterdir())


@pytest.mark.ray
def test_simulate_fits_round_trips_through_ingest(ray_session, tmp_path, setup):
    sim, store = tmp_path / "sim", tmp_path / "store"
    assert (
        main(
            [
                "simulate",
                "--n",
                "7",
                "--seed",
                "9",
                "--chunk-size",
                "4",
                "--format",
                "fits",
                "--out",
                str(sim),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert main(["ingest", str(sim / "spectra"), "--out", str(store), "--release", "SIM"]) == 0
    live = pads.dataset(str(store), partitioning="hive").to_table()
    truth = pq.read_table(sim / "labels.parquet")
    assert sorted(live.column("spectrum_id").to_pylist()) == sorted(truth.column("spectrum_id").to_pylist())
    survey = pa.concat_tables(
        [simulate_chunk(setup, SurveyConfig(n=7, seed=9, chunk_size=4), c) for c in range(2)]
    )
    by_object = {row["object"]: row for row in live.to_pylist()}
    assert len(by_object) == 7
    for original in survey.to_pylist():
        stored = by_object[original["spectrum_id"]]  # OBJECT holds the simulator's id
        assert stored["spectrum_id"] == original["object"]  # CNAME
        assert (stored["ra"], stored["dec"]) == (original["ra"], original["dec"])
        assert stored["snr"] == pytest.approx(original["snr"], rel=1e-4)
        for arm in setup.arms:
            flux, ivar = np.array(original[arm.flux_column]), np.array(original[arm.ivar_column])
            out_flux, out_ivar = np.array(stored[arm.flux_column]), np.array(stored[arm.ivar_column])
            np.testing.assert_array_equal(out_ivar > 0, ivar > 0)
            good = ivar > 0
            np.testing.assert_allclose(out_flux[good], flux[good], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out_ivar[good], ivar[good], rtol=1e-5)
    manifest = json.loads((store / Dataset.open(str(store)).release_entry("SIM")["manifest"]).read_text())
    assert manifest["counts"]["spectra_stored"] == 7 and manifest["counts"]["files_quarantined"] == 0


def test_a_parquet_file_damaged_after_the_scan_is_quarantined_not_fatal(tmp_path, setup, small_survey):
    path = tmp_path / "survey.parquet"
    pq.write_table(small_survey.slice(0, 3), path)
    units = pa.Table.from_pylist(
        [{"task": 0, "kind": "parquet", "paths": [str(path)], "row_group": 0, "row_offset": 0, "n_rows": 3}],
        schema=TASK_SCHEMA,
    )
    path.write_bytes(b"PAR1 overwritten by a half-finished copy")
    fs = pafs.LocalFileSystem()
    ctx = TaskContext(fs, fs, setup, OPTIONS, "run", str(tmp_path / "stage"), str(tmp_path / "q"))
    output = ingest_task(units, ctx)
    assert output.store_rows.num_rows == 0 and output.spectra_quarantined == 3
    assert output.quarantine_rows.column("reason").to_pylist() == [contract.CORRUPT_FILE]
    assert output.files == [
        {"path": str(path), "sha256": None, "outcome": "quarantined", "reason": "corrupt_file"}
    ]


def test_an_unexpected_decoding_error_quarantines_the_file_not_the_run(setup, monkeypatch):
    from speclabel.pipeline import ingest

    real = ingest.prepare_file

    def flaky(path, data, setup, options):
        if path == "odd.fits":
            raise ZeroDivisionError("an astropy corner case")
        return real(path, data, setup, options)

    monkeypatch.setattr(ingest, "prepare_file", flaky)
    files = [
        ("odd.fits", b""),
        ("red.fits", _arm_file(setup.arm("hr21"))),
        ("blue.fits", _arm_file(setup.arm("hr10"))),
    ]
    star = assemble_star("S3", files, setup, OPTIONS)
    assert star.stored and set(star.arms) == {"hr10", "hr21"}
    assert star.quarantine == [("decode_error: ZeroDivisionError: an astropy corner case", "odd.fits")]


@pytest.mark.shared_data
def test_shared_training_spectra_pass_through_and_survive_a_fits_round_trip(shared_data, setup, tmp_path):
    from speclabel.pipeline.fits_formats import write_wcs1d
    from speclabel.pipeline.ingest import scan_block

    path = str(shared_data / "giraffe_synth_train.parquet")
    fs = pafs.LocalFileSystem()
    plan = make_plan(scan_block(pa.table({"path": [path]}), fs=fs, setup=setup), OPTIONS)
    ctx = TaskContext(fs, fs, setup, OPTIONS, "run", str(tmp_path / "stage"), str(tmp_path / "q"))
    outputs = [ingest_task(task, ctx) for task in plan.tasks]
    stored = pa.concat_tables([o.store_rows for o in outputs])
    # The shared set grows between releases of it: compare with the file, never a fixed count.
    n_rows = pq.read_metadata(path).num_rows
    assert stored.num_rows + sum(o.spectra_quarantined for o in outputs) == plan.spectra_in == n_rows
    assert stored.num_rows == n_rows
    original = pq.read_table(path).slice(0, 4)
    arrays = spectra_arrays(original, setup)
    np.testing.assert_array_equal(spectra_arrays(stored.slice(0, 4), setup).flux["hr21"], arrays.flux["hr21"])

    # The same spectra as Gaia-ESO-like FITS files (observed at -80 km/s) come back on the same grid.
    for k, sid in enumerate(original.column("spectrum_id").to_pylist()):
        files = []
        for arm in setup.arms:
            ivar = arrays.ivar[arm.name][k]
            sigma = np.where(ivar > 0, 1 / np.sqrt(np.where(ivar > 0, ivar, 1)), 0)
            scale = 1 - 80.0 / SPEED_OF_LIGHT_KMS
            cards = {"CNAME": sid, "SETUP": arm.name.upper(), "VRAD": -80.0}
            data = write_wcs1d(
                arrays.flux[arm.name][k],
                sigma,
                wave_start=arm.wave_start * scale,
                wave_step=arm.wave_step * scale,
                medium="air",
                cards=cards,
            )
            files.append((f"{sid}_{arm.name}.fits", data))
        star = assemble_star(sid, files, setup, OPTIONS)
        assert star.stored, star.quarantine
        for arm in setup.arms:
            good = arrays.ivar[arm.name][k] > 0
            np.testing.assert_array_equal(star.arms[arm.name].ivar > 0, good)
            np.testing.assert_allclose(
                star.arms[arm.name].flux[good], arrays.flux[arm.name][k][good], rtol=1e-5, atol=1e-6
            )
