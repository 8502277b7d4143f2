"""`speclabel reprocess` on the real local Ray instance: one survey's history (a first release, a
rerun, a new release whose run crashes after ingest and is rerun, a changed spectrum, a new model),
with the store and the catalogue snapshotted after each run; then the lock and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from label_data import saved_model, spectra_file

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.errors import InputError
from speclabel.core.faults import FAULT_ENV, InjectedFault
from speclabel.core.fingerprints import spectrum_sha256
from speclabel.jobs import submit as sub
from speclabel.jobs.cli import main
from speclabel.jobs.reprocess import (
    ReprocessOptions,
    make_plan,
    records,
    run_reprocess,
)
from speclabel.pipeline.labelling import LabelOptions
from speclabel.pipeline.labelling.inputs import ParquetInput
from speclabel.pipeline.publish import Dataset, LockedError

pytestmark = pytest.mark.ray
LABELS = ("teff", "logg", "feh", "mgfe", "alfe")


def _no_ray() -> None:
    raise AssertionError("an up-to-date run must not start Ray")


def _snapshot(options: ReprocessOptions) -> dict:
    """Index, every file with its modification time, and the live catalogue rows by release."""
    out: dict = {}
    for name, location in (("store", options.store), ("catalogue", options.catalogue)):
        base = Path(location)
        out[name] = {
            "index": Dataset.open(location).index(),
            "files": {
                str(p.relative_to(base)): p.stat().st_mtime_ns
                for p in base.rglob("*")
                if p.is_file() and "_reprocess" not in p.parts
            },
        }
    live = pads.dataset(options.catalogue, partitioning="hive").to_table()
    out["live"] = {
        release: live.filter(pc.equal(live.column("release"), release)).sort_by("spectrum_id")
        for release in set(live.column("release").to_pylist())
    }
    folder = Path(options.catalogue) / "_reprocess"
    out["records"] = sorted(p.name for p in folder.glob("*.json"))
    return out


def _files(snapshot: dict, dataset: str, release: str) -> dict:
    """The files of one release in one dataset (live, manifests, versions, side outputs)."""
    return {k: v for k, v in snapshot[dataset]["files"].items() if f"release={release}" in k}


def _record(options: ReprocessOptions, run_id: str) -> dict:
    return json.loads((Path(options.catalogue) / "_reprocess" / f"{run_id}.json").read_text())


def _steps(record: dict) -> dict:
    return {step["release"]: step for step in record["steps"]}


@pytest.fixture(scope="module")
def history(tmp_path_factory, tiny_setup, ray_session):
    root = tmp_path_factory.mktemp("reprocess")
    releases = root / "releases"
    (releases / "DR1").mkdir(parents=True)
    (releases / "DR9").mkdir()  # announced, files not delivered yet
    (releases / "_incoming").mkdir()  # not a release: skipped like every _ or . folder
    model, ensemble = saved_model(tiny_setup, root / "model", seed=0)
    new_model, new_ensemble = saved_model(tiny_setup, root / "model-v2", seed=1)
    dr1 = spectra_file(tiny_setup, releases / "DR1" / "a.parquet", n=16, seed=1, row_group=8)
    options = ReprocessOptions(
        str(releases),
        str(root / "store"),
        str(root / "catalogue"),
        model,
        label=LabelOptions(batch_size=8, progress=False),
    )
    h = {"options": options, "ensemble": ensemble, "new_ensemble": new_ensemble, "dr1": dr1}

    h["first"] = run_reprocess(options)
    h["after_first"] = _snapshot(options)
    h["second"] = run_reprocess(options, ensure_ray=_no_ray)
    h["after_second"] = _snapshot(options)

    # A new release: 12 spectra, one repeating the id of another (quarantined by ingest).
    (releases / "DR2").mkdir()
    dr2 = spectra_file(tiny_setup, releases / "DR2" / "b.parquet", n=12, seed=2, release="DR2")
    ids = dr2.column("spectrum_id").to_pylist()
    ids[7] = ids[2]
    pq.write_table(dr2.set_column(0, "spectrum_id", pa.array(ids)), releases / "DR2" / "b.parquet")
    os.environ[FAULT_ENV] = "reprocess.after-ingest:release=DR2"
    try:
        with pytest.raises(InjectedFault):
            run_reprocess(options)
    finally:
        del os.environ[FAULT_ENV]
    h["after_crash"] = _snapshot(options)
    h["plan_after_crash"] = make_plan(options)
    h["rerun"] = run_reprocess(options)
    h["after_rerun"] = _snapshot(options)

    # DR1 redelivered: spectrum 3's flux changed, spectrum 5 withdrawn, one new spectrum.
    extra = spectra_file(tiny_setup, root / "extra.parquet", n=1, seed=3)
    extra = extra.set_column(0, "spectrum_id", pa.array(["DR1-new"]))
    arm = tiny_setup.arms[0]
    column = dr1.schema.get_field_index(arm.flux_column)
    flux = dr1.column(column).to_pylist()
    flux[3] = [v * 1.05 for v in flux[3]]
    changed = dr1.set_column(column, dr1.schema.field(column), pa.array(flux, dr1.schema.field(column).type))
    changed = pa.concat_tables([changed.slice(0, 5), changed.slice(6), extra.cast(changed.schema)])
    pq.write_table(changed, releases / "DR1" / "a.parquet", row_group_size=8)
    h["changed_table"] = changed
    h["changed"] = run_reprocess(options)
    h["after_change"] = _snapshot(options)

    h["new_model_options"] = dataclasses.replace(options, model=new_model)
    h["new_model"] = run_reprocess(h["new_model_options"])
    h["after_new_model"] = _snapshot(options)
    return h


def test_two_runs_in_a_row_do_the_work_once(history):
    options, first = history["options"], history["first"]
    assert first.status == "done"
    steps = _steps(_record(options, first.run_id))
    assert steps["DR1"]["ingest_reason"] == "new release" and steps["DR1"]["label"]["labelled"] == 16
    assert steps["DR9"]["status"] == "skipped" and "_incoming" not in steps
    assert history["second"].status == "up to date"
    before, after = history["after_first"], history["after_second"]
    for dataset in ("store", "catalogue"):
        assert after[dataset] == before[dataset]  # index, manifests, versions, file times
    assert after["records"] == before["records"] == [f"{first.run_id}.json"]
    assert not any("_versions" in f for f in after["catalogue"]["files"])


def test_a_run_killed_after_ingest_and_rerun_publishes_exactly_once(history):
    crashed, rerun = history["after_crash"], history["after_rerun"]
    # The crash left the ingested store release and an untouched catalogue, no record, no lock.
    assert "DR2" in crashed["store"]["index"]["releases"]
    assert crashed["catalogue"] == history["after_second"]["catalogue"]
    assert crashed["records"] == history["after_second"]["records"]
    assert not (Path(history["options"].catalogue) / "_reprocess" / "_lock").exists()
    assert [step.describe() for step in history["plan_after_crash"].work] == [
        "DR2: label (not in the catalogue)"
    ]
    # The rerun labelled DR2 once, from the store as the crashed run ingested it.
    assert rerun["store"] == crashed["store"]
    entry = rerun["catalogue"]["index"]["releases"]["DR2"]
    manifests = [f for f in _files(rerun, "catalogue", "DR2") if f.startswith("_manifests/")]
    assert manifests == [f"_manifests/release=DR2/{entry['run_id']}.json"]
    assert not any(f.startswith("_versions/") for f in _files(rerun, "catalogue", "DR2"))
    store_counts = Dataset.open(history["options"].store).manifest(
        "DR2", crashed["store"]["index"]["releases"]["DR2"]["run_id"]
    )["counts"]
    assert store_counts["spectra_in"] == 12 and store_counts["spectra_quarantined"] == 1
    ids = rerun["live"]["DR2"].column("spectrum_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12 - 1 == entry["rows"]


def test_a_new_release_is_picked_up_and_only_it_is_processed(history):
    options, before, after = history["options"], history["after_second"], history["after_rerun"]
    steps = _steps(_record(options, history["rerun"].run_id))
    assert steps["DR1"]["status"] == "up to date" and "label" not in steps["DR1"]
    assert steps["DR2"]["status"] == "done"
    for dataset in ("store", "catalogue"):
        assert after[dataset]["index"]["releases"]["DR1"] == before[dataset]["index"]["releases"]["DR1"]
        assert _files(after, dataset, "DR1") == _files(before, dataset, "DR1")  # not even rewritten
    assert after["live"]["DR1"].equals(before["live"]["DR1"])


def test_a_changed_spectrum_is_relabelled_alone(history, tiny_setup):
    options, before, after = history["options"], history["after_rerun"], history["after_change"]
    changed = _steps(_record(options, history["changed"].run_id))
    assert changed["DR1"]["ingest_reason"] == "delivered files changed"
    assert changed["DR2"]["status"] == "up to date"
    label = changed["DR1"]["label"]
    assert (label["labelled"], label["carried"], label["quarantined"]) == (2, 14, 0)

    old, new = before["live"]["DR1"], after["live"]["DR1"]
    expected_ids = sorted(history["changed_table"].column("spectrum_id").to_pylist())
    assert new.column("spectrum_id").to_pylist() == expected_ids  # the withdrawn spectrum dropped out
    relabelled = {history["dr1"].column("spectrum_id")[3].as_py(), "DR1-new"}
    kept_ids = pa.array(sorted(set(expected_ids) - relabelled))
    # Unchanged spectra keep their rows exactly (labels, run id, time stamp).
    kept_new = new.filter(pc.is_in(new.column("spectrum_id"), value_set=kept_ids))
    kept_old = old.filter(pc.is_in(old.column("spectrum_id"), value_set=kept_ids))
    assert kept_new.drop_columns(["healpix"]).equals(kept_old.drop_columns(["healpix"]))
    # The relabelled rows come from the new run and equal the in-process ensemble on the new flux.
    fresh = new.filter(pc.is_in(new.column("spectrum_id"), value_set=pa.array(sorted(relabelled))))
    assert set(fresh.column("run_id").to_pylist()) == {label["run_id"]}
    table = history["changed_table"]
    table = table.take(pc.index_in(fresh.column("spectrum_id"), value_set=table.column("spectrum_id")))
    arrays = spectra_arrays(table, tiny_setup)
    prediction = history["ensemble"].predict(*model_inputs(arrays, tiny_setup))
    for k, name in enumerate(LABELS):
        np.testing.assert_allclose(fresh.column(name).to_numpy(), prediction.mean[:, k], rtol=1e-5, atol=1e-5)
    assert fresh.column("input_sha256").to_pylist() == spectrum_sha256(arrays, tiny_setup)
    assert after["catalogue"]["index"]["releases"]["DR2"] == before["catalogue"]["index"]["releases"]["DR2"]


def test_a_new_model_relabels_what_it_has_not_labelled(history):
    options, before, after = history["options"], history["after_change"], history["after_new_model"]
    steps = _steps(_record(options, history["new_model"].run_id))
    model_id = history["new_ensemble"].model_id
    for release, rows in (("DR1", 16), ("DR2", 11)):
        assert steps[release]["ingest_reason"] is None
        assert steps[release]["label_reason"].startswith(f"new model {model_id}")
        assert (steps[release]["label"]["labelled"], steps[release]["label"]["carried"]) == (rows, 0)
        assert after["catalogue"]["index"]["releases"][release]["model_id"] == model_id
        assert set(after["live"][release].column("model_id").to_pylist()) == {model_id}
    assert after["store"] == before["store"]
    again = run_reprocess(history["new_model_options"], ensure_ray=_no_ray)
    assert again.status == "up to date"


def test_the_lock_refuses_a_concurrent_run(history, capsys):
    options = history["options"]
    with records(options.catalogue).lock("20261125T000000Z-other"):
        with pytest.raises(LockedError, match="locked by run 20261125T000000Z-other"):
            run_reprocess(options, ensure_ray=_no_ray)
        assert main(_cli(history["new_model_options"])) == 1
    assert "locked by run 20261125T000000Z-other" in capsys.readouterr().err


def test_a_stale_lock_is_taken_over(history):
    options = dataclasses.replace(history["new_model_options"], lock_timeout_s=3600)
    lock = Path(options.catalogue) / "_reprocess" / "_lock"
    crashed = {"run_id": "crashed", "host": socket.gethostname(), "pid": os.getpid(), "timeout_s": 60}
    lock.write_text(json.dumps({**crashed, "acquired_at": time.time() - 600, "renewed_at": time.time() - 61}))
    assert run_reprocess(options, ensure_ray=_no_ray).status == "up to date"  # not renewed for 60 s
    assert not lock.exists()
    lock.write_text(json.dumps({**crashed, "acquired_at": time.time() - 600, "renewed_at": time.time() - 5}))
    with pytest.raises(LockedError, match="locked by run crashed"):  # its process is alive and renews
        run_reprocess(options, ensure_ray=_no_ray)
    lock.unlink()


def _cli(options: ReprocessOptions) -> list[str]:
    return [
        "reprocess",
        "--releases",
        options.releases,
        "--store",
        options.store,
        "--catalogue",
        options.catalogue,
        "--model",
        options.model,
        "--batch-size",
        "8",
        "--quiet",
    ]


def test_cli_up_to_date_and_dry_run(history, capsys):
    options = history["new_model_options"]
    assert main(_cli(options)) == 0
    out = capsys.readouterr().out
    assert "reprocess: up to date" in out and "DR9: skipped (no FITS or Parquet files yet)" in out
    assert main([*_cli(options), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "DR1: up to date" in out and "DR2: up to date" in out and "DR9: skipped" in out
    # Labelling without the refinement is another way of labelling: every release would be relabelled.
    assert main([*_cli(options), "--dry-run", "--no-refine"]) == 0
    assert "DR1: label (label options changed)" in capsys.readouterr().out
    # The first model is no longer the catalogue's: a dry run shows the work and does none of it.
    before = _snapshot(options)
    assert main([*_cli(history["options"]), "--dry-run", "--release", "DR2"]) == 0
    out = capsys.readouterr().out
    assert f"DR2: label (new model {history['ensemble'].model_id}" in out and "DR1" not in out
    assert _snapshot(options) == before
    assert main([*_cli(options), "--release", "DR7"]) == 2


def test_submit_reprocess_names_the_work_by_release_and_model(history):
    argv = [*_cli(history["options"])[:-3], "--release", "DR1"]
    request = sub.build_request(argv)
    assert request.submission_id.startswith(f"speclabel-reprocess-DR1-{history['ensemble'].model_id}-")
    assert set(request.inputs) == {"releases"}  # the model enters through its model_id


def test_a_store_release_is_read_alone(history, tiny_setup):
    store = history["options"].store
    source = ParquetInput.open(store, tiny_setup, read_releases=False, release="DR2")
    assert source.rows_in == 11 and all("/release=DR2/" in f.path for f in source.files)
    with pytest.raises(InputError, match="has no release 'DR5'"):
        ParquetInput.open(store, tiny_setup, release="DR5")


def test_a_failed_release_is_recorded_and_the_run_exits_1(history, tiny_setup, capsys):
    options = history["new_model_options"]
    folder = Path(options.releases) / "DR4"
    folder.mkdir()
    spectra_file(tiny_setup, folder / "d.parquet", n=4, seed=6, release="DR4")
    before = _snapshot(options)
    try:
        with Dataset.open(options.store).lock("20261125T000000Z-ingest"):  # a manual ingest is running
            assert main(_cli(options)) == 1
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    err = capsys.readouterr().err
    assert "DR4: failed" in err and "locked by run 20261125T000000Z-ingest" in err
    after = _snapshot(options)
    assert after["store"] == before["store"] and after["catalogue"] == before["catalogue"]
    (new_record,) = set(after["records"]) - set(before["records"])
    record = json.loads((Path(options.catalogue) / "_reprocess" / new_record).read_text())
    steps = _steps(record)
    assert record["status"] == "failed" and steps["DR4"]["status"] == "failed"
    assert steps["DR4"]["ingest_reason"] == "new release" and "locked" in steps["DR4"]["error"]
    assert steps["DR1"]["status"] == steps["DR2"]["status"] == "up to date"
