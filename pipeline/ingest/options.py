"""What ingest does to each spectrum, and how it cuts the work into Ray tasks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from speclabel.core.errors import ConfigError
from speclabel.core.layout import check_release_name

from ..normalise import NORMALISED_MODES, ContinuumConfig

MISSING_ARM_MODES = ("quarantine", "mask")


@dataclass(frozen=True)
class IngestOptions:
    """What ingest does to each spectrum; everything but the task sizes is part of the input fingerprint."""

    release: str
    normalised: str = "auto"  # auto | yes | no (see pipeline.normalise)
    default_medium: str = "air"  # medium of wavelengths whose file does not declare one
    missing_arm: str = "quarantine"  # quarantine | mask: a star without a file for some arm
    rv_shift: bool = True  # shift to the rest frame by the header's radial velocity
    min_arm_coverage: float = 0.5  # of an arm, for a file whose header names no setup
    resolution_tolerance: float = 0.25  # |SPEC_RES / arm R - 1| above this is another instrument
    continuum: ContinuumConfig = field(default_factory=ContinuumConfig)
    stars_per_task: int = 256
    files_per_scan_task: int = 512

    def __post_init__(self) -> None:
        check_release_name(self.release)
        if self.normalised not in NORMALISED_MODES:
            raise ConfigError(f"normalised must be one of {NORMALISED_MODES}, not {self.normalised!r}")
        if self.missing_arm not in MISSING_ARM_MODES:
            raise ConfigError(f"missing_arm must be one of {MISSING_ARM_MODES}, not {self.missing_arm!r}")
        if self.default_medium not in ("air", "vacuum"):
            raise ConfigError(f"default_medium must be air or vacuum, not {self.default_medium!r}")

    def fingerprint_fields(self) -> dict:
        fields = asdict(self)
        for layout_only in ("stars_per_task", "files_per_scan_task"):
            fields.pop(layout_only)
        return fields
