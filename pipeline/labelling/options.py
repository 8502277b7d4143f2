"""What a label run is asked to do (:class:`LabelOptions`) and what it did (:class:`LabelResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from speclabel.core.errors import UsageError
from speclabel.core.faults import Fault

from ..catalogue import CatalogueLayout, WriteOptions
from ..lock import DEFAULT_LOCK_TIMEOUT_S
from .batch import FlagThresholds
from .labeller import PRECISIONS

SALIENCY_CHOICES = ("summary", "full", "none")


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
    # Refine the labels with the model's reference spectra, where it has them
    # (model/refine.py): 0.69x the spectra/s on 2 CPUs (BENCHMARKS.md); False: the network alone.
    refine: bool = True
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
