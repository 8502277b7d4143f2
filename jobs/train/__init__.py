"""The train job: every ensemble member as its own Ray Train run, in parallel, then one model directory.

``config`` (:class:`TrainJob`, ``model.toml``), ``member`` (a member's Train run and its workers'
loop), ``progress`` (member lines through the job's reporter), ``run`` (the driver: scan, run folder,
resume, assembly), ``tables`` (the closing tables). The names below are the job's Python interface.
"""

from .config import (
    JOB_FILE,
    QUARANTINE_FILE,
    RUNS_FOLDER,
    TrainingFailed,
    TrainJob,
    ensemble_config,
    read_model_config,
)
from .member import MemberSpec, member_device, member_loop
from .progress import MemberProgress
from .run import MemberSummary, TrainOutcome, data_mode, member_gpus, run_training, test_metrics
from .tables import label_table, member_table

__all__ = [
    "JOB_FILE",
    "QUARANTINE_FILE",
    "RUNS_FOLDER",
    "MemberProgress",
    "MemberSpec",
    "MemberSummary",
    "TrainJob",
    "TrainOutcome",
    "TrainingFailed",
    "data_mode",
    "ensemble_config",
    "label_table",
    "member_device",
    "member_gpus",
    "member_loop",
    "member_table",
    "read_model_config",
    "run_training",
    "test_metrics",
]
