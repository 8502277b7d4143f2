"""The train driver: scan, scaling, the run folder, every member's Ray Train run, the model directory.

1. resolve and scan the input (``pipeline.training_data``): validation, quarantine, accounting,
   fingerprint; the used rows are held in memory (put in the object store once) or streamed with
   Ray Data;
2. the label scaling from every used row outside the common test split (``model.fit.fit_scaler``);
3. the run folder ``<storage>/<name>`` (:func:`prepare_run_folder`): ``job.json`` says what the run
   trains on and how (a rerun with other data or settings is refused), ``quarantine.parquet`` the rows
   left out;
4. one Ray Train run per member (``member.member_trainer``), as many at once as the cluster holds
   (one driver thread each, :func:`fit_members`): a member that does not fit would otherwise hold a
   pending placement group until Train's start-up timeout. Each finished member is recorded in
   ``finished/member-<i>.json`` (its final numbers and its last checkpoint);
5. when every member has finished: ``model.fit.assemble_ensemble`` (selection, provenance), the
   ensemble's metrics on the common test split (``model.fit.test_metrics``), the post-training fits
   (``trust``: the forward model), ``model.io.save_model`` (atomic), the summary tables.

Resume: rerunning the same command (or ``--resume``) finds the run folder: a member recorded as
finished is not trained again (its weights come from its recorded checkpoint), every other member's
Train run is rerun under the same name, and Train hands it its latest checkpoint. A rerun of a run
whose model is written writes that model again (same members, post-training fits redone). Everything read
on that path is JSON, safetensors or Parquet, never a pickle.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.parquet as pq

from speclabel.core.errors import ConfigError, InputError, SpeclabelError
from speclabel.core.faults import planned_fault
from speclabel.core.reporting import Echo, Reporter, to_stdout
from speclabel.core.setups import Setup
from speclabel.core.storage import (
    atomic_output,
    exists,
    filesystem_and_path,
    join,
    read_json,
    write_json_atomic,
)
from speclabel.model.arch import ArchConfig, build_network
from speclabel.model.ensemble import Ensemble
from speclabel.model.fit import assemble_ensemble, fit_scaler, sample_weights
from speclabel.model.fit import test_metrics as ensemble_test_metrics
from speclabel.model.io import MODEL_JSON, read_model_document, save_model
from speclabel.model.splits import SplitRule
from speclabel.model.training import MemberResult, TrainConfig, TrainingState, input_reference
from speclabel.pipeline.ray_session import ray_session
from speclabel.pipeline.reference_spectra import check_reference_spectra
from speclabel.pipeline.training_data import (
    IdList,
    StreamingRows,
    TrainingSet,
    input_setup,
    resolve_input,
    scalar_columns,
    scan_in_memory,
    scan_streaming,
)
from speclabel.pipeline.training_labels import (
    TrainingLabels,
    join_table,
    read_label_catalogue,
    selection_table,
    training_labels,
)

from .config import JOB_FILE, QUARANTINE_FILE, TrainingFailed, TrainJob
from .member import FINISHED, MemberSpec, error_text, member_name, member_trainer
from .progress import MemberProgress
from .tables import label_rows_table, label_table, member_table
from .trust import fit_trust

FINISHED_FOLDER = "finished"


@dataclass
class MemberSummary:
    member: int
    seed: int
    status: str  # "finished", "failed" or "pending" (never started)
    epochs: int = 0
    best_epoch: int = 0
    best_val_loss: float = math.nan
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    device: str = ""
    node: str = ""
    gpu_ids: tuple[str, ...] = ()
    workers: int = 1
    kept: bool = False
    error: str = ""


@dataclass
class MemberRecord:
    """A member's outcome: the final report of a finished one (or the error) and its last checkpoint."""

    member: int
    status: str  # "finished" or "failed"
    values: dict  # the final report (finished), or the last epoch's (failed; may be empty)
    checkpoint: str | None = None  # relative to the run folder
    error: str = ""


@dataclass
class TrainOutcome:
    model_id: str
    out: str
    run_path: str
    mode: str
    n_input: int
    n_used: int
    quarantined: dict[str, int]
    members: list[MemberSummary]
    metrics: dict
    seconds: float
    n_excluded: int = 0  # rows left out by --exclude


def run_training(job: TrainJob, *, echo: Echo = to_stdout, reporter: Reporter | None = None) -> TrainOutcome:
    """Run the whole job (see the module docstring); raises :class:`SpeclabelError` on failure.

    Lines go to ``reporter`` (default: a reporter of ``echo``), per-epoch lines to its progress echo.
    """
    reporter = reporter or Reporter(echo)
    started = time.perf_counter()
    replace_model = existing_model_of_run(job)
    with ray_session(job.address, state_api=True):
        setup = job_setup(job)
        labels = job_labels(job)
        if labels is not None:
            reporter.line(selection_table(labels))
        training_input = resolve_input(job.data, setup, job.labels.names, labels)
        gpus = member_gpus(job.gpus_per_member)
        mode = data_mode(job, training_input.estimated_bytes(setup), gpus)
        gib = training_input.estimated_bytes(setup) / 2**30
        reporter.line(
            f"train: {training_input.n_rows} rows in {len(training_input.files)} file(s) at {job.data}; "
            f"setup {setup.name}; data {mode} (~{gib:.2f} GiB as arrays)"
        )
        exclude = IdList.read(job.exclude) if job.exclude else None
        if job.reference_spectra is not None:  # checked now, read after the members have trained
            check_reference_spectra(job.reference_spectra, setup, job.labels.names)
        if mode == "memory":
            training_set, rows = scan_in_memory(training_input, setup, exclude)
        else:
            training_set = scan_streaming(
                training_input, setup, num_cpus=min(1.0, job.cpus_per_member), exclude=exclude
            )
            rows = StreamingRows(training_input, setup, training_set.excluded_ids)
        reporter.line(
            f"train: {training_set.n_input} in = {training_set.n_used} used + "
            f"{training_set.n_quarantined} quarantined {training_set.quarantined_by_reason() or ''}"
            + (f" + {training_set.n_excluded} excluded (--exclude)" if exclude is not None else "")
        )
        label_source = {}
        if labels is not None:
            label_source = {"labels": labels.accounting(training_set.scan.column("spectrum_id").to_pylist())}
            reporter.line(join_table(label_source["labels"]))
        split = job.ensemble.split
        label_rows = training_set.label_counts(split)
        reporter.line(label_rows_table(label_rows))
        label_arrays = training_set.label_arrays()
        scaler = fit_scaler(label_arrays, split, job.ensemble.scaling, training_set.label_names)
        # Density weights from the training pool's labels, once, before any member starts.
        ids = label_arrays["spectrum_id"]
        weights = sample_weights(label_arrays, ~split.is_test(ids), job.train, training_set.label_names)
        if weights is not None:
            rows = rows.weighted(dict(zip(ids, weights.tolist(), strict=True)))
        spec = MemberSpec(
            setup=setup,
            arch=job.arch,
            train=job.train,
            split=split,
            scaler=scaler,
            seeds=tuple(job.ensemble.seeds),
            cpus_per_member=job.cpus_per_member,
            fault=planned_fault(),
            # One pass over the training pool (train + val rows of any member) in the driver.
            reference=input_reference(*rows.member(split, job.ensemble.seeds[0]))
            if job.arch.center_input
            else None,
        )
        prepare_run_folder(job, spec, training_set)
        records = fit_members(job, spec, rows, gpus, reporter)
        summaries = [summarise(spec, member, records.get(member)) for member in range(len(spec.seeds))]
        failed = [s for s in summaries if s.status != "finished"]
        if failed:
            reporter.line(member_table(summaries))
            raise TrainingFailed(
                f"{len(failed)} of {len(summaries)} members did not finish "
                f"({'; '.join(f'member {s.member}: {s.error}' for s in failed)}); no model was written. "
                f"Their checkpoints are in {job.run_path}: rerun the same command (or add --resume) to "
                "continue them; finished members are not trained again"
            )
        candidates = [member_result(job, spec, records[s.member]) for s in summaries]
        ensemble = assemble_ensemble(
            setup,
            spec.arch,
            scaler,
            candidates,
            ensemble_config=job.ensemble,
            train_config=job.train,
            test=None,
            data={
                **training_set.describe(mode),
                "label_rows": label_rows,
                **label_source,
                "run": job.run_path,
            },
        )
        ensemble.info["label_definitions"] = [label.to_dict() for label in job.labels.definitions]
        test = test_metrics(ensemble, rows, split)
        if test is not None:
            ensemble.info["metrics"]["test"] = test
        fit_trust(ensemble, rows, split, reporter, job.ood, job.reference_spectra, job.refine)
        model_id = save_model(ensemble, job.out, overwrite=replace_model)
        kept_seeds = {m["seed"] for m in ensemble.member_info}
        for summary in summaries:
            summary.kept = summary.seed in kept_seeds
        outcome = TrainOutcome(
            model_id=model_id,
            out=job.out,
            run_path=job.run_path,
            mode=mode,
            n_input=training_set.n_input,
            n_used=training_set.n_used,
            quarantined=training_set.quarantined_by_reason(),
            members=summaries,
            metrics=ensemble.info["metrics"],
            seconds=time.perf_counter() - started,
            n_excluded=training_set.n_excluded,
        )
        reporter.line(member_table(summaries))
        reporter.line(label_table(ensemble))
        return outcome


def existing_model_of_run(job: TrainJob) -> bool:
    """False when ``job.out`` holds no model; True when it holds the model of this very run folder,
    which a rerun writes again (its members kept, the post-training fits of ``trust`` redone: how
    an existing model gains them without retraining); any other model there is refused."""
    out_fs, out_path = filesystem_and_path(job.out)
    if not exists(out_fs, join(out_path, MODEL_JSON)):
        return False
    document = read_model_document(job.out)
    if document.get("training", {}).get("data", {}).get("run") != job.run_path:
        raise SpeclabelError(
            f"a model already exists at {job.out} (not from run {job.run_path}): choose another --out, "
            "or remove it first"
        )
    return True


def job_labels(job: TrainJob) -> TrainingLabels | None:
    """The labels joined to the spectra by id: from ``--label-catalogue``, or from the training table's
    own columns when ``[labels]`` / ``[selection]`` compute them; None when the table has them as they are."""
    if job.label_catalogue is not None:
        table = read_label_catalogue(job.label_catalogue)
        return training_labels(table, job.labels, id_column=job.id_column, source=job.label_catalogue)
    if job.labels.plain:
        return None
    return training_labels(scalar_columns(job.data), job.labels, source=job.data)


def job_setup(job: TrainJob) -> Setup:
    return input_setup(job.data, job.setup)


def member_gpus(choice: str) -> int:
    """``auto``: one GPU per worker where the cluster has GPUs, else none (never wait for a GPU)."""
    import ray

    if str(choice) == "auto":
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    gpus = int(choice)
    if gpus and ray.cluster_resources().get("GPU", 0) < gpus:
        raise ConfigError(
            f"--gpus-per-member {gpus}, but the Ray cluster has no GPU: the members would wait forever; "
            "use --gpus-per-member auto or 0"
        )
    return gpus


def _worker_slots(resources: dict, job: TrainJob, gpus: int) -> int:
    """How many of the job's workers (``cpus_per_member`` CPUs and ``gpus`` GPUs each) a node holds."""
    slots = resources.get("CPU", 0) // job.cpus_per_member
    if gpus:
        slots = min(slots, resources.get("GPU", 0) // gpus)
    return int(slots)


def data_mode(job: TrainJob, estimated_bytes: int, gpus: int) -> str:
    """``memory`` when the rows fit a node's share of memory for every member it runs, else ``streaming``."""
    if job.streaming != "auto":
        return "streaming" if job.streaming == "on" else "memory"
    import ray

    per_node = []
    for node in ray.nodes():
        resources = node["Resources"]
        slots = _worker_slots(resources, job, gpus) if node.get("Alive") else 0
        if slots >= 1 and resources.get("memory"):
            per_node.append(job.memory_fraction * resources["memory"] / min(slots, len(job.ensemble.seeds)))
    budget = min(per_node) if per_node else 0
    return "memory" if estimated_bytes <= budget else "streaming"


def concurrent_members(job: TrainJob, gpus: int) -> int:
    """How many members the cluster runs at once (all their workers placed): at least one."""
    import ray

    workers = sum(_worker_slots(n["Resources"], job, gpus) for n in ray.nodes() if n.get("Alive"))
    if workers < job.workers_per_member:
        raise ConfigError(
            f"--workers-per-member {job.workers_per_member} with {job.cpus_per_member:g} CPU(s) and "
            f"{gpus} GPU(s) each, but the Ray cluster holds {workers} such worker(s): a member would "
            "never start; use fewer workers per member or fewer CPUs per member"
        )
    return workers // job.workers_per_member


def job_identity(spec: MemberSpec, job: TrainJob, training_set: TrainingSet) -> dict:
    """What makes two runs the same run: the data, the setup and every setting that changes the weights."""
    return {
        "data_fingerprint": training_set.fingerprint(),
        "n_used": training_set.n_used,
        "setup": spec.setup.to_dict(),
        "arch": spec.arch.to_dict(),
        "train": spec.train.to_dict(),
        "ensemble": job.ensemble.to_dict(),
        "scaling": spec.scaler.to_dict(),
        "workers_per_member": job.workers_per_member,
    }


def recorded_identity(recorded: dict) -> dict:
    """A run's job.json as this speclabel writes it: its architecture and training sections read
    back through their dataclasses, so that a field added since (at a default that changes
    nothing: e.g. ``density_weighting`` 0) does not make a finished run look like another one."""
    out = dict(recorded)
    for key, config in (("arch", ArchConfig), ("train", TrainConfig)):
        if isinstance(out.get(key), dict):
            try:
                out[key] = json.loads(json.dumps(config.from_dict(out[key]).to_dict()))
            except ConfigError:
                pass  # not readable as one: compared as recorded, so it differs
    return out


def prepare_run_folder(job: TrainJob, spec: MemberSpec, training_set: TrainingSet) -> None:
    """Write (or, on resume, check) job.json and write the quarantine table of this input."""
    fs, root = filesystem_and_path(job.run_path)
    identity = json.loads(json.dumps(job_identity(spec, job, training_set)))
    job_file = join(root, JOB_FILE)
    if exists(fs, job_file):
        recorded = recorded_identity(read_json(fs, job_file))
        differs = sorted(k for k in identity.keys() | recorded.keys() if identity.get(k) != recorded.get(k))
        if differs:
            raise ConfigError(
                f"run {job.run_name!r} in {job.storage_path} was started with other {', '.join(differs)}; "
                "a resumed run must train on the same data with the same settings. Use --name to start a "
                f"new run, or remove {job.run_path}"
            )
    elif job.resume:
        raise InputError(f"--resume: there is no run {job.run_name!r} to resume in {job.storage_path}")
    else:
        fs.create_dir(root, recursive=True)
        write_json_atomic(fs, job_file, identity)
    quarantine = training_set.quarantine()
    if quarantine.num_rows:
        with atomic_output(fs, join(root, QUARANTINE_FILE)) as stream:
            pq.write_table(quarantine, stream)


# -- the members' runs -----------------------------------------------------------------------------


def _finished_file(root: str, member: int) -> str:
    return join(root, FINISHED_FOLDER, f"{member_name(member)}.json")


def read_finished(job: TrainJob, member: int) -> MemberRecord | None:
    """The record of a member that finished in an earlier run of this run folder, if any."""
    fs, root = filesystem_and_path(job.run_path)
    path = _finished_file(root, member)
    if not exists(fs, path):
        return None
    document = read_json(fs, path)
    return MemberRecord(member, "finished", document["values"], document["checkpoint"])


def fit_members(
    job: TrainJob, spec: MemberSpec, rows, gpus: int, reporter: Reporter
) -> dict[int, MemberRecord]:
    """Run every member not finished yet, as many at once as fit; returns ``{member: MemberRecord}``."""
    import ray
    from ray.util.queue import Empty, Queue

    n_members = len(spec.seeds)
    progress = MemberProgress(reporter, n_members)
    records: dict[int, MemberRecord] = {}
    for member in range(n_members):
        if (record := read_finished(job, member)) is not None:
            records[member] = record
            progress.member_finished(member, record.values, earlier=True)
    todo = [m for m in range(n_members) if m not in records]
    if not todo:
        return records
    at_once = min(concurrent_members(job, gpus), len(todo))
    resources = {"CPU": job.cpus_per_member, **({"GPU": gpus} if gpus else {})}
    reporter.line(
        f"train: run {job.run_path}: {len(todo)} of {n_members} members to train, "
        f"{job.workers_per_member} worker(s) of {resources} each, {at_once} at once, "
        f"up to {job.train.epochs} epochs"
    )
    queue = Queue(actor_options={"num_cpus": 0})
    # In memory: one copy in the object store for every member's workers (an ObjectRef in the config).
    shared_rows = rows if isinstance(rows, StreamingRows) else ray.put(rows)
    finals: dict[int, dict] = {}

    def drain(timeout: float) -> None:
        try:
            while True:
                kind, member, values = queue.get(timeout=timeout)
                timeout = 0
                if kind == FINISHED:
                    finals[member] = values
                progress.event(kind, member, values)
        except Empty:
            pass

    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="member") as pool:
        futures = {
            pool.submit(_fit_member, job, spec, member, shared_rows, gpus, queue): member for member in todo
        }
        pending = set(futures)
        while pending:
            drain(timeout=0.5)
            done = {future for future in pending if future.done()}
            if done:
                drain(timeout=0)  # a member's last lines before its verdict
            for future in sorted(done, key=futures.get):
                member = futures[future]
                error = future.exception()
                if error is None and member in finals:
                    records[member] = _record_finished(job, member, finals[member], future.result())
                else:
                    progress.member_failed(member)
                    records[member] = MemberRecord(
                        member,
                        "failed",
                        {"epoch": progress.last_epoch.get(member, 0)},
                        error=error_text(error) if error else "its run ended without a final report",
                    )
            pending -= done
    return records


def _fit_member(job: TrainJob, spec: MemberSpec, member: int, rows, gpus: int, queue):
    """One member's Train run (in a driver thread): its last checkpoint (``ray.train.Checkpoint``)."""
    return member_trainer(job, spec, member, rows, gpus, queue).fit().checkpoint


def _record_finished(job: TrainJob, member: int, values: dict, checkpoint) -> MemberRecord:
    fs, root = filesystem_and_path(job.run_path)
    relative = checkpoint.path.rstrip("/")
    if relative.startswith(root.rstrip("/") + "/"):
        relative = relative[len(root.rstrip("/")) + 1 :]
    record = MemberRecord(member, "finished", values, relative)
    fs.create_dir(join(root, FINISHED_FOLDER), recursive=True)
    write_json_atomic(fs, _finished_file(root, member), {"values": values, "checkpoint": relative})
    return record


def summarise(spec: MemberSpec, member: int, record: MemberRecord | None) -> MemberSummary:
    summary = MemberSummary(member=member, seed=spec.seeds[member], status="pending", error="not started")
    if record is None:
        return summary
    values = record.values
    summary.status, summary.error = record.status, record.error
    summary.epochs = int(values.get("epoch", 0))
    summary.best_epoch = int(values.get("best_epoch", 0))
    summary.best_val_loss = float(values.get("best_val_loss", math.nan))
    summary.stopped_early = bool(values.get("stopped", False))
    summary.resumed_from_epoch = int(values.get("resumed_from_epoch", 0))
    summary.device = str(values.get("device", ""))
    summary.node = str(values.get("node", ""))
    summary.gpu_ids = tuple(values.get("gpu_ids", ()))
    summary.workers = int(values.get("workers", 1))
    return summary


def member_result(job: TrainJob, spec: MemberSpec, record: MemberRecord) -> MemberResult:
    """A finished member as ``model.fit.assemble_ensemble`` takes it: best weights from its checkpoint."""
    from ray.train import Checkpoint

    fs, root = filesystem_and_path(job.run_path)
    with Checkpoint(join(root, record.checkpoint), filesystem=fs).as_directory() as folder:
        state = TrainingState.load(folder)
    network = build_network(spec.arch, spec.setup)
    network.load_state_dict(state.best_model)
    values = record.values
    return MemberResult(
        network=network,
        seed=int(values["seed"]),
        best_val_loss=state.best_val_loss,
        best_epoch=state.best_epoch,
        epochs_run=len(state.history),
        stopped_early=state.stopped,
        history=state.history,
        n_train=int(values["n_train"]),
        n_val=int(values["n_val"]),
        val_metrics=values["val_metrics"],
    )


def test_metrics(ensemble: Ensemble, rows, split: SplitRule, batch_size: int = 256) -> dict | None:
    """The ensemble on the common test split of ``rows``, batch by batch (``model.fit.test_metrics``)."""
    return ensemble_test_metrics(ensemble, rows.test_batches(split, batch_size))
