"""The label job: spectra -> Ray Data -> ensemble actors -> a published catalogue release.

::

    driver pre-pass (inputs.py): files, row counts, fingerprint, duplicate decision, release
      -> up to date? (same release, model, input and options in the index) -> stop, exit 0
    under the catalogue's lock, after recover():
      reuse_unchanged and the live run has the same model and options: rows whose (spectrum_id,
      input_sha256) equal a live row's keep that row (carried); only the others are read and labelled
      Ray Data: read row groups (only the needed columns)            tasks
             -> validate + prepare (batch.prepare)                    tasks, fused with the read
             -> EnsembleLabeller (labeller.py)                        actor pool: one per GPU, or
                                                                      fractional-CPU actors locally
             -> iter_batches in the driver -> RunOutputs (outputs.py) staging under _staging/<run>/
      check: every input row labelled or quarantined (per input file) -> else fail, publish nothing
      move side outputs to _quarantine/, _saliency/, _population_saliency/ (run-keyed)
      Dataset.publish: manifest, atomic swap of release=<R>/, index entry (the commit)

With ``reuse_unchanged`` a release whose input changed in a few spectra costs only those: the new
run's rows are the carried live rows plus the relabelled ones; spectra gone from the input drop out.
Its population saliency covers the relabelled spectra only (the manifest says how many).

Readers never see a partial or mixed release: all rows are staged first and the index entry (which
readers go by) changes only after the swap. On object stores, which cannot rename, publish copies the
staged files in under new names and replaces ``_index.json`` as the commit point; readers that take
their file list from the index (``pipeline.catalogue``) switch atomically, a bare prefix listing may
briefly see both runs' files (see ``pipeline/publish.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from speclabel.core.errors import ConfigError, IntegrityError, SpeclabelError, UsageError
from speclabel.core.faults import Fault, fault_point
from speclabel.core.layout import check_release_name
from speclabel.core.setups import Setup
from speclabel.core.storage import filesystem_and_path
from speclabel.model.io import load_model
from speclabel.model.splits import hash_uniform

from ..catalogue import CatalogueLayout, WriteOptions
from ..lock import DEFAULT_LOCK_TIMEOUT_S
from ..publish import Dataset, new_run_id
from .batch import FlagThresholds, OutputSpec, prepare
from .inputs import ParquetInput
from .labeller import PRECISIONS, EnsembleLabeller, LabellerSettings
from .outputs import RunOutputs

log = logging.getLogger(__name__)

SALIENCY_CHOICES = ("summary", "full", "none")
SAMPLE_SALT = "speclabel-saliency-sample-v1"
PROGRESS_S = 10.0
ACTOR_START_TIMEOUT_S = 900  # model loading, and cluster autoscalers bringing up GPU nodes


@dataclass(frozen=True)
class LabelOptions:
    """How to label: what to write, how to spread the work. Plain data (the CLI builds it)."""

    release: str | None = None  # overrides the input's release column
    saliency: str = "summary"  # summary | full | none
    saliency_ids: str | None = None  # file of spectrum_ids whose full maps are kept
    saliency_sample: int | None = None  # keep full maps of this many spectra (a hash sample)
    members: bool = False  # store each member's labels (<label>_members)
    batch_size: int = 128  # spectra per actor call
    gpus: int = 0  # > 0: one actor per GPU
    actors: int | None = None  # CPU actors (default: one per CPU of the cluster)
    cpus_per_actor: float | None = None
    threads_per_actor: int | None = None
    precision: str = "float32"  # GPU actors: auto, bf16 or tf32 (checked by the fused engine)
    thresholds: FlagThresholds = field(default_factory=FlagThresholds)
    layout: CatalogueLayout | None = None  # for a new catalogue (default: stored, else CatalogueLayout())
    write: WriteOptions = field(default_factory=WriteOptions)
    force: bool = False  # relabel even when the release is up to date
    # Keep the live rows of spectra whose content (input_sha256) is unchanged when the release's live
    # run used the same model and options: a changed release costs only its changed spectra.
    reuse_unchanged: bool = False
    fault: Fault | None = None  # testing hook (core.faults): where the job fails on purpose
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S  # the catalogue's lock is taken over after this
    progress: bool = True

    def __post_init__(self) -> None:
        if self.saliency not in SALIENCY_CHOICES:
            raise UsageError(f"--saliency must be one of {SALIENCY_CHOICES}, not {self.saliency!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.saliency == "full" and self.saliency_ids is None and self.saliency_sample is None:
            raise UsageError(
                "--saliency full keeps maps of ~10 bytes x pixels x labels per spectrum (320 KB on "
                "GIRAFFE HR10+HR21): choose the spectra with --saliency-ids FILE and/or --saliency-sample N"
            )
        if self.saliency != "full" and (self.saliency_ids is not None or self.saliency_sample is not None):
            raise UsageError("--saliency-ids and --saliency-sample need --saliency full")
        for name in ("batch_size", "actors", "threads_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name} must be >= 1, got {value}")
        if self.gpus < 0 or (self.cpus_per_actor is not None and not self.cpus_per_actor > 0):
            raise UsageError("--gpus must be >= 0 and --cpus-per-actor > 0")

    @property
    def saliency_mode(self) -> str | None:
        return None if self.saliency == "none" else self.saliency


@dataclass
class Resources:
    """How the work is spread over the Ray cluster."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: int
    threads_per_actor: int
    prepare_cpus: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LabelResult:
    status: str  # "published" or "up to date"
    release: str
    catalogue: str
    model_id: str
    run_id: str | None = None
    rows_in: int = 0
    labelled: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    carried: int = 0
    corrupt_files: int = 0
    seconds: float = 0.0
    label_seconds: float = 0.0
    manifest: dict | None = None

    @property
    def rows_per_s(self) -> float:
        labelled = self.rows_in - self.carried  # carried rows were neither read nor labelled
        return labelled / self.label_seconds if self.label_seconds > 0 else 0.0

    def summary(self) -> str:
        if self.status == "up to date":
            return (
                f"label: release {self.release} of {self.catalogue} is up to date (model {self.model_id}, "
                "same input and options); nothing to do (--force relabels)"
            )
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.quarantined.items())) or "none"
        return (
            f"label: release {self.release} published to {self.catalogue} (run {self.run_id}, model "
            f"{self.model_id})\n"
            f"  rows in {self.rows_in}, labelled {self.labelled}, "
            + (f"kept unchanged {self.carried}, " if self.carried else "")
            + f"quarantined {sum(self.quarantined.values())} ({reasons})"
            + (f", corrupt files {self.corrupt_files}" if self.corrupt_files else "")
            + "\n"
            f"  {self.rows_per_s:.2f} spectra/s over {self.label_seconds:.1f} s of labelling, "
            f"{self.seconds:.1f} s wall"
        )


def label_spectra(
    spectra: str, model: str, catalogue: str, options: LabelOptions | None = None, *, source=None
) -> LabelResult:
    """Label the spectra at ``spectra`` with the model at ``model`` into the catalogue at
    ``catalogue`` (see the module docstring). Needs a running Ray (``ray.init``).

    ``source``: a :class:`.inputs.SpectraSource` to read instead of ``spectra`` (benchmarks use a
    generating source).
    """
    import ray

    options = options or LabelOptions()
    began = time.perf_counter()
    # Every integrity check (model_id, weight files and their sha256, architecture) before any Ray
    # work: a tampered model fails here with the check's name, not later inside an actor.
    ensemble = load_model(model)
    setup, model_id = ensemble.setup, ensemble.model_id
    spec = OutputSpec(
        label_names=tuple(ensemble.label_names),
        saliency_groups=tuple(setup.line_windows),
        saliency=options.saliency_mode,
        members=options.members,
        n_pixels=setup.n_pixels,
    )
    source = source or ParquetInput.open(
        spectra, setup, read_releases=options.release is None, release=options.release
    )
    _check_apart(spectra, catalogue, source)
    release = decide_release(options.release, source.releases)
    fingerprints = label_fingerprints(model_id, source, options)
    dataset = Dataset.open(catalogue)
    if not options.force and up_to_date(dataset, release, fingerprints):
        return LabelResult("up to date", release, catalogue, model_id, seconds=time.perf_counter() - began)
    source.scan_ids()
    map_ids = selected_map_ids(options, source)
    prepass_s = time.perf_counter() - began
    run_id = new_run_id()
    with dataset.lock(run_id, stale_after_s=options.lock_timeout_s) as lock:
        recovered = dataset.recover()
        if recovered:
            log.info("recovered what earlier runs left: %s", "; ".join(recovered))
        if not options.force and up_to_date(dataset, release, fingerprints):
            return LabelResult(
                "up to date", release, catalogue, model_id, seconds=time.perf_counter() - began
            )
        reuse = options.reuse_unchanged and not options.force
        carried_from = reusable_run(dataset, release, fingerprints) if reuse else None
        carried_ids: set[str] = set()
        carried: dict[str, int] = {}
        if carried_from is not None:
            carried_ids = source.carry_unchanged(live_checksums(dataset, release))
            carried = source.carried_by_source()
        rows_to_label = source.rows_in - sum(carried.values())
        resources = plan_resources(
            options, usable_resources(ray.cluster_resources(), ray.available_resources()), rows=rows_to_label
        )
        outputs = RunOutputs(
            dataset, release, run_id, spec, setup.wave, layout=options.layout, options=options.write
        )
        try:
            outputs.carry(carried_from, carried_ids, carried)
            for table in source.refused_quarantine():
                outputs.quarantine(table)
            settings = LabellerSettings(
                model_location=model,
                setup=setup,
                spec=spec,
                thresholds=options.thresholds,
                run_id=run_id,
                model_id=model_id,
                map_ids=map_ids,
                threads=resources.threads_per_actor,
                use_gpu=resources.gpus_per_actor > 0,
                precision=options.precision,
                fault=options.fault,
            )
            started = time.perf_counter()
            progress = Progress(release, rows_to_label, outputs, enabled=options.progress)
            # Inside the context: a dataset takes its settings from the context it was built in.
            with ray_data_context(progress_bars=options.progress):
                stream = label_stream(source, setup, settings, resources, options)
                # The iterator itself (iter_batches gives an iterable), so that it can be closed below.
                batches = iter(stream.iter_batches(batch_format="pyarrow", batch_size=None) if stream else ())
                try:
                    for batch in batches:
                        outputs.add(batch)
                        progress.update()
                except SpeclabelError:
                    raise
                except Exception as exc:
                    raise SpeclabelError(
                        f"labelling release {release} failed after {outputs.labelled_rows} of "
                        f"{source.rows_in} rows; nothing was published: {_root_cause(exc)}"
                    ) from exc
                finally:
                    # Ray Data shuts its executor down on its own errors; after an error in this
                    # loop's body (or an interrupt) closing the iterator does it now, not at collection.
                    if hasattr(batches, "close"):
                        batches.close()
            label_s = time.perf_counter() - started
            written = outputs.close()
            progress.update(final=True)
            check_accounting(source, outputs, written)
            lock.check()
            side = outputs.publish_side_outputs()
            manifest = {
                "job": "label",
                "release": release,
                "model": {"location": model, "model_id": model_id, "setup": setup.name},
                "input": source.describe(),
                "counts": {
                    "rows_in": source.rows_in,
                    "labelled": outputs.labelled_rows,
                    "carried": outputs.carried_rows,
                    "carried_from_run": carried_from,
                    "quarantined": outputs.quarantined_rows,
                    "quarantined_by_reason": dict(sorted(outputs.reasons.items())),
                    "per_file": {
                        path: {
                            "rows": rows,
                            "labelled": outputs.labelled[path],
                            "carried": outputs.carried[path],
                            "quarantined": outputs.quarantined[path],
                        }
                        for path, rows in source.rows_by_source().items()
                    },
                },
                "outputs": {**written, "side_outputs": side},
                "options": _options_record(options, map_ids),
                "resources": resources.to_dict(),
                "actors": sorted(outputs.actors.values(), key=lambda a: a["actor"]),
                "timings": {
                    "prepass_s": round(prepass_s, 3),
                    "label_s": round(label_s, 3),
                    "rows_per_s": round(rows_to_label / label_s, 3) if label_s > 0 else None,
                },
                "versions": versions(),
            }
            index_fields = {
                **fingerprints,
                "rows": outputs.labelled_rows + outputs.carried_rows,
                "quarantined": outputs.quarantined_rows,
            }
            fault_point("label.publish", options.fault, release=release)
            dataset.publish(release, run_id, manifest, index_fields)
        except BaseException:
            outputs.abort()
            raise
    return LabelResult(
        "published",
        release,
        catalogue,
        model_id,
        run_id=run_id,
        rows_in=source.rows_in,
        labelled=outputs.labelled_rows,
        quarantined=dict(outputs.reasons),
        carried=outputs.carried_rows,
        corrupt_files=sum(1 for f in getattr(source, "files", ()) if f.rows is None),
        seconds=time.perf_counter() - began,
        label_seconds=label_s,
        manifest=dataset.manifest(release, run_id),
    )


def label_stream(
    source, setup: Setup, settings: LabellerSettings, resources: Resources, options: LabelOptions
):
    """The Ray Data pipeline: read -> prepare (tasks) -> EnsembleLabeller (actor pool)."""
    from ray.data import ActorPoolStrategy

    raw = source.dataset(read_rows=options.batch_size, num_cpus=resources.prepare_cpus)
    if raw is None:
        return None
    prepared = raw.map_batches(
        prepare,
        fn_kwargs={"setup": setup},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=resources.prepare_cpus,
    )
    gpu_args = {"num_gpus": resources.gpus_per_actor} if resources.gpus_per_actor else {}
    return prepared.map_batches(
        EnsembleLabeller,
        fn_constructor_kwargs={"settings": settings},
        batch_size=options.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=resources.actors),
        num_cpus=resources.cpus_per_actor,
        **gpu_args,
    )


def usable_resources(total: dict, available: dict) -> dict:
    """The cluster's resources, with the CPUs that are free now when at least one is: CPUs held for
    the whole run by others, such as the one a job submitted through the Jobs API reserves for its
    driver (``entrypoint_num_cpus``), would otherwise be planned for and the pool would wait for them
    until ``ACTOR_START_TIMEOUT_S``. Fewer than one free CPU (work finishing) falls back to the total."""
    free = float(available.get("CPU", 0.0))
    return {**total, "CPU": free} if free >= 1.0 else dict(total)


def plan_resources(options: LabelOptions, cluster: dict, rows: int | None = None) -> Resources:
    """Actors and CPUs from the cluster's resources.

    With ``gpus``: one actor per GPU (``num_gpus=1``). Without: one actor per CPU, sharing all but
    one CPU, which is left to the read/prepare tasks: actors holding whole CPUs on a small machine
    starve the reads and the job stalls (stack-notes.md). Torch threads per actor follow its CPUs.
    Never more actors than the ``rows`` to label make batches: each actor loads the whole ensemble.
    """
    total_cpus = float(cluster.get("CPU", 0.0))
    total_gpus = float(cluster.get("GPU", 0.0))
    if total_cpus <= 0:
        raise ConfigError("the Ray cluster has no CPUs")
    if options.gpus:
        if options.gpus > total_gpus:
            raise ConfigError(f"--gpus {options.gpus} but the Ray cluster has {total_gpus:g} GPUs")
        actors = options.gpus
        cpus = options.cpus_per_actor or 1.0
        prepare_cpus = 1.0
        gpus = 1
    else:
        reserve = 1.0 if total_cpus >= 2 else total_cpus / 2
        actors = options.actors or max(1, int(total_cpus))
        cpus = options.cpus_per_actor or (total_cpus - reserve) / actors
        prepare_cpus = min(1.0, reserve)
        gpus = 0
    if rows is not None:
        actors = max(1, min(actors, -(-rows // options.batch_size)))
    if actors * cpus + prepare_cpus > total_cpus + 1e-9:
        raise ConfigError(
            f"{actors} actors x {cpus:g} CPUs plus {prepare_cpus:g} CPU for reading need more than the "
            f"cluster's {total_cpus:g} CPUs: the job would wait forever; "
            "use fewer --actors or a smaller --cpus-per-actor"
        )
    threads = options.threads_per_actor or max(1, round(cpus))
    return Resources(actors, round(cpus, 4), gpus, threads, prepare_cpus)


def _check_apart(spectra: str, catalogue: str, source) -> None:
    """Refuse a catalogue inside the input (its files would be read back as spectra) or around it."""
    _, root = filesystem_and_path(catalogue)
    root = root.rstrip("/") + "/"
    clash = any(f.path.startswith(root) for f in getattr(source, "files", ()))
    if spectra and not any(ch in spectra for ch in "*?["):
        clash = clash or root.startswith(filesystem_and_path(spectra)[1].rstrip("/") + "/")
    if clash:
        raise UsageError(
            f"the catalogue {catalogue} lies inside the input {spectra} (or holds it): its files would "
            "be read as spectra; write the catalogue elsewhere"
        )


def decide_release(override: str | None, found: list[str]) -> str:
    if override is not None:
        return check_release_name(override)
    if len(found) == 1:
        return check_release_name(found[0])
    if not found:
        raise UsageError(
            "the input has no release column or release=<R> folder: name the release with --release"
        )
    raise UsageError(
        f"the input holds several releases {found}: a run labels one release (--release NAME labels all "
        "rows as NAME; or give each release's files separately)"
    )


def selected_map_ids(options: LabelOptions, source) -> frozenset[str] | None:
    """The spectrum_ids whose full saliency maps are kept (``--saliency full``), else None.

    ``--saliency-ids FILE``: ids one per line (``#`` comments), or a Parquet / CSV file with a
    ``spectrum_id`` column. ``--saliency-sample N``: the N input ids with the smallest
    sha256-based hash u(id) = :func:`speclabel.model.splits.hash_uniform` (salt
    ``speclabel-saliency-sample-v1``): a uniform random sample that is the same in every run and
    does not depend on file order. Both: their union.
    """
    if options.saliency != "full":
        return None
    chosen: set[str] = set()
    if options.saliency_ids is not None:
        chosen |= read_id_file(options.saliency_ids)
    if options.saliency_sample:
        ids = source.all_ids()
        if len(ids) > options.saliency_sample:
            u = hash_uniform(ids, SAMPLE_SALT)
            ids = [ids[i] for i in np.argsort(u, kind="stable")[: options.saliency_sample]]
        chosen |= set(ids)
    return frozenset(chosen)


def read_id_file(path: str) -> set[str]:
    file = Path(path)
    if file.suffix.lower() in (".parquet", ".csv"):
        table = pq.read_table(file) if file.suffix.lower() == ".parquet" else pacsv.read_csv(file)
        if "spectrum_id" not in table.column_names:
            raise UsageError(f"--saliency-ids file {path} has no spectrum_id column ({table.column_names})")
        return {i for i in table.column("spectrum_id").cast(pa.string()).to_pylist() if i}
    lines = (line.strip() for line in file.read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def options_fingerprint(options: LabelOptions) -> str:
    """sha256 of the options that change what a run writes (not of how the work is spread)."""
    record = json.dumps(_options_record(options), sort_keys=True).encode()
    return hashlib.sha256(record).hexdigest()[:32]


def _options_record(options: LabelOptions, map_ids: frozenset[str] | None = None) -> dict:
    ids_file = None
    if options.saliency_ids is not None:
        if not Path(options.saliency_ids).is_file():
            raise UsageError(f"--saliency-ids file {options.saliency_ids} does not exist")
        ids_file = hashlib.sha256(Path(options.saliency_ids).read_bytes()).hexdigest()[:32]
    return {
        "saliency": options.saliency,
        "saliency_ids_file_sha256": ids_file,
        "saliency_sample": options.saliency_sample,
        **({"saliency_maps": len(map_ids)} if map_ids is not None else {}),
        "members": options.members,
        "precision": options.precision,
        "thresholds": options.thresholds.to_dict(),
    }


def label_fingerprints(model_id: str, source, options: LabelOptions) -> dict:
    """What a release's index entry records of the run that labelled it; equal -> up to date."""
    return {
        "model_id": model_id,
        "input_fingerprint": source.fingerprint,
        "options_fingerprint": options_fingerprint(options),
    }


def up_to_date(dataset: Dataset, release: str, fingerprints: dict) -> bool:
    entry = dataset.release_entry(release)
    return entry is not None and all(entry.get(k) == v for k, v in fingerprints.items())


def reusable_run(dataset: Dataset, release: str, fingerprints: dict) -> str | None:
    """The release's live run when its rows may be carried into a new run: same model and options."""
    entry = dataset.release_entry(release)
    same = entry is not None and all(
        entry.get(k) == fingerprints[k] for k in ("model_id", "options_fingerprint")
    )
    return entry["run_id"] if same else None


def live_checksums(dataset: Dataset, release: str) -> dict[str, str]:
    """spectrum_id -> input_sha256 of the release's live catalogue rows."""
    checksums: dict[str, str] = {}
    for path in dataset.live_files(release):
        with dataset.fs.open_input_file(path) as fh:
            rows = pq.read_table(fh, columns=["spectrum_id", "input_sha256"])
        checksums.update(
            zip(rows.column(0).cast(pa.string()).to_pylist(), rows.column(1).to_pylist(), strict=True)
        )
    return checksums


def check_accounting(source, outputs: RunOutputs, written: dict) -> None:
    """Refuse to publish unless every input row was labelled or quarantined exactly once.

    Ray Data can drop blocks silently (``max_errored_blocks``); this catches it, per input file.
    """
    problems = []
    for path, rows in source.rows_by_source().items():
        done = outputs.labelled[path] + outputs.carried[path] + outputs.quarantined[path]
        if done != rows:
            problems.append(
                f"{path}: {rows} rows in, {outputs.labelled[path]} labelled + {outputs.carried[path]} "
                f"kept unchanged + {outputs.quarantined[path]} quarantined"
            )
    unexpected = set(outputs.labelled) - set(source.rows_by_source())
    if unexpected:
        problems.append(f"rows from unknown sources {sorted(unexpected)[:3]}")
    if written["catalogue"]["rows"] != outputs.labelled_rows + outputs.carried_rows:
        problems.append(
            f"the catalogue writer wrote {written['catalogue']['rows']} rows "
            f"of {outputs.labelled_rows} labelled + {outputs.carried_rows} kept unchanged"
        )
    if problems:
        raise IntegrityError(
            "check 'every input row accounted for' failed, nothing was published: " + "; ".join(problems[:5])
        )


class Progress:
    """A compact progress line on stderr every few seconds, and at the end."""

    def __init__(
        self,
        release: str,
        rows_in: int,
        outputs: RunOutputs,
        *,
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.release, self.rows_in, self.outputs, self.enabled, self.clock = (
            release,
            rows_in,
            outputs,
            enabled,
            clock,
        )
        self.started = self.last = clock()

    def update(self, final: bool = False) -> None:
        now = self.clock()
        if not self.enabled or (not final and now - self.last < PROGRESS_S):
            return
        self.last = now
        done = self.outputs.labelled_rows + self.outputs.quarantined_rows
        rate = done / max(now - self.started, 1e-9)
        eta = (self.rows_in - done) / rate if rate > 0 else float("inf")
        print(
            f"label {self.release}: {done}/{self.rows_in} rows "
            f"({self.outputs.quarantined_rows} quarantined), "
            f"{rate:.2f} rows/s" + ("" if final or not np.isfinite(eta) else f", ETA {eta / 60:.1f} min"),
            file=sys.stderr,
            flush=True,
        )


class ray_data_context:
    """Ray Data settings for the run, restored afterwards: no silently dropped blocks, no forced
    order, and the whole actor pool up before work starts (so every GPU gets work, and a cluster
    that cannot host the pool fails after ``ACTOR_START_TIMEOUT_S`` instead of waiting forever)."""

    def __init__(self, *, progress_bars: bool) -> None:
        self.progress_bars = progress_bars

    def __enter__(self):
        from ray.data import DataContext

        self.context = DataContext.get_current()
        self.saved = (
            self.context.max_errored_blocks,
            self.context.enable_progress_bars,
            self.context.execution_options.preserve_order,
            self.context.wait_for_min_actors_s,
        )
        self.context.max_errored_blocks = 0
        self.context.enable_progress_bars = self.progress_bars
        self.context.execution_options.preserve_order = False
        self.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        return self.context

    def __exit__(self, *exc) -> None:
        (
            self.context.max_errored_blocks,
            self.context.enable_progress_bars,
            self.context.execution_options.preserve_order,
            self.context.wait_for_min_actors_s,
        ) = self.saved


def _root_cause(exc: BaseException) -> str:
    """The worker's original error, ``Type: message``: Ray wraps it in its own exceptions, and keeps
    the original only as text in the remote traceback it carries."""
    lines = str(exc).splitlines()
    for line in reversed(lines):
        match = _ERROR_LINE.match(line.strip())
        if match and not match.group(1).startswith("ray."):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Fault)): (.+)$")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("speclabel", "torch", "ray", "pyarrow", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out
