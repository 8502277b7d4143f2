"""The train job: the ensemble's members fitted in parallel as Ray Tune trials, then one model directory.

The steps are those of ``model.fit.fit_ensemble``, with the members in parallel:

1. resolve and scan the input (``pipeline.training_data``): validation, quarantine, accounting, fingerprint;
   the used rows are held in memory (put in the object store once) or streamed with Ray Data;
2. the label scaling from every used row outside the common test split (``model.fit.fit_scaler``);
3. one Tune trial per candidate member, ``tune.with_resources`` of ``cpus_per_member`` CPUs and
   ``gpus_per_member`` GPUs, each running ``model.training.train_member`` on its own train/val rows
   and reporting every epoch with a checkpoint (``TrainingState``) in the run folder under storage;
4. when every member has finished: ``model.fit.assemble_ensemble`` (selection, provenance), the
   ensemble's metrics on the common test split, ``model.io.save_model`` (atomic), summary tables.

Resume: the run folder is ``<storage>/<name>`` (by default ``<out's parent>/.speclabel-train/<out's
name>``). Rerunning the same command, or passing ``resume``, finds it and continues it with
``tune.Tuner.restore(..., resume_errored=True)``: finished members are not trained again and every
other member continues from its last epoch checkpoint. The run folder also holds ``job.json`` (what
the run trains on and with which settings: a rerun with other data or settings is refused) and
``quarantine.parquet`` (the input rows not used, with reasons).

Fault injection for tests (``core.faults``): ``SPECLABEL_FAULT="train.epoch:member=1,epoch=2"`` makes
member 1 fail right after its epoch-2 checkpoint, once: a member resumed from that checkpoint does not
reach epoch 2 again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from speclabel.core.config import dataclass_from_dict
from speclabel.core.errors import ConfigError, InputError, SpeclabelError
from speclabel.core.faults import Fault, fault_point, planned_fault
from speclabel.core.setups import DEFAULT_SETUP, Setup, get_setup
from speclabel.core.storage import (
    atomic_output,
    exists,
    filesystem_and_path,
    join,
    read_json,
    resolve_files,
    write_json_atomic,
)
from speclabel.model.arch import DEFAULT_ARCH, ArchConfig, arch_from_toml, build_network, get_arch
from speclabel.model.ensemble import Ensemble
from speclabel.model.fit import EnsembleConfig, assemble_ensemble, fit_scaler
from speclabel.model.io import MODEL_JSON, save_model
from speclabel.model.metrics import metrics_by_snr
from speclabel.model.scaling import LabelScaler
from speclabel.model.splits import SplitRule
from speclabel.model.training import MemberResult, TrainConfig, TrainingState, input_reference, train_member
from speclabel.pipeline.ray_session import ray_session
from speclabel.pipeline.training_data import (
    PARQUET_EXTENSIONS,
    InMemoryRows,
    StreamingRows,
    TrainingSet,
    resolve_input,
    scan_in_memory,
    scan_streaming,
)

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
QUARANTINE_FILE = "quarantine.parquet"
RUNS_FOLDER = ".speclabel-train"
STREAMING_MODES = ("auto", "on", "off")
GPU_CHOICES = ("auto", "0", "1")


class TrainingFailed(SpeclabelError):
    """One or more members failed; their checkpoints are kept for a resumed run."""


@dataclass(frozen=True)
class TrainJob:
    """Everything ``speclabel train`` was asked to do."""

    data: str
    out: str
    arch: ArchConfig = field(default_factory=lambda: get_arch(DEFAULT_ARCH))
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    setup: str | None = None  # a setup name or TOML file; None: the input's declared setup
    gpus_per_member: str = "auto"
    cpus_per_member: float = 1.0
    storage: str | None = None
    name: str | None = None
    resume: bool = False
    max_failures: int = 2
    streaming: str = "auto"
    memory_fraction: float = 0.25  # of a node's memory the in-memory rows may take, over all its members
    address: str | None = None

    def __post_init__(self) -> None:
        if self.streaming not in STREAMING_MODES:
            raise ConfigError(f"streaming must be one of {STREAMING_MODES}, got {self.streaming!r}")
        if str(self.gpus_per_member) not in GPU_CHOICES:
            raise ConfigError(f"gpus per member must be one of {GPU_CHOICES}, got {self.gpus_per_member!r}")
        if not self.cpus_per_member > 0:
            raise ConfigError(f"cpus per member must be > 0, got {self.cpus_per_member}")
        if self.max_failures < 0:
            raise ConfigError(f"max failures must be >= 0, got {self.max_failures}")

    @property
    def run_name(self) -> str:
        return self.name or self.out.rstrip("/").rsplit("/", 1)[-1]

    @property
    def storage_path(self) -> str:
        """Where run folders live: ``storage``, else a hidden folder beside the model directory."""
        location = self.storage or join(
            self.out.rstrip("/").rsplit("/", 1)[0] if "/" in self.out else ".", RUNS_FOLDER
        )
        if "://" in location:
            return location
        return str(Path(location).absolute())

    @property
    def run_path(self) -> str:
        return join(self.storage_path, self.run_name)


def read_model_config(path: str | os.PathLike) -> dict:
    """``model.toml``: ``arch`` (preset name, TOML path or ``[arch]`` table), ``[train]``, ``[ensemble]``.

    Returns the keyword arguments of :class:`TrainJob` that the file sets.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(document) - {"arch", "train", "ensemble", "setup"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: arch, train, ensemble, setup")
    out: dict = {}
    if "arch" in document:
        arch = document["arch"]
        out["arch"] = get_arch(arch) if isinstance(arch, str) else arch_from_toml(path)
    if "train" in document:
        out["train"] = TrainConfig.from_dict(document["train"])
    if "ensemble" in document:
        out["ensemble"] = ensemble_config(document["ensemble"], source=str(path))
    if "setup" in document:
        out["setup"] = str(document["setup"])
    return out


def ensemble_config(data: Mapping, *, source: str = "") -> EnsembleConfig:
    values = dict(data)
    if "split" in values:
        values["split"] = dataclass_from_dict(
            SplitRule, values["split"], what=f"[ensemble.split] in {source}"
        )
    return dataclass_from_dict(EnsembleConfig, values, what=f"[ensemble] in {source}")


# -- one member, inside its Tune trial -------------------------------------------------------------


@dataclass(frozen=True)
class MemberSpec:
    """What every member's trial needs besides its rows (passed once with ``tune.with_parameters``)."""

    setup: Setup
    arch: ArchConfig
    train: TrainConfig
    split: SplitRule
    scaler: LabelScaler
    seeds: tuple[int, ...]
    cpus_per_member: float
    fault: Fault | None = None  # SPECLABEL_FAULT, read in the driver (trials may not see its environment)
    reference: np.ndarray | None = None  # the members' common input reference (center_input)


def member_device() -> str:
    """``cuda`` when this trial holds a GPU that torch can use, else ``cpu`` (logged)."""
    import ray
    import torch

    gpu_ids = ray.get_gpu_ids()
    if gpu_ids and torch.cuda.is_available():
        return "cuda"
    if gpu_ids:
        log.warning("this member holds GPU(s) %s but torch sees no CUDA device: training on the CPU", gpu_ids)
    return "cpu"


def member_trial(config: dict, *, spec: MemberSpec, rows: InMemoryRows | StreamingRows) -> None:
    """The Tune function of one member: train (or continue) it and report every epoch."""
    import ray
    import torch
    from ray import tune

    member = int(config["member"])
    seed = spec.seeds[member]
    # A copy: arrays from the object store are read-only, which torch warns about on every batch.
    scaler = LabelScaler.from_dict(spec.scaler.to_dict())
    torch.set_num_threads(max(1, int(spec.cpus_per_member)))
    device = member_device()
    train, val = rows.member(spec.split, seed)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = TrainingState.load(folder)
    common = {
        "member": member,
        "seed": seed,
        "max_epochs": spec.train.epochs,
        "device": device,
        "node": ray.get_runtime_context().get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "resumed_from_epoch": resume.epoch if resume is not None else 0,
    }

    def report_epoch(metrics, state: TrainingState) -> None:
        with tempfile.TemporaryDirectory() as folder:
            state.save(folder)
            tune.report(
                {**common, **metrics.to_dict(), "stopped": state.stopped, "member_finished": False},
                checkpoint=tune.Checkpoint.from_directory(folder),
            )
        fault_point("train.epoch", spec.fault, member=member, epoch=metrics.epoch)

    result = train_member(
        spec.arch,
        spec.setup,
        scaler,
        spec.train.replace(seed=seed),
        train,
        val,
        resume=resume,
        on_epoch=report_epoch,
        device=device,
        reference=spec.reference,
    )
    tune.report(
        {
            **common,
            "epoch": result.epochs_run,
            "best_val_loss": result.best_val_loss,
            "best_epoch": result.best_epoch,
            "stopped": result.stopped_early,
            "n_train": result.n_train,
            "n_val": result.n_val,
            "val_metrics": result.val_metrics,
            "member_finished": True,
        }
    )


# -- progress a person can follow ------------------------------------------------------------------


def _progress_callback():
    from ray import tune

    class MemberProgress(tune.Callback):
        """One line per member epoch (loss, best validation loss, ETA), and per finished or failed member."""

        def __init__(self, n_members: int):
            self.n_members = n_members
            self.finished: set[int] = set()
            self.seconds: dict[int, list[float]] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            member = result.get("member")
            if member is None:
                return
            if result.get("member_finished"):
                self.finished.add(member)
                early = " (stopped early)" if result["stopped"] else ""
                print(
                    f"member {member}: finished, best val loss {result['best_val_loss']:.4g} at epoch "
                    f"{result['best_epoch']} of {result['epoch']}{early}"
                    f"  [{len(self.finished)}/{self.n_members} members done]",
                    flush=True,
                )
                return
            times = self.seconds.setdefault(member, [])
            if not times and result.get("resumed_from_epoch"):
                print(f"member {member}: resumed from its checkpoint at epoch {result['resumed_from_epoch']}")
            times.append(float(result["seconds"]))
            remaining = 0 if result["stopped"] else result["max_epochs"] - result["epoch"]
            eta = dt.timedelta(seconds=round(float(np.mean(times)) * remaining))
            print(
                f"member {member}  epoch {result['epoch']:>4}/{result['max_epochs']}  "
                f"loss {result['train_loss']:.4g}  val {result['val_loss']:.4g}  "
                f"best {result['best_val_loss']:.4g}@{result['best_epoch']}  "
                f"{result['seconds']:.1f} s/epoch  ETA {eta}  [{result['device']}]",
                flush=True,
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            member = trial.config.get("member")
            epoch = (trial.last_result or {}).get("epoch", 0)
            print(
                f"member {member}: FAILED after epoch {epoch}; its checkpoint is kept for a rerun", flush=True
            )

    return MemberProgress


# -- the driver ------------------------------------------------------------------------------------


@dataclass
class MemberSummary:
    member: int
    seed: int
    status: str  # "finished", "failed", "stopped" (interrupted) or "pending" (never started)
    epochs: int = 0
    best_epoch: int = 0
    best_val_loss: float = math.nan
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    device: str = ""
    node: str = ""
    gpu_ids: tuple[str, ...] = ()
    kept: bool = False
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


def run_training(job: TrainJob, *, echo: Callable[[str], None] = print) -> TrainOutcome:
    """Run the whole job (see the module docstring); raises :class:`SpeclabelError` on failure."""

    started = time.perf_counter()
    out_fs, out_path = filesystem_and_path(job.out)
    if exists(out_fs, join(out_path, MODEL_JSON)):
        raise SpeclabelError(f"a model already exists at {job.out}: choose another --out, or remove it first")
    with ray_session(job.address):
        setup = job_setup(job)
        training_input = resolve_input(job.data, setup)
        gpus = member_gpus(job.gpus_per_member)
        mode = data_mode(job, training_input.estimated_bytes(setup), gpus)
        gib = training_input.estimated_bytes(setup) / 2**30
        echo(
            f"train: {training_input.n_rows} rows in {len(training_input.files)} file(s) at {job.data}; "
            f"setup {setup.name}; data {mode} (~{gib:.2f} GiB as arrays)"
        )
        if mode == "memory":
            training_set, rows = scan_in_memory(training_input, setup)
        else:
            training_set = scan_streaming(training_input, setup, num_cpus=min(1.0, job.cpus_per_member))
            rows = StreamingRows(training_input, setup, training_set.excluded_ids)
        echo(
            f"train: {training_set.n_input} in = {training_set.n_used} used + "
            f"{training_set.n_input - training_set.n_used} quarantined "
            f"{training_set.quarantined_by_reason() or ''}"
        )
        split = job.ensemble.split
        scaler = fit_scaler(training_set.label_arrays(), split, job.ensemble.scaling)
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
        results = fit_members(job, spec, rows, gpus, echo)
        summaries = [summarise_result(spec, member, results.get(member)) for member in range(len(spec.seeds))]
        failed = [s for s in summaries if s.status != "finished"]
        if failed:
            echo(member_table(summaries))
            raise TrainingFailed(
                f"{len(failed)} of {len(summaries)} members did not finish "
                f"({'; '.join(f'member {s.member}: {s.error}' for s in failed)}); no model was written. "
                f"Their checkpoints are in {job.run_path}: rerun the same command (or add --resume) to "
                "continue them; finished members are not trained again"
            )
        candidates = [member_result(spec, results[s.member]) for s in summaries]
        ensemble = assemble_ensemble(
            setup,
            job.arch,
            scaler,
            candidates,
            ensemble_config=job.ensemble,
            train_config=job.train,
            test=None,
            data={**training_set.describe(mode), "run": job.run_path},
        )
        test = test_metrics(ensemble, rows, split)
        if test is not None:
            ensemble.info["metrics"]["test"] = test
        model_id = save_model(ensemble, job.out)
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
        )
        echo(member_table(summaries))
        echo(label_table(ensemble))
        return outcome


def job_setup(job: TrainJob) -> Setup:
    if job.setup is not None:
        return get_setup(job.setup)
    fs, files = resolve_files(job.data, PARQUET_EXTENSIONS)
    metadata = pq.read_schema(files[0], filesystem=fs).metadata or {}
    declared = metadata.get(b"speclabel.setup")
    return get_setup(declared.decode() if declared else DEFAULT_SETUP)


def member_gpus(choice: str) -> int:
    """``auto``: one GPU per member where the cluster has GPUs, else none (never wait for a GPU)."""
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


def data_mode(job: TrainJob, estimated_bytes: int, gpus: int) -> str:
    """``memory`` when the rows fit a node's share of memory for every member it runs, else ``streaming``."""
    if job.streaming != "auto":
        return "streaming" if job.streaming == "on" else "memory"
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    per_node = []
    for resources in nodes:
        slots = resources.get("CPU", 0) // job.cpus_per_member
        if gpus:
            slots = min(slots, resources.get("GPU", 0) // gpus)
        if slots >= 1 and resources.get("memory"):
            per_node.append(job.memory_fraction * resources["memory"] / min(slots, len(job.ensemble.seeds)))
    budget = min(per_node) if per_node else 0
    return "memory" if estimated_bytes <= budget else "streaming"


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
    }


def prepare_run_folder(job: TrainJob, spec: MemberSpec, training_set: TrainingSet) -> None:
    """Write (or, on resume, check) job.json and write the quarantine table of this input."""
    from ray import tune

    fs, root = filesystem_and_path(job.run_path)
    identity = json.loads(json.dumps(job_identity(spec, job, training_set)))
    job_file = join(root, JOB_FILE)
    if tune.Tuner.can_restore(job.run_path):
        recorded = read_json(fs, job_file) if exists(fs, job_file) else {}
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


def fit_members(job: TrainJob, spec: MemberSpec, rows, gpus: int, echo: Callable[[str], None]) -> dict:
    """Run (or resume) the Tune experiment; returns ``{member: ray.tune.Result}``."""
    # Tune's own console output (a banner, status tables, a warning when members checkpoint often,
    # which they do every epoch by design) is replaced by the per-member lines of MemberProgress.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    from ray import tune

    resources = {"CPU": job.cpus_per_member, **({"GPU": gpus} if gpus else {})}
    trainable = tune.with_resources(tune.with_parameters(member_trial, spec=spec, rows=rows), resources)
    n_members = len(spec.seeds)
    if tune.Tuner.can_restore(job.run_path):
        echo(f"train: resuming run {job.run_path}")
        tuner = tune.Tuner.restore(job.run_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        echo(
            f"train: run {job.run_path}: {n_members} members, {resources} each, "
            f"up to {job.train.epochs} epochs"
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"member": tune.grid_search(list(range(n_members)))},
            tune_config=tune.TuneConfig(
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name, reuse_actors=False
            ),
            run_config=tune.RunConfig(
                name=job.run_name,
                storage_path=job.storage_path,
                failure_config=tune.FailureConfig(max_failures=job.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[_progress_callback()(n_members)],
                verbose=0,
            ),
        )
    grid = tuner.fit()
    # A member that never started (the run was interrupted first) has no result folder, no config.
    return {int(result.config["member"]): result for result in grid if result.config}


def _trial_name(trial) -> str:
    return f"member-{trial.config['member']}"


def summarise_result(spec: MemberSpec, member: int, result) -> MemberSummary:
    summary = MemberSummary(member=member, seed=spec.seeds[member], status="failed")
    if result is None:
        summary.status, summary.error = "pending", "not started"
        return summary
    metrics = result.metrics or {}
    summary.epochs = int(metrics.get("epoch", 0))
    summary.best_epoch = int(metrics.get("best_epoch", 0))
    summary.best_val_loss = float(metrics.get("best_val_loss", math.nan))
    summary.stopped_early = bool(metrics.get("stopped", False))
    summary.resumed_from_epoch = int(metrics.get("resumed_from_epoch", 0))
    summary.device = str(metrics.get("device", ""))
    summary.node = str(metrics.get("node", ""))
    summary.gpu_ids = tuple(metrics.get("gpu_ids", ()))
    if result.error is not None:
        summary.error = f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:200]}"
    elif metrics.get("member_finished"):
        summary.status = "finished"
    else:  # interrupted (Ctrl-C, a lost driver connection) before it finished
        summary.status, summary.error = "stopped", f"stopped after epoch {summary.epochs} without finishing"
    return summary


def member_result(spec: MemberSpec, result) -> MemberResult:
    """A finished member as ``model.fit.assemble_ensemble`` takes it: best weights from its checkpoint."""
    with result.checkpoint.as_directory() as folder:
        state = TrainingState.load(folder)
    network = build_network(spec.arch, spec.setup)
    network.load_state_dict(state.best_model)
    metrics = result.metrics
    return MemberResult(
        network=network,
        seed=int(metrics["seed"]),
        best_val_loss=state.best_val_loss,
        best_epoch=state.best_epoch,
        epochs_run=len(state.history),
        stopped_early=state.stopped,
        history=state.history,
        n_train=int(metrics["n_train"]),
        n_val=int(metrics["n_val"]),
        val_metrics=metrics["val_metrics"],
    )


def test_metrics(ensemble: Ensemble, rows, split: SplitRule, batch_size: int = 256) -> dict | None:
    """The ensemble on the common test split, batch by batch (``model.metrics.metrics_by_snr``)."""
    mean, std, labels, snr = [], [], [], []
    for batch in rows.test_batches(split, batch_size):
        if not len(batch["labels"]):
            continue
        prediction = ensemble.predict(batch["flux"], batch["mask"])
        mean.append(prediction.mean)
        std.append(prediction.std)
        labels.append(np.asarray(batch["labels"], dtype=np.float64))
        snr.append(np.asarray(batch["snr"], dtype=np.float64) if "snr" in batch else None)
    if not labels:
        return None
    snr_all = None if any(s is None for s in snr) else np.concatenate(snr)
    # One member has no ensemble spread (std is NaN): no std ratio, rather than NaN in model.json.
    spread = np.concatenate(std) if ensemble.n_members > 1 else None
    return metrics_by_snr(
        np.concatenate(mean), np.concatenate(labels), ensemble.label_names, snr_all, std=spread
    )


# -- tables ----------------------------------------------------------------------------------------


def member_table(summaries: list[MemberSummary]) -> str:
    lines = [
        "",
        f"{'member':>6} {'seed':>5} {'status':<9} {'epochs':>6} {'best@':>5} {'best val loss':>13} "
        f"{'early':>5} {'resumed@':>8} {'kept':>4} {'device':<6} node",
    ]
    for s in summaries:
        lines.append(
            f"{s.member:>6} {s.seed:>5} {s.status:<9} {s.epochs:>6} {s.best_epoch:>5} "
            f"{s.best_val_loss:>13.5g} "
            f"{'yes' if s.stopped_early else 'no':>5} {s.resumed_from_epoch or '-':>8} "
            f"{'yes' if s.kept else 'no':>4} {s.device:<6} {s.node[:12]}"
        )
    return "\n".join(lines)


def label_table(ensemble: Ensemble) -> str:
    """Per label: bias and scatter on the validation split (mean over kept members) and on the test split."""
    test = ensemble.info.get("metrics", {}).get("test", {}).get("all", {})
    lines = [
        "",
        f"{'label':<6} {'val bias':>10} {'val scatter':>11} {'test n':>6} {'test bias':>10} "
        f"{'test scatter':>12} {'std ratio':>9}",
    ]
    for name in ensemble.label_names:
        val = [m["validation"][name] for m in ensemble.member_info]
        t = test.get(name, {})
        bias = np.mean([_number(v["bias"]) for v in val])
        scatter = np.mean([_number(v["scatter"]) for v in val])
        lines.append(
            f"{name:<6} {bias:>10.4g} {scatter:>11.4g} "
            f"{t.get('n', 0):>6} {_number(t.get('bias')):>10.4g} {_number(t.get('scatter')):>12.4g} "
            f"{_number(t.get('std_ratio')):>9.3g}"
        )
    lines.append(
        "validation: each kept member on its own validation rows, averaged; test: the ensemble mean on the "
        "common test split (std ratio = rms ensemble std / rms error)"
    )
    return "\n".join(lines)


def _number(value) -> float:
    """A metric as a float: model.json writes an undefined one (NaN) as null."""
    return math.nan if value is None else float(value)
