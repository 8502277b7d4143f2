"""The ingest job (pipeline/ingest/job.py, jobs/commands/ingest.py) end to end on a local Ray instance:
a mixed directory of good and bad files, and the round trip of `speclabel simulate --format fits`
through `speclabel ingest`."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from fits_fixtures import arm_file, giraffe_image, phase3_table, smooth_flux, write

from speclabel.core import contract
from speclabel.core.errors import InputError
from speclabel.core.faults import InjectedFault
from speclabel.core.reporting import Reporter, silent
from speclabel.jobs.cli import main
from speclabel.pipeline.ingest import SUMMARY_SCHEMA, IngestOptions, check_locations, run_ingest
from speclabel.pipeline.ingest.job import PassProgress, scan_counts, task_counts
from speclabel.pipeline.publish import Dataset
from speclabel.pipeline.resample import air_to_vacuum, vacuum_to_air
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk


def _mixed_directory(root, setup, small_survey):
    """Good and bad files of every kind, and the outcome each must end with."""
    hr10, hr21 = setup.arms
    expected = {}

    def add(name, data, outcome):
        expected[str(write(root / name, data))] = outcome

    add("A_hr10.fits", arm_file(hr10, snr=40.0, header={"CNAME": "A", "RA": 1.0, "DEC": 2.0}), ("used", None))
    add(
        "A_hr10_old.fits",
        arm_file(hr10, snr=20.0, header={"CNAME": "A"}),
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
    add("C_hr10.fits", arm_file(hr10, header={"CNAME": "C"}), ("quarantined", contract.MISSING_ARM))
    add(
        "D_truncated.fits",
        arm_file(hr10, header={"CNAME": "D"})[:-5000],
        ("quarantined", contract.CORRUPT_FILE),
    )
    add("garbage.fits", b"\x00not fits\x00" * 500, ("quarantined", contract.CORRUPT_FILE))
    add(
        "E_nowcs.fits",
        arm_file(hr10, header={"CNAME": "E"}).replace(b"CRVAL1  =", b"CRVALX  ="),
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
    captured = capsys.readouterr()
    printed = captured.out
    progress = captured.err.splitlines()  # each pass ends with a progress line, on stderr
    assert any(line.startswith("ingest DR1 scan: 14/14 files") for line in progress), progress
    assert any(line.startswith("ingest DR1: 13/13 spectra (7 quarantined), ") for line in progress), progress
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
    assert main([*argv, "--missing-arm", "mask", "--quiet"]) == 0
    assert "ingest DR1" not in capsys.readouterr().err
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


# -- progress, checks before Ray, the publish fault -------------------------------------------------


def _task_summary(stored: int, quarantined: int) -> pa.Table:
    """A summary block of one task: a row for its input file, and the task's counts."""
    return pa.Table.from_pylist(
        [
            {"task": 0, "path": "a.fits", "outcome": "used"},
            {"task": 0, "spectra_stored": stored, "spectra_quarantined": quarantined, "quarantine_rows": 0},
        ],
        schema=SUMMARY_SCHEMA,
    )


def test_progress_lines_come_every_10_s_and_at_the_end_of_a_pass():
    now = [0.0]
    lines = []
    reporter = Reporter(silent, progress_echo=lines.append, every_s=10.0, clock=lambda: now[0])
    progress = PassProgress(reporter, "ingest DR1", 40, "spectra")
    blocks = {4.0: (5, 0), 8.0: (5, 1), 12.0: (4, 0), 16.0: (5, 2), 24.0: (12, 1), 30.0: (5, 0)}
    for t, (stored, quarantined) in blocks.items():
        now[0] = t
        progress.add(*task_counts(_task_summary(stored, quarantined)))
    progress.finish()
    assert lines == [
        "ingest DR1: 15/40 spectra (1 quarantined), 1.25 spectra/s, ETA 0.3 min",  # at 12 s
        "ingest DR1: 35/40 spectra (4 quarantined), 1.46 spectra/s, ETA 0.1 min",  # at 24 s
        "ingest DR1: 40/40 spectra (4 quarantined), 1.33 spectra/s",  # the final line
    ]


def test_scan_progress_counts_files_and_the_refused_ones():
    from speclabel.pipeline.ingest import SCAN_SCHEMA

    block = pa.Table.from_pylist(
        [{"path": "a.fits"}, {"path": "b.fits", "reason": "corrupt_file: x"}, {"path": "c.fits"}],
        schema=SCAN_SCHEMA,
    )
    assert scan_counts(block) == (3, 1)


def test_locations_are_checked_before_any_work(tmp_path):
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "a.fits", b"")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="does not exist"):
        check_locations(str(tmp_path / "missing"), str(tmp_path / "store"))
    with pytest.raises(InputError, match=r"no .* files found"):
        check_locations(str(tmp_path / "empty"), str(tmp_path / "store"))
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_locations(str(tmp_path / "in"), str(tmp_path / "a_file"))
    with pytest.raises(InputError, match=r"cannot be created: .*a_file is a file"):
        check_locations(str(tmp_path / "in"), str(tmp_path / "a_file" / "store"))
    _, files = check_locations(str(tmp_path / "in"), str(tmp_path / "new" / "store"))
    assert [f.path for f in files] == [str(tmp_path / "in" / "a.fits")]
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.ray
def test_a_fault_just_before_publishing_leaves_the_release_unpublished(
    ray_session, tmp_path, setup, monkeypatch
):
    inputs, store = tmp_path / "in", tmp_path / "store"
    for arm in setup.arms:
        write(inputs / f"S_{arm.name}.fits", arm_file(arm, header={"CNAME": "S"}))
    options = IngestOptions(release="T")
    monkeypatch.setenv("SPECLABEL_FAULT", "ingest.publish:release=T")
    with pytest.raises(InjectedFault, match=r"ingest\.publish"):
        run_ingest(str(inputs), str(store), setup, options)
    ds = Dataset.open(str(store))
    assert ds.release_entry("T") is None and not (store / "release=T").exists()

    monkeypatch.delenv("SPECLABEL_FAULT")
    lines = []
    report = run_ingest(str(inputs), str(store), setup, options, reporter=Reporter(lines.append))
    assert ds.release_entry("T")["run_id"] == report.run_id and report.counts["spectra_stored"] == 1
    assert not any((store / "_staging").iterdir())  # the failed run's staging was recovered
    assert lines[-1].startswith("ingest T: 1/1 spectra, ")
    assert any(line.startswith("ingest T scan: 2/2 files, ") for line in lines), lines
