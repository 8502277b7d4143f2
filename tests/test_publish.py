"""Publication protocol: atomic swap, versions, idempotent index, crash recovery, the lock."""

import os
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from speclabel.pipeline import publish
from speclabel.pipeline.publish import Dataset, LockedError


def _stage(ds: Dataset, release: str, run: str, values: list[int]) -> None:
    folder = ds.path("_staging", run, f"release={release}", "sky=1")
    ds.fs.create_dir(folder, recursive=True)
    with ds.fs.open_output_stream(f"{folder}/part-{run}-0.parquet") as out:
        pq.write_table(pa.table({"x": values}), out)


def _live_values(location) -> list[int]:
    return sorted(pads.dataset(str(location), partitioning="hive").to_table().column("x").to_pylist())


@pytest.fixture(params=["local", "object-store-like"])
def dataset(request, tmp_path):
    ds = Dataset.open(str(tmp_path / "cat"))
    if request.param == "object-store-like":
        # A SubTreeFileSystem is not a LocalFileSystem, so the copy-based object-store path runs.
        ds = Dataset(ds.location, pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "cat")
    return ds


def test_publish_twice_keeps_one_live_version(tmp_path, dataset):
    first, second = "20260101T000000Z-aaaaaaaa", "20260102T000000Z-bbbbbbbb"
    with dataset.lock(first):
        _stage(dataset, "DR1", first, [1, 2])
        dataset.publish("DR1", first, {"counts": {"in": 2}}, {"model_id": "m1"})
    assert _live_values(tmp_path / "cat") == [1, 2]
    with dataset.lock(second):
        _stage(dataset, "DR1", second, [3, 4, 5])
        dataset.publish("DR1", second, {"counts": {"in": 3}}, {"model_id": "m2"})
    assert _live_values(tmp_path / "cat") == [3, 4, 5]
    entry = dataset.release_entry("DR1")
    assert entry["run_id"] == second and entry["model_id"] == "m2"
    assert dataset.manifest("DR1", second)["files"] == [f"release=DR1/sky=1/part-{second}-0.parquet"]
    assert [os.path.basename(f) for f in dataset.live_files("DR1")] == [f"part-{second}-0.parquet"]
    versions = tmp_path / "cat" / "_versions" / "release=DR1" / first
    assert (versions / "sky=1" / f"part-{first}-0.parquet").exists()
    assert not (tmp_path / "cat" / "_staging" / second).exists()


def test_crash_after_swap_rolls_forward(tmp_path, dataset, monkeypatch):
    run = "20260101T000000Z-cccccccc"
    monkeypatch.setattr(Dataset, "_commit_index", _boom)
    with pytest.raises(RuntimeError), dataset.lock(run):
        _stage(dataset, "DR1", run, [7])
        dataset.publish("DR1", run, {}, {"model_id": "m"})
    monkeypatch.undo()
    assert dataset.release_entry("DR1") is None
    with dataset.lock("recovery"):
        actions = dataset.recover()
    if dataset.local:  # the swap had happened: the run is complete, so it is rolled forward
        assert dataset.release_entry("DR1")["run_id"] == run
        assert f"release DR1: rolled forward to run {run}" in actions
    else:  # all copies were made before the crash: also complete
        assert dataset.release_entry("DR1")["run_id"] == run
    assert _live_values(tmp_path / "cat") == [7]


def test_crash_before_swap_leaves_the_old_release(tmp_path, dataset):
    old, new = "20260101T000000Z-dddddddd", "20260102T000000Z-eeeeeeee"
    with dataset.lock(old):
        _stage(dataset, "DR1", old, [1])
        dataset.publish("DR1", old, {}, {})
    _stage(dataset, "DR1", new, [2, 3])  # the run died while writing its staging area
    with dataset.lock("recovery"):
        actions = dataset.recover()
    assert any("abandoned staging" in a for a in actions)
    assert _live_values(tmp_path / "cat") == [1]
    assert dataset.release_entry("DR1")["run_id"] == old


def test_partial_copy_is_removed(tmp_path):
    ds = Dataset.open(str(tmp_path / "cat"))
    old, new = "20260101T000000Z-ffffffff", "20260102T000000Z-99999999"
    with ds.lock(old):
        _stage(ds, "DR1", old, [1])
        ds.publish("DR1", old, {}, {})
    # An object-store publish cut short: one of the new run's files copied in, no manifest.
    folder = ds.live_dir("DR1") + "/sky=2"
    os.makedirs(folder)
    pq.write_table(pa.table({"x": [9]}), f"{folder}/part-{new}-0.parquet")
    with ds.lock("recovery"):
        ds.recover()
    assert _live_values(tmp_path / "cat") == [1]


def test_lock_excludes_a_second_writer_and_stale_locks_are_taken_over(tmp_path):
    ds = Dataset.open(str(tmp_path / "cat"))
    with ds.lock("run-a", stale_after_s=0.5) as first:
        with pytest.raises(LockedError, match="locked by run run-a"), ds.lock("run-b"):
            pass
        first._stop_heartbeat()  # its run died: nobody renews the lock (tests/test_lock.py has more)
        time.sleep(0.6)
        with ds.lock("run-c"):
            assert ds.lock_holder()["run_id"] == "run-c"
    assert not os.path.exists(ds.path("_lock"))


def test_run_ids_sort_by_time_and_name_files():
    a = publish.new_run_id()
    assert publish.run_of_file(f"x/part-{a}-12.parquet") == a
    assert publish.run_of_file("x/other.parquet") is None


def _boom(*args, **kwargs):
    raise RuntimeError("injected crash")
