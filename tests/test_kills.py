"""Hard kills: the real CLI in its own process, SIGKILLed at a chosen point (``SPECLABEL_FAULT=...!kill``:
nothing of the job runs after it, no ``finally``, no lock release), then run again.

Each time the published data must be the old release or the new one, never a mix, and the rerun
must take over the dead run's lock once it has not been renewed for ``--lock-timeout`` and publish
exactly once. The CLI joins the session's Ray instance (its driver dies, the cluster lives on, as on
a cluster whose submitting node was lost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from label_data import saved_model, spectra_file

from speclabel.core.arrays import spectra_arrays
from speclabel.core.fingerprints import spectrum_sha256
from speclabel.jobs.reprocess import ReprocessOptions, make_plan
from speclabel.pipeline.ingest import IngestOptions, run_ingest
from speclabel.pipeline.labelling import LabelOptions, label_spectra
from speclabel.pipeline.publish import Dataset

LOCK_TIMEOUT = "2"  # seconds: short, so that waiting out a dead run's lock (_dead_holder) costs little
LOCK_TIMEOUT = "2"  # seconds: a dead run's lock is stale by the time the rerun's process is up
KILLED = -signal.SIGKILL


def _cli(ray_session, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPECLABEL_FAULT"}
    if fault:
        env["SPECLABEL_FAULT"] = fault
    address = ray_session.get_runtime_context().gcs_address
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "speclabel.jobs.cli",
            *args,
            "--address",
            address,
            "--lock-timeout",
            LOCK_TIMEOUT,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _live(location: str, column: str) -> list:
    """``column`` of the live rows, from the index (as readers read) and from a bare listing (as
    pyarrow.dataset would): both must agree, sorted."""
    dataset = Dataset.open(location)
    by_index = sorted(
        v for f in dataset.live_files() for v in pq.read_table(f, columns=[column])[column].to_pylist()
    )
    listed = sorted(
        v
        for p in Path(location).glob("release=*/**/*.parquet")
        for v in pq.read_table(p, columns=[column])[column].to_pylist()
    )
    assert by_index == listed
    return by_index


def _runs(location: str, release: str) -> list[str]:
    """The runs that published ``release`` (one manifest each)."""
    return sorted(p.stem for p in Path(location, "_manifests", f"release={release}").glob("*.json"))


def _dead_holder(location: str) -> dict:
    """The lock a killed run left behind: still there, its process gone."""
    held = json.loads(Path(location, "_lock").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(held["pid"], 0)
    # The rerun takes the lock over only once it is stale. Its process start-up usually outlasts
    # the 2 s timeout, but not always (a CI run refused with "renewed 2 s ago"): wait it out here.
    time.sleep(max(0.0, float(held["renewed_at"]) + float(held["timeout_s"]) + 0.2 - time.time()))
    return held


def test_label_killed_before_publishing_and_with_a_worker_killed(tmp_path, tiny_setup, ray_session):
    model, _ = saved_model(tiny_setup, tmp_path / "model")
    spectra, catalogue = tmp_path / "spectra.parquet", str(tmp_path / "catalogue")
    old = spectra_file(tiny_setup, spectra, n=16, seed=1, row_group=8)
    label_spectra(str(spectra), model, catalogue, LabelOptions(release="DR1", batch_size=8, progress=False))
    old_sha = sorted(spectrum_sha256(spectra_arrays(old, tiny_setup), tiny_setup))
    assert _live(catalogue, "input_sha256") == old_sha
    (first_run,) = _runs(catalogue, "DR1")

    new = spectra_file(tiny_setup, spectra, n=24, seed=2, row_group=8)  # new content, more spectra
    new_sha = sorted(spectrum_sha256(spectra_arrays(new, tiny_setup), tiny_setup))
    args = ("label", "--spectra", str(spectra), "--model", model, "--out", catalogue, "--release", "DR1")
    args += ("--batch-size", "8", "--quiet")

    killed = _cli(ray_session, *args, fault="label.publish!kill")  # everything staged, nothing published
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    assert _live(catalogue, "input_sha256") == old_sha and _runs(catalogue, "DR1") == [first_run]
    assert any(Path(catalogue, "_staging").iterdir())
    dead = _dead_holder(catalogue)

    # The rerun takes the stale lock over, clears the dead run's staging and labels again, with each
    # actor SIGKILLed after its first batch: Ray restarts it, or the run fails and publishes nothing.
    rerun = _cli(ray_session, *args, fault="label.batch:batches=1!kill")
    assert rerun.returncode in (0, 1), rerun.stderr[-3000:]
    assert "took over the stale lock" in rerun.stderr and dead["run_id"] in rerun.stderr
    live = _live(catalogue, "input_sha256")
    assert live in (old_sha, new_sha)
    print(f"rerun with killed actors: exit {rerun.returncode}")
    if rerun.returncode == 1:
        assert live == old_sha and "nothing was published" in rerun.stderr
        assert _cli(ray_session, *args).returncode == 0

    assert _live(catalogue, "input_sha256") == new_sha
    runs = _runs(catalogue, "DR1")
    assert len(runs) == 2 and runs[0] == first_run  # published exactly once more
    assert Dataset.open(catalogue).release_entry("DR1")["run_id"] == runs[1] != dead["run_id"]
    assert not Path(catalogue, "_lock").exists() and not list(Path(catalogue, "_staging").glob("*"))
    again = label_spectra(
        str(spectra), model, catalogue, LabelOptions(release="DR1", batch_size=8, progress=False)
    )
    assert again.status == "up to date"


def test_ingest_killed_before_publishing(tmp_path, setup, ray_session):
    releases, store = tmp_path / "DR1", str(tmp_path / "store")
    releases.mkdir()
    old = spectra_file(setup, releases / "a.parquet", n=8, seed=1)
    run_ingest(str(releases), store, setup, IngestOptions(release="DR1"))
    assert _live(store, "spectrum_id") == sorted(old.column("spectrum_id").to_pylist())
    (first_run,) = _runs(store, "DR1")

    new = spectra_file(setup, releases / "a.parquet", n=12, seed=2)  # redelivered: new content, more rows
    args = ("ingest", str(releases), "--out", store, "--release", "DR1")
    killed = _cli(ray_session, *args, fault="ingest.publish!kill")
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    assert _live(store, "spectrum_id") == sorted(old.column("spectrum_id").to_pylist())
    assert _runs(store, "DR1") == [first_run]
    dead = _dead_holder(store)

    rerun = _cli(ray_session, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "took over the stale lock" in rerun.stderr and dead["run_id"] in rerun.stderr
    assert _live(store, "spectrum_id") == sorted(new.column("spectrum_id").to_pylist())
    stored = Dataset.open(store)
    fresh = pq.read_table(stored.live_files("DR1")).sort_by("spectrum_id")
    assert (
        fresh.column("flux_hr10").to_pylist()[0]
        != old.sort_by("spectrum_id").column("flux_hr10").to_pylist()[0]
    )
    runs = _runs(store, "DR1")
    assert len(runs) == 2 and runs[0] == first_run and stored.release_entry("DR1")["run_id"] == runs[1]
    assert not Path(store, "_lock").exists() and not list(Path(store, "_staging").glob("*"))
    assert run_ingest(str(releases), store, setup, IngestOptions(release="DR1")).skipped


def test_reprocess_killed_after_ingest(tmp_path, tiny_setup, ray_session):
    model, _ = saved_model(tiny_setup, tmp_path / "model")
    (tmp_path / "releases" / "DR1").mkdir(parents=True)
    table = spectra_file(tiny_setup, tmp_path / "releases" / "DR1" / "a.parquet", n=16, seed=3, row_group=8)
    store, catalogue = str(tmp_path / "store"), str(tmp_path / "catalogue")
    args = ("reprocess", "--releases", str(tmp_path / "releases"), "--store", store, "--catalogue", catalogue)
    args += ("--model", model, "--batch-size", "8", "--quiet")

    killed = _cli(ray_session, *args, fault="reprocess.after-ingest:release=DR1!kill")
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    assert _runs(store, "DR1") and not Path(catalogue, "_manifests").exists()  # ingested, not labelled
    records = str(Path(catalogue, "_reprocess"))
    dead = _dead_holder(records)
    assert dead["timeout_s"] == float(LOCK_TIMEOUT) and not list(Path(records).glob("*.json"))

    rerun = _cli(ray_session, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "took over the stale lock" in rerun.stderr and dead["run_id"] in rerun.stderr
    assert "DR1: labelled" in rerun.stdout and "ingested" not in rerun.stdout  # only what was missing
    assert len(_runs(store, "DR1")) == 1 and len(_runs(catalogue, "DR1")) == 1
    sha = sorted(spectrum_sha256(spectra_arrays(table, tiny_setup), tiny_setup))
    assert _live(catalogue, "input_sha256") == sha
    assert not Path(records, "_lock").exists() and len(list(Path(records).glob("*.json"))) == 1
    plan = make_plan(ReprocessOptions(str(tmp_path / "releases"), store, catalogue, model))
    assert not plan.work
