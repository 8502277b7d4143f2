"""Scheduled reprocessing: bring the spectra store and the label catalogue up to date with the data
releases delivered under one folder and the current model, doing only what is missing.

::

    ROOT/<release>/...          FITS or Parquet files as delivered (one folder per release)
    STORE                       spectra store (``speclabel ingest``): index entry per release
    CATALOGUE                   label catalogue (``speclabel label``): index entry per release
    CATALOGUE/_reprocess/_lock          held by the one reprocess run allowed to work
    CATALOGUE/_reprocess/<run>.json     what each run planned and did

**Plan** (driver only, no Ray): for each release folder,

* *ingest* when the store has no such release, or when the delivered files differ from the ones it
  was ingested from: the store's index entry keeps ingest's input fingerprint (sorted paths, sizes and
  modification times of the files, with the setup and the ingest options), recomputed here from a
  listing of the folder;
* *label* when the catalogue's index entry of the release differs from what a label run would record
  (model id, fingerprint of the store release's files, label options): a new release, a new model, or
  a re-ingested release. Labelling keeps the live rows of spectra whose content checksum
  (``input_sha256``) is unchanged when the model and options are the same
  (``LabelOptions.reuse_unchanged``), so a release with a few changed spectra costs only those;
  spectra no longer delivered drop out.

Nothing else is touched: releases whose folders vanished stay as they are, and a run that finds
everything current prints "up to date", writes no record and never starts Ray.

**Safety.** A run holds ``CATALOGUE/_reprocess/_lock`` (``pipeline.lock``: renewed by its heartbeat
while the run works, taken over once not renewed for ``--lock-timeout``), and passes the same timeout
to the ingest and label steps' locks. Ingest and label each publish atomically under their dataset's
own lock, so a crash at any point leaves every release either as it was or as one completed step left
it; the next run plans again from the published state and does exactly the rest: each step publishes
once.

Fault injection for tests (``core.faults``): ``SPECLABEL_FAULT=reprocess.after-ingest`` (or
``reprocess.after-label``; add ``:release=R`` to pick one release) makes the run fail at that point as a
crash would, without a record.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from speclabel.core.errors import InputError, SpeclabelError, UsageError
from speclabel.core.faults import fault_point, planned_fault
from speclabel.core.layout import RELEASE_PATTERN
from speclabel.core.setups import Setup
from speclabel.core.storage import filesystem_and_path, join, write_json_atomic
from speclabel.pipeline.lock import DEFAULT_LOCK_TIMEOUT_S
from speclabel.pipeline.publish import Dataset, new_run_id

if TYPE_CHECKING:  # the label job module imports torch and ray: imported where it is used
    from speclabel.pipeline.labelling.options import LabelOptions

log = logging.getLogger(__name__)

RECORDS = "_reprocess"


class ReprocessFailed(SpeclabelError):
    """One or more releases could not be brought up to date (the others were)."""


@dataclass(frozen=True)
class ReprocessOptions:
    releases: str  # ROOT: one folder per release
    store: str
    catalogue: str
    model: str
    only: tuple[str, ...] = ()  # restrict to these releases
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
    # How to label; ``release`` is set per release and ``reuse_unchanged`` is always on.
    label: LabelOptions | None = None


@dataclass
class Step:
    """One release: what it needs, why, and (after the run) what came of it."""

    release: str
    location: str
    ingest: str | None = None  # why it is (re-)ingested
    label: str | None = None  # why it is (re)labelled
    note: str | None = None  # why nothing can be done (e.g. an empty folder)
    status: str = "planned"  # planned | up to date | skipped | done | failed
    outcome: dict = field(default_factory=dict)

    @property
    def has_work(self) -> bool:
        return bool(self.ingest or self.label)

    def describe(self) -> str:
        if self.note:
            return f"{self.release}: skipped ({self.note})"
        if not self.has_work:
            return f"{self.release}: up to date"
        parts = [f"ingest ({self.ingest})"] if self.ingest else []
        parts += [f"label ({self.label})"] if self.label else []
        return f"{self.release}: " + ", then ".join(parts)


@dataclass
class Plan:
    model_id: str
    setup: Setup
    steps: list[Step]

    @property
    def work(self) -> list[Step]:
        return [s for s in self.steps if s.has_work]

    def describe(self) -> str:
        return "\n".join(f"  {step.describe()}" for step in self.steps) or "  (no release folders)"


# -- planning -------------------------------------------------------------------------------------


def release_folders(root: str, only: tuple[str, ...] = ()) -> dict[str, str]:
    """Release name -> folder, for the folders directly under ``root`` (``_``/``.`` names skipped)."""
    fs, path = filesystem_and_path(root)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise InputError(f"--releases {root}: not a folder (expected one folder per release)")
    folders = {}
    for entry in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = entry.base_name
        if entry.type == pafs.FileType.Directory and not name.startswith(("_", ".")):
            folders[name] = join(root.rstrip("/"), name)
    missing = [name for name in only if name not in folders]
    if missing:
        raise UsageError(
            f"--release {', '.join(missing)}: no such folder under {root} (it has {sorted(folders)})"
        )
    return {name: folders[name] for name in sorted(folders) if not only or name in only}


def make_plan(options: ReprocessOptions) -> Plan:
    """Compare the release folders with the store's and the catalogue's index (see the module
    docstring). Reads listings, index files and Parquet footers only."""
    from speclabel.model.io import read_model_document
    from speclabel.pipeline.ingest import IngestOptions, input_fingerprint, list_inputs

    _check_apart(options)
    document = read_model_document(options.model)
    model_id, setup = document["model_id"], Setup.from_dict(document["setup"])
    store, catalogue = Dataset.open(options.store), Dataset.open(options.catalogue)
    steps = []
    for release, location in release_folders(options.releases, options.only).items():
        step = Step(release, location)
        steps.append(step)
        if not RELEASE_PATTERN.fullmatch(release):
            step.note, step.status = "not a valid release name", "skipped"
            continue
        try:
            _, files = list_inputs(location, options.store)
        except InputError:
            step.note, step.status = "no FITS or Parquet files yet", "skipped"
            continue
        stored = store.release_entry(release)
        fingerprint = input_fingerprint(files, setup, IngestOptions(release=release))
        if stored is None:
            step.ingest = "new release"
        elif stored.get("setup") != setup.name:
            step.ingest = f"the model's setup is {setup.name} (store has {stored.get('setup')})"
        elif stored.get("input_fingerprint") != fingerprint:
            step.ingest = "delivered files changed"
        if step.ingest:
            step.label = "after ingest"
        else:
            step.label = label_reason(options, store, catalogue, release, model_id, setup)
        step.status = "planned" if step.has_work else "up to date"
    return Plan(model_id, setup, steps)


def label_reason(
    options: ReprocessOptions, store: Dataset, catalogue: Dataset, release: str, model_id: str, setup: Setup
) -> str | None:
    """Why the catalogue's release must be (re)labelled from the store, or None when it is current."""
    from speclabel.pipeline.labelling.inputs import ParquetInput
    from speclabel.pipeline.labelling.reuse import label_fingerprints, up_to_date

    stored = store.release_entry(release)
    if not stored.get("spectra"):
        return None  # every spectrum was quarantined at ingest: nothing to label
    source = ParquetInput.open(options.store, setup, read_releases=False, release=release)
    wanted = label_fingerprints(model_id, source, label_options(options, release))
    if up_to_date(catalogue, release, wanted):
        return None
    entry = catalogue.release_entry(release)
    if entry is None:
        return "not in the catalogue"
    if entry.get("model_id") != model_id:
        return f"new model {model_id} (catalogue has {entry.get('model_id')})"
    if entry.get("options_fingerprint") != wanted["options_fingerprint"]:
        return "label options changed"
    return "spectra store release changed"


def label_options(options: ReprocessOptions, release: str) -> LabelOptions:
    from speclabel.pipeline.labelling import LabelOptions

    base = options.label or LabelOptions(progress=False)
    return dataclasses.replace(
        base, release=release, reuse_unchanged=True, force=False, lock_timeout_s=options.lock_timeout_s
    )


def _check_apart(options: ReprocessOptions) -> None:
    """The store and the catalogue must not lie inside ROOT: they would look like release folders."""
    _, root = filesystem_and_path(options.releases)
    root = root.rstrip("/") + "/"
    for flag, location in (("--store", options.store), ("--catalogue", options.catalogue)):
        if filesystem_and_path(location)[1].rstrip("/").startswith(root):
            raise UsageError(f"{flag} {location} lies inside --releases {options.releases}: keep them apart")


# -- running --------------------------------------------------------------------------------------


def records(catalogue: str) -> Dataset:
    """Where reprocess keeps its lock and its records: ``CATALOGUE/_reprocess/``."""
    return Dataset.open(join(catalogue.rstrip("/"), RECORDS))


@dataclass
class Outcome:
    run_id: str
    plan: Plan
    status: str  # "up to date", "done" or "failed"
    record: str | None = None  # path of the JSON record
    seconds: float = 0.0

    def summary(self) -> str:
        if self.status == "up to date":
            skipped = "".join(f"\n  {s.describe()}" for s in self.plan.steps if s.note)
            return f"reprocess: up to date (model {self.plan.model_id}); nothing to do{skipped}"
        lines = [
            f"reprocess run {self.run_id}: {self.status} in {self.seconds:.1f} s (model {self.plan.model_id})"
        ]
        for step in self.plan.steps:
            lines.append(f"  {step.release}: {_step_text(step)}")
        if self.record:
            lines.append(f"  record: {self.record}")
        return "\n".join(lines)


def _step_text(step: Step) -> str:
    if step.status != "done":
        error = step.outcome.get("error")
        return step.status + (f" ({step.note})" if step.note else "") + (f": {error}" if error else "")
    parts = []
    ingest, label = step.outcome.get("ingest"), step.outcome.get("label")
    if ingest:
        counts = ingest["counts"]
        parts.append(
            f"ingested ({step.ingest}; run {ingest['run_id']}): {counts.get('spectra_stored', 0)} stored, "
            f"{counts.get('spectra_quarantined', 0)} quarantined"
        )
    if label:
        if label["status"] == "up to date":
            parts.append("labels up to date")
        else:
            parts.append(
                f"labelled ({step.label}; run {label['run_id']}): {label['labelled']} labelled, "
                f"{label['carried']} kept unchanged, {label['quarantined']} quarantined"
            )
    return "; ".join(parts) or "nothing to do"


def run_reprocess(options: ReprocessOptions, *, ensure_ray: Callable[[], None] | None = None) -> Outcome:
    """Plan and do the work under the reprocess lock; ``ensure_ray`` is called once, and only when
    there is work (the CLI starts or joins Ray there). Raises :class:`ReprocessFailed` after doing
    what it could when a release failed, :class:`~speclabel.pipeline.publish.LockedError` when
    another run holds the lock."""
    began = time.perf_counter()
    run_id = new_run_id()
    started_at = _now()
    lock = records(options.catalogue)
    with lock.lock(run_id, stale_after_s=options.lock_timeout_s) as held:
        plan = make_plan(options)
        if not plan.work:
            return Outcome(run_id, plan, "up to date", seconds=time.perf_counter() - began)
        if ensure_ray is not None:
            ensure_ray()
        for step in plan.work:
            held.check()
            _do_step(options, plan, step)
        status = "failed" if any(s.status == "failed" for s in plan.steps) else "done"
        path = lock.path(f"{run_id}.json")
        write_json_atomic(lock.fs, path, _record(options, plan, run_id, started_at, status))
    outcome = Outcome(run_id, plan, status, record=path, seconds=time.perf_counter() - began)
    if status == "failed":
        raise ReprocessFailed(outcome.summary())
    return outcome


def _do_step(options: ReprocessOptions, plan: Plan, step: Step) -> None:
    from speclabel.pipeline.ingest import IngestOptions, run_ingest
    from speclabel.pipeline.labelling import label_spectra

    clock = time.perf_counter()
    try:
        if step.ingest:
            report = run_ingest(
                step.location,
                options.store,
                plan.setup,
                IngestOptions(release=step.release),
                lock_timeout_s=options.lock_timeout_s,
            )
            step.outcome["ingest"] = {
                "run_id": report.run_id,
                "skipped": report.skipped,
                "counts": report.counts,
            }
            fault_point("reprocess.after-ingest", planned_fault(), release=step.release)
            if not report.skipped and not report.counts.get("spectra_stored"):
                step.label = None  # everything was quarantined: there is nothing to label
        if step.label:
            result = label_spectra(
                options.store, options.model, options.catalogue, label_options(options, step.release)
            )
            step.outcome["label"] = {
                "status": result.status,
                "run_id": result.run_id,
                "model_id": result.model_id,
                "rows_in": result.rows_in,
                "labelled": result.labelled,
                "carried": result.carried,
                "quarantined": sum(result.quarantined.values()),
                "quarantined_by_reason": dict(sorted(result.quarantined.items())),
            }
            fault_point("reprocess.after-label", planned_fault(), release=step.release)
        step.status = "done"
    except SpeclabelError as exc:  # also a concurrent `speclabel ingest` / `label` holding a lock
        log.error("release %s failed: %s", step.release, exc)
        step.status, step.outcome["error"] = "failed", str(exc)
    step.outcome["seconds"] = round(time.perf_counter() - clock, 3)


def _record(options: ReprocessOptions, plan: Plan, run_id: str, started_at: str, status: str) -> dict:
    from importlib.metadata import version

    label = label_options(options, "_")
    return {
        "job": "reprocess",
        "run_id": run_id,
        "status": status,
        "started_at": started_at,
        "finished_at": _now(),
        "speclabel_version": version("speclabel"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "releases_root": options.releases,
        "store": options.store,
        "catalogue": options.catalogue,
        "model": {"location": options.model, "model_id": plan.model_id, "setup": plan.setup.name},
        "label_options": {
            "saliency": label.saliency,
            "members": label.members,
            "batch_size": label.batch_size,
        },
        "steps": [
            {
                "release": step.release,
                "status": step.status,
                "ingest_reason": step.ingest,
                "label_reason": step.label,
                "note": step.note,
                **step.outcome,
            }
            for step in plan.steps
        ],
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
