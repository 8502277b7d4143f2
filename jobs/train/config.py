"""What ``speclabel train`` is asked to do: :class:`TrainJob`, and ``model.toml`` read into its fields."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from speclabel.core.config import dataclass_from_dict
from speclabel.core.errors import ConfigError, SpeclabelError
from speclabel.core.storage import join
from speclabel.model.arch import DEFAULT_ARCH, ArchConfig, arch_from_toml, get_arch
from speclabel.model.fit import EnsembleConfig
from speclabel.model.ood import OODConfig
from speclabel.model.refine import RefineConfig
from speclabel.model.splits import SplitRule
from speclabel.model.training import TrainConfig
from speclabel.pipeline.training_labels import SPECTRUM_ID, LabelMapping, label_mapping_from_toml

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
    ood: OODConfig = field(default_factory=OODConfig)  # post-training: not in the run's identity
    # Noise-free reference spectra for the label refinement, and its settings; post-training too.
    reference_spectra: str | None = None
    refine: RefineConfig = field(default_factory=RefineConfig)
    setup: str | None = None  # a setup name or TOML file; None: the input's declared setup
    exclude: str | None = None  # a Parquet/CSV with spectrum_id: rows left out (speclabel screen's output)
    gpus_per_member: str = "auto"  # per worker: a member of N workers holds N x this
    cpus_per_member: float = 1.0  # per worker, likewise
    workers_per_member: int = 1  # data-parallel (DDP) workers of one member
    storage: str | None = None
    name: str | None = None
    resume: bool = False
    max_failures: int = 2
    streaming: str = "auto"
    memory_fraction: float = 0.25  # of a node's memory the in-memory rows may take, over all its members
    address: str | None = None
    labels: LabelMapping = field(default_factory=LabelMapping)  # [labels] + [selection] of model.toml
    label_catalogue: str | None = None  # a FITS/Parquet/CSV table of labels, joined by id
    id_column: str = SPECTRUM_ID  # its column holding the spectra's spectrum_id

    def __post_init__(self) -> None:
        # The network has one output per label of the model.
        if self.arch.n_outputs != len(self.labels.names):
            object.__setattr__(self, "arch", self.arch.replace(n_outputs=len(self.labels.names)))
        if self.streaming not in STREAMING_MODES:
            raise ConfigError(f"streaming must be one of {STREAMING_MODES}, got {self.streaming!r}")
        if str(self.gpus_per_member) not in GPU_CHOICES:
            raise ConfigError(f"gpus per member must be one of {GPU_CHOICES}, got {self.gpus_per_member!r}")
        if not self.cpus_per_member > 0:
            raise ConfigError(f"cpus per member must be > 0, got {self.cpus_per_member}")
        if self.workers_per_member < 1:
            raise ConfigError(f"workers per member must be >= 1, got {self.workers_per_member}")
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
    """``model.toml``: ``arch`` (preset name, TOML path or ``[arch]`` table), ``[train]``, ``[ensemble]``,
    ``[labels]`` and ``[selection]`` (``pipeline.training_labels``).

    Returns the keyword arguments of :class:`TrainJob` that the file sets.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    known = ("arch", "train", "ensemble", "setup", "labels", "selection", "ood", "refine")
    unknown = sorted(set(document) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {', '.join(known)}")
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
    if "labels" in document or "selection" in document:
        out["labels"] = label_mapping_from_toml(document, source=str(path))
    if "ood" in document:
        out["ood"] = OODConfig.from_dict(document["ood"])
    if "refine" in document:
        out["refine"] = RefineConfig.from_dict(document["refine"])
    return out


def ensemble_config(data: Mapping, *, source: str = "") -> EnsembleConfig:
    values = dict(data)
    if "split" in values:
        values["split"] = dataclass_from_dict(
            SplitRule, values["split"], what=f"[ensemble.split] in {source}"
        )
    return dataclass_from_dict(EnsembleConfig, values, what=f"[ensemble] in {source}")
