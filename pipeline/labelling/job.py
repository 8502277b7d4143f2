"""The label job: spectra -> Ray Data -> ensemble actors -> a published catalogue release.

::

    driver pre-pass (inputs.py): files, row counts, fingerprint, duplicate decision, release
      -> up to date? (same release, model, input and options in the index) -> stop, exit 0
    under the catalogue's lock, after recover():
      reuse_unchanged and the live run has the same model and options: rows whose (spectrum_id,
      input_sha256) equal a live row's keep that row (carried); only the others are read and labelled
      Ray Data: read row-group slices of one batch (needed columns)  tasks
             -> validate + prepare (batch.prepare)                    tasks, fused with the read
             -> EnsembleLabeller (labeller.py)                        actor pool: one per GPU, or
                                                                      fractional-CPU actors locally
             -> iter_batches in the driver -> RunOutputs (outputs.py) staging under _staging/<run>/
      check: every input row labelled or quarantined (per input file) -> else fail, publish nothing
      move side outputs to _quarantine/, _saliency/, _population_saliency/ (run-keyed)
      Dataset.publish: manifest, atomic swap of release=<R>/, index entry (the commit)

The run's options and result are in :mod:`.options`, its resource plan in :mod:`.resources`, the
up-to-date and reuse decisions in :mod:`.reuse`.

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

import logging
import platform
import re
import time
import warnings
from importlib.metadata import PackageNotFoundError, version

from speclabel.core.errors import IntegrityError, SpeclabelError, UsageError
from speclabel.core.faults import fault_point
from speclabel.core.reporting import QUIET, Reporter, to_stderr
from speclabel.core.setups import Setup
from speclabel.core.storage import filesystem_and_path
from speclabel.model.io import load_model

from ..publish import Dataset, new_run_id
from .batch import OutputSpec, prepare
from .inputs import ParquetInput
from .labeller import EnsembleLabeller, LabellerSettings
from .options import LabelOptions, LabelResult
from .outputs import RunOutputs
from .resources import Resources, plan_resources, usable_resources
from .reuse import (
    SAMPLE_SALT,  # noqa: F401  (importable from here, where it was first defined)
    check_label_set,
    decide_release,
    label_fingerprints,
    live_checksums,
    options_record,
    reusable_run,
    selected_map_ids,
    up_to_date,
)

log = logging.getLogger(__name__)

PROGRESS_S = 10.0
ACTOR_START_TIMEOUT_S = 900  # model loading, and cluster autoscalers bringing up GPU nodes
# Ray Data restarts a dead pool actor forever by default (max_restarts=-1), and Ray core then logs an
# error for every actor, whose constructor arguments Ray Data always passes through the object store
# (ray#53727), that reads like a failure. A run is all or nothing and a rerun publishes once, so an
# actor that dies (a lost node, the OOM killer) fails the run with the actor's error instead of being
# restarted, possibly into the same death again.
ACTOR_RESTARTS = 0


def label_spectra(
    spectra: str,
    model: str,
    catalogue: str,
    options: LabelOptions | None = None,
    *,
    source=None,
    reporter: Reporter | None = None,
) -> LabelResult:
    """Label the spectra at ``spectra`` with the model at ``model`` into the catalogue at
    ``catalogue`` (see the module docstring). Needs a running Ray (``ray.init``).

    ``source``: a :class:`.inputs.SpectraSource` to read instead of ``spectra`` (benchmarks use a
    generating source). ``reporter``: where the progress lines go (default: stderr every
    ``PROGRESS_S`` seconds, nowhere with ``options.progress`` false).
    """
    import ray

    options = options or LabelOptions()
    if reporter is None:
        reporter = Reporter(to_stderr, every_s=PROGRESS_S) if options.progress else QUIET
    began = time.perf_counter()
    # Every integrity check (model_id, weight files and their sha256, architecture) before any Ray
    # work: a tampered model fails here with the check's name, not later inside an actor.
    ensemble = load_model(model)
    setup, model_id = ensemble.setup, ensemble.model_id
    refining = options.refine and ensemble.refinement is not None
    spec = OutputSpec(
        label_names=tuple(ensemble.label_names),
        saliency_groups=tuple(setup.line_windows),
        saliency=options.saliency_mode,
        members=options.members,
        n_pixels=setup.n_pixels,
        arm_names=tuple(arm.name for arm in setup.arms),
        error_columns=True,
        refined_labels=tuple(ensemble.refinement.config.kept) if refining else (),
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
        if not options.force:
            check_label_set(dataset, release, spec.label_names, model_id)
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
                with_ivar=ensemble.forward is not None or refining,
                refine=refining,
            )
            started = time.perf_counter()
            progress = f"label {release}"
            reporter.start(progress)
            # Inside the context: a dataset takes its settings from the context it was built in.
            with ray_data_context(progress_bars=options.progress):
                stream = label_stream(source, setup, settings, resources, options)
                # The iterator itself (iter_batches gives an iterable), so that it can be closed below.
                batches = iter(stream.iter_batches(batch_format="pyarrow", batch_size=None) if stream else ())
                try:
                    for batch in batches:
                        outputs.add(batch)
                        _report(reporter, progress, outputs, rows_to_label)
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
            _report(reporter, progress, outputs, rows_to_label, final=True)
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
                "options": options_record(options, map_ids),
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
                "labels": list(spec.label_names),
                "label_definitions": [label.to_dict() for label in ensemble.label_definitions],
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

    prepared = prepared_blocks(
        source, setup, options.batch_size, resources.prepare_cpus, with_ivar=settings.with_ivar
    )
    if prepared is None:
        return None
    gpu_args = {"num_gpus": resources.gpus_per_actor} if resources.gpus_per_actor else {}
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts only among the extra remote args, which it calls deprecated
        # (gone in 2.64; ray is pinned to 2.60.*): the one way to turn actor restarts off.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return prepared.map_batches(
            EnsembleLabeller,
            fn_constructor_kwargs={"settings": settings},
            batch_size=options.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=resources.actors),
            num_cpus=resources.cpus_per_actor,
            max_restarts=ACTOR_RESTARTS,
            **gpu_args,
        )


def prepared_blocks(source, setup: Setup, batch_size: int, cpus: float, with_ivar: bool = False):
    """Read -> validate + prepare (tasks, fused), one block per read slice (of at most
    ``batch_size`` rows, see :meth:`.inputs.ParquetInput.read_tasks`), or None when nothing is to be
    read. ``with_ivar``: prepared rows carry ivar (for the forward model's chi^2)."""
    raw = source.dataset(read_rows=batch_size, num_cpus=cpus)
    if raw is None:
        return None
    return raw.map_batches(
        prepare,
        fn_kwargs={"setup": setup, "with_ivar": with_ivar},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=cpus,
    )


def _report(reporter: Reporter, what: str, outputs: RunOutputs, rows: int, final: bool = False) -> None:
    """``label DR1: 120/1000 rows (3 quarantined), 12.30 rows/s, ETA 1.2 min`` (throttled)."""
    done = outputs.labelled_rows + outputs.quarantined_rows
    extra = f"{outputs.quarantined_rows} quarantined"
    reporter.progress(what, done, rows, unit="rows", extra=extra, final=final)


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
