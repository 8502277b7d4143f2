"""Atomic, idempotent publication of one release of a partitioned dataset.

The spectra store and the label catalogue share one layout and one commit protocol::

    ROOT/_index.json                       which run is live for each release (the commit record)
    ROOT/release=<R>/.../part-<run>-*.parquet   live rows of release R: the files of exactly one run
    ROOT/_manifests/release=<R>/<run>.json  what each run read, wrote and counted
    ROOT/_quarantine/release=<R>/run=<run>/ rows a run refused, with reasons
    ROOT/_versions/release=<R>/<run>/       live files that a later run superseded
    ROOT/_staging/<run>/                    work in progress (never read)
    ROOT/_lock                              held by the one run allowed to write (``.lock``)

Everything but ``release=<R>/`` starts with ``_``, which Arrow, DuckDB, dask and Spark skip during
dataset discovery, so ``pyarrow.dataset.dataset(ROOT, partitioning="hive")`` sees live rows only.

A run writes everything under ``_staging/<run>/`` first. Publishing then (1) writes the run's
manifest, (2) swaps the staged release folder with the live one, (3) records the run in
``_index.json``. On a local file system step 2 is one ``renameat2(RENAME_EXCHANGE)`` call where the
kernel has it (Linux), so readers see the old release or the new one and never a mix or a gap; elsewhere
it is two renames with a gap of microseconds (no mix). Object stores cannot rename: there the new
files are copied in under new names, ``_index.json`` is replaced (the commit point) and the old
files are moved out; readers that take their file list from the index (``pipeline.catalogue`` does)
switch atomically, while a bare prefix listing can briefly see both runs' files.

A crash at any point leaves either the old release live or the new one, never a mix:
:func:`recover` (run under the lock before every write) rolls a completed swap forward and
discards partial work.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import os
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from speclabel.core.errors import SpeclabelError
from speclabel.core.layout import (
    INDEX,
    INPUTS_TABLE_SUFFIX,
    LOCK,
    MANIFESTS,
    POPULATION_SALIENCY,
    QUARANTINE,
    RELEASE,
    SALIENCY,
    STAGING,
    VERSIONS,
)
from speclabel.core.storage import (
    exists,
    files_under,
    filesystem_and_path,
    join,
    read_json,
    write_json_atomic,
)

from .lock import DEFAULT_LOCK_TIMEOUT_S, DatasetLock, LockedError, read_lock

__all__ = ["Dataset", "LockedError", "new_run_id", "run_of_file"]  # LockedError: from .lock, as before


def new_run_id() -> str:
    """Sortable and unique: UTC time plus random bits, e.g. 20261125T101500Z-3f2a9c1d."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def run_of_file(name: str) -> str | None:
    """The run id in a data file name ``part-<run>-<n>.parquet``."""
    base = name.rsplit("/", 1)[-1]
    if not base.startswith("part-"):
        return None
    parts = base[len("part-") :].rsplit("-", 1)
    return parts[0] if len(parts) == 2 else None


@dataclass
class Dataset:
    """A published dataset (spectra store or label catalogue) at a local path or URI."""

    location: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, location: str) -> Dataset:
        fs, root = filesystem_and_path(location)
        return cls(location, fs, root.rstrip("/"))

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def live_dir(self, release: str) -> str:
        return self.path(f"{RELEASE}={release}")

    def staging_dir(self, run_id: str) -> str:
        return self.path(STAGING, run_id)

    def staged_release_dir(self, run_id: str, release: str) -> str:
        """Where a run stages the data files that :meth:`publish` makes the live ``release=<R>/``."""
        return join(self.staging_dir(run_id), f"{RELEASE}={release}")

    def manifests_dir(self, release: str) -> str:
        return self.path(MANIFESTS, f"{RELEASE}={release}")

    def manifest_path(self, release: str, run_id: str) -> str:
        return join(self.manifests_dir(release), f"{run_id}.json")

    def inputs_table_path(self, release: str, run_id: str) -> str:
        """Beside the run's manifest: every input file of an ingest run and its outcome."""
        return join(self.manifests_dir(release), f"{run_id}{INPUTS_TABLE_SUFFIX}")

    def side_dir(self, kind: str, release: str, run_id: str) -> str:
        """A run's side output of ``kind`` (``core.layout.RUN_SIDE_OUTPUTS``): kind/release=R/run=ID."""
        return self.path(kind, f"{RELEASE}={release}", f"run={run_id}")

    def quarantine_dir(self, release: str, run_id: str) -> str:
        return self.side_dir(QUARANTINE, release, run_id)

    def saliency_dir(self, release: str, run_id: str) -> str:
        return self.side_dir(SALIENCY, release, run_id)

    def population_saliency_dir(self, release: str, run_id: str) -> str:
        return self.side_dir(POPULATION_SALIENCY, release, run_id)

    def version_dir(self, release: str, run_id: str) -> str:
        return self.path(VERSIONS, f"{RELEASE}={release}", run_id)

    def relative(self, path: str) -> str:
        """``path`` relative to the dataset's root, as manifests and the index record files."""
        return path[len(self.root) + 1 :] if path.startswith(self.root + "/") else path

    # -- the index --------------------------------------------------------------------------------

    def index(self) -> dict:
        path = self.path(INDEX)
        if not exists(self.fs, path):
            return {"releases": {}}
        return read_json(self.fs, path)

    def release_entry(self, release: str) -> dict | None:
        return self.index()["releases"].get(release)

    def manifest(self, release: str, run_id: str) -> dict:
        return read_json(self.fs, self.manifest_path(release, run_id))

    def live_files(self, release: str | None = None) -> list[str]:
        """The live data files, from the index's manifests (what readers should read)."""
        files = []
        for name, entry in sorted(self.index()["releases"].items()):
            if release is None or name == release:
                manifest = self.manifest(name, entry["run_id"])
                files += [self.path(f) for f in manifest["files"]]
        return files

    def files_under(self, folder: str) -> list[str]:
        return files_under(self.fs, folder)

    # -- the lock ---------------------------------------------------------------------------------

    def lock(self, run_id: str, stale_after_s: float = DEFAULT_LOCK_TIMEOUT_S) -> DatasetLock:
        """The dataset's write lock for ``run_id`` (``with dataset.lock(run_id) as lock:``), renewed by a
        heartbeat while held and taken over once not renewed for ``stale_after_s`` (:mod:`.lock`).
        Raises :class:`LockedError` while another run holds it; ``lock.check()`` raises once another
        run has taken it over."""
        self.fs.create_dir(self.root, recursive=True)
        return DatasetLock(self.fs, self.path(LOCK), run_id, timeout_s=stale_after_s, location=self.location)

    def lock_holder(self) -> dict | None:
        """Who holds the lock (its JSON: run_id, host, pid, user, acquired_at, renewed_at, timeout_s)."""
        return read_lock(self.fs, self.path(LOCK))

    # -- publication ------------------------------------------------------------------------------

    def publish(self, release: str, run_id: str, manifest: dict, index_fields: dict) -> None:
        """Make the staged release of ``run_id`` live. Call under :meth:`lock`.

        The staged data files must be under ``_staging/<run>/release=<R>/`` and named
        ``part-<run>-*.parquet``. ``manifest`` is stored with the list of published files added;
        ``index_fields`` (e.g. model_id, input fingerprint) go into the release's index entry.
        """
        staged = self.staged_release_dir(run_id, release)
        staged_files = self.files_under(staged)
        bad = [f for f in staged_files if run_of_file(f) != run_id]
        if bad:
            raise SpeclabelError(f"staged files not named part-{run_id}-*: {bad[:3]}")
        live = self.live_dir(release)
        rel = [f"release={release}/{f[len(staged) + 1 :]}" for f in staged_files]
        write_json_atomic(
            self.fs,
            self.manifest_path(release, run_id),
            {**manifest, "run_id": run_id, "files": rel, "index": index_fields},
        )
        previous = self.release_entry(release)
        if self.local:
            self._swap_local(staged, live, release, previous)
        else:
            self._copy_in(staged, live)
        self._commit_index(release, run_id, index_fields)
        if not self.local:
            self._retire_other_runs(release, run_id)
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(self.staging_dir(run_id))

    def _swap_local(self, staged: str, live: str, release: str, previous: dict | None) -> None:
        if not os.path.exists(staged):
            os.makedirs(staged)  # a release with no live rows (everything quarantined) is still a release
        if os.path.exists(live):
            old_run = previous["run_id"] if previous else f"unknown-{uuid.uuid4().hex[:8]}"
            if _exchange(staged, live):
                retired = staged  # the old live folder now sits where the staging folder was
            else:
                retired = live + f".old-{uuid.uuid4().hex[:8]}"
                os.rename(live, retired)
                os.rename(staged, live)
            target = self.version_dir(release, old_run)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                target += f"-{uuid.uuid4().hex[:8]}"
            os.rename(retired, target)
        else:
            os.makedirs(os.path.dirname(live), exist_ok=True)
            os.rename(staged, live)

    def _copy_in(self, staged: str, live: str) -> None:
        for src in self.files_under(staged):
            dst = join(live, src[len(staged) + 1 :])
            self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            self.fs.copy_file(src, dst)

    def _retire_other_runs(self, release: str, run_id: str) -> None:
        live = self.live_dir(release)
        for f in self.files_under(live):
            old = run_of_file(f)
            if old != run_id:
                dst = join(self.version_dir(release, old or "unknown"), f[len(live) + 1 :])
                self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
                self.fs.copy_file(f, dst)
                self.fs.delete_file(f)

    def _commit_index(self, release: str, run_id: str, index_fields: dict) -> None:
        index = self.index()
        index.setdefault("releases", {})[release] = {
            **index_fields,
            "run_id": run_id,
            "manifest": self.relative(self.manifest_path(release, run_id)),
            "published_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        write_json_atomic(self.fs, self.path(INDEX), index)

    def recover(self) -> list[str]:
        """Finish or undo what a crashed run left; call under :meth:`lock`. Returns what it did."""
        actions = []
        index = self.index()
        for folder in self._subdirs(self.root):
            name = folder.rsplit("/", 1)[-1]
            if not name.startswith("release="):
                continue
            release = name[len("release=") :]
            entry = index["releases"].get(release)
            runs = {run_of_file(f) for f in self.files_under(folder)} - {None}
            live_run = entry["run_id"] if entry else None
            if runs == {live_run} or not runs:
                continue
            # A swap completed but the index was not updated: roll forward when one run's files
            # are there and match its manifest exactly.
            if len(runs) == 1:
                (run,) = runs
                manifest_path = self.manifest_path(release, run)
                if exists(self.fs, manifest_path):
                    manifest = read_json(self.fs, manifest_path)
                    if {self.path(f) for f in manifest["files"]} == set(self.files_under(folder)):
                        self._commit_index(release, run, manifest["index"])
                        actions.append(f"release {release}: rolled forward to run {run}")
                        continue
            # Otherwise files of unfinished runs are removed (object-store copies cut short).
            for f in self.files_under(folder):
                if run_of_file(f) != live_run:
                    self.fs.delete_file(f)
            actions.append(f"release {release}: removed partial files of runs {sorted(runs - {live_run})}")
        staging = self.path(STAGING)
        for folder in self._subdirs(staging):
            self.fs.delete_dir(folder)
            actions.append(f"removed abandoned staging {folder.rsplit('/', 1)[-1]}")
        return actions

    def _subdirs(self, folder: str) -> list[str]:
        if not exists(self.fs, folder):
            return []
        info = self.fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        return sorted(i.path for i in info if i.type == pafs.FileType.Directory)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0
