"""One ensemble member as one Ray Train V2 run: the loop its workers run and the trainer that runs it.

A member is a ``ray.train.torch.TorchTrainer`` of ``--workers-per-member`` workers (one by default)
with ``--cpus-per-member`` CPUs and ``--gpus-per-member`` GPUs each, whose run folder is
``<run folder>/member-<i>`` (``RunConfig(name, storage_path)``). Every epoch rank 0 reports the
member's ``model.training.TrainingState`` (safetensors + JSON) as a Train checkpoint; Train keeps
its own record of them as JSON (``checkpoint_manager_snapshot.json``), so rerunning the same run
hands :func:`member_loop` the latest checkpoint through ``ray.train.get_checkpoint()`` and nothing
read on resume is a pickle. A worker that dies or raises is restarted from that checkpoint up to
``--max-failures`` times within the run (``FailureConfig``).

With several workers the member trains data-parallel (``model.training.DataParallel``): DDP through
``ray.train.torch.prepare_model`` (gloo on CPUs), each worker on its part of every batch
(in-memory rows) or on its Ray Data shard (streamed rows, ``get_dataset_shard``), losses summed
over the workers; every worker evaluates the whole validation split.

Fault injection (``core.faults``): ``train.epoch`` is checked on every worker right after each
epoch's checkpoint is recorded by Train, with ``member``, ``epoch`` and ``rank``; the
:class:`~speclabel.core.faults.Fault` is read in the driver and travels in :class:`MemberSpec`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass

import numpy as np

from speclabel.core.faults import Fault, fault_point
from speclabel.core.setups import Setup
from speclabel.model.arch import ArchConfig
from speclabel.model.scaling import LabelScaler
from speclabel.model.splits import SplitRule
from speclabel.model.training import DataParallel, Shard, TrainConfig, TrainingState, train_member
from speclabel.pipeline.training_data import ShardBatches

log = logging.getLogger(__name__)

# Events a member's run sends to the driver's progress (see progress.py), through a Ray queue.
EPOCH, FINISHED, WORKER_FAILED = "epoch", "finished", "worker_failed"


@dataclass(frozen=True)
class MemberSpec:
    """What every member's workers need besides their rows."""

    setup: Setup
    arch: ArchConfig
    train: TrainConfig
    split: SplitRule
    scaler: LabelScaler
    seeds: tuple[int, ...]
    cpus_per_member: float
    fault: Fault | None = None  # SPECLABEL_FAULT, read in the driver (workers may not see its environment)
    reference: np.ndarray | None = None  # the members' common input reference (center_input)


def member_name(member: int) -> str:
    """The member's Train run name, and its folder in the run folder."""
    return f"member-{member}"


def member_device() -> str:
    """``cuda`` when this worker holds a GPU that torch can use, else ``cpu`` (logged)."""
    import ray
    import torch

    gpu_ids = ray.get_gpu_ids()
    if gpu_ids and torch.cuda.is_available():
        return "cuda"
    if gpu_ids:
        log.warning("this member holds GPU(s) %s but torch sees no CUDA device: training on the CPU", gpu_ids)
    return "cpu"


def _worker_rows(config: dict, spec: MemberSpec, seed: int, rank: int, world: int):
    import ray
    import ray.train

    if config["streamed"]:
        return ShardBatches(ray.train.get_dataset_shard("train")), ShardBatches(
            ray.train.get_dataset_shard("val")
        )
    # The driver put the rows in the object store once; every worker on a node reads that copy.
    train, val = ray.get(config["rows"]).member(spec.split, seed)
    return (train if world == 1 else Shard(train, rank, world)), val


def member_loop(config: dict) -> None:
    """What each worker of a member's run does: train (or continue) the member, report every epoch."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    # Train V2 logs each report at INFO under a logger named by its file path, outside the `ray.train`
    # logger that RunConfig's LoggingConfig holds to warnings: one line per epoch buried the progress.
    logging.getLogger().setLevel(logging.WARNING)
    spec: MemberSpec = config["spec"]
    member = int(config["member"])
    seed = spec.seeds[member]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # A copy: arrays from the object store are read-only, which torch warns about on every batch.
    scaler = LabelScaler.from_dict(spec.scaler.to_dict())
    torch.set_num_threads(max(1, int(spec.cpus_per_member)))
    device = member_device()
    train, val = _worker_rows(config, spec, seed, rank, world)
    resume = None
    checkpoint = ray.train.get_checkpoint()
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
        "workers": world,
        "resumed_from_epoch": resume.epoch if resume is not None else 0,
    }
    parallel = None
    if world > 1:
        parallel = DataParallel(
            rank,
            world,
            wrap=lambda network: ray.train.torch.prepare_model(network, move_to_device=False),
            device=device,
        )

    def report_epoch(metrics, state: TrainingState) -> None:
        values = {**common, **metrics.to_dict(), "stopped": state.stopped, "member_finished": False}
        if rank == 0:  # the workers hold the same weights: one of them writes the checkpoint
            with tempfile.TemporaryDirectory() as folder:
                state.save(folder)
                ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(values)
        where = {"member": member, "epoch": metrics.epoch, "rank": rank}
        if spec.fault is not None and spec.fault.matches("train.epoch", where):
            # The fault is a crash after the epoch's checkpoint was recorded. Train records a report
            # asynchronously (a process killed first loses it, and its retry would meet the fault
            # again): wait until the controller holds it.
            ray.train.get_all_reported_checkpoints()
        fault_point("train.epoch", spec.fault, **where)

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
        parallel=parallel,
    )
    ray.train.report(
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


def error_text(error: BaseException) -> str:
    """An exception in one line: its type and the last line of its message (Train's are long)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1][:200] if text else ''}"


def _progress_callback_class():
    from ray.train import UserCallback

    class ProgressToDriver(UserCallback):
        """Runs in the member's Train controller: rank 0's reports and worker failures, to the driver."""

        def __init__(self, member: int, queue):
            self.member, self.queue = member, queue

        def after_report(self, run_context, metrics, checkpoint):
            values = metrics[0]
            kind = FINISHED if values.get("member_finished") else EPOCH
            self.queue.put((kind, self.member, values))

        def after_exception(self, run_context, worker_exceptions):
            errors = "; ".join(
                f"worker {rank}: {error_text(exc)}" for rank, exc in sorted(worker_exceptions.items())
            )
            self.queue.put((WORKER_FAILED, self.member, {"error": errors}))

    return ProgressToDriver


def member_trainer(job, spec: MemberSpec, member: int, rows, gpus: int, queue):
    """The ``TorchTrainer`` of one member (``job``: the ``TrainJob``; ``rows``: an ObjectRef of the
    in-memory rows, or the ``StreamingRows``)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    streamed = getattr(rows, "mode", None) == "streaming"
    seed = spec.seeds[member]
    datasets, dataset_config = None, None
    if streamed:
        # Each member's own fixed row-group order; every epoch a local shuffle seeded by the epoch.
        datasets = {
            "train": rows.part(spec.split, seed, "train").dataset(shuffle_seed=seed),
            "val": rows.part(spec.split, seed, "val").dataset(),
        }
        options = DataConfig.default_ingest_options()
        options.preserve_order = True  # the same batches in a resumed run
        dataset_config = DataConfig(datasets_to_split=["train"], execution_options=options)
    resources = {"CPU": job.cpus_per_member, **({"GPU": gpus} if gpus else {})}
    return TorchTrainer(
        member_loop,
        train_loop_config={
            "spec": spec,
            "member": member,
            "streamed": streamed,
            "rows": None if streamed else rows,
        },
        # One worker never talks to another: gloo needs no GPU (a declared GPU may not be a CUDA device).
        torch_config=TorchConfig(backend="gloo" if job.workers_per_member == 1 else None),
        scaling_config=ScalingConfig(
            num_workers=job.workers_per_member, use_gpu=bool(gpus), resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=member_name(member),
            storage_path=job.run_path,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[_progress_callback_class()(member, queue)],
            # Train's INFO lines (one per report and checkpoint) would bury the members' progress lines.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )
