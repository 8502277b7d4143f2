"""Instrument setups: wavelength grids, resolution and line windows, as configuration keyed by name.

A setup is plain data. The shipped ones live in ``pipeline/setups/<name>.toml``; a user can point
any ``--setup`` option at their own TOML file of the same shape. Models store their setup in
``model.json`` (:meth:`Setup.to_dict`), so a model always knows the grid it was trained on.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import ConfigError

SPEED_OF_LIGHT_KMS = 299_792.458


@dataclass(frozen=True)
class Arm:
    """One wavelength window of a setup on a linear grid (Angstrom, rest frame)."""

    name: str
    wave_start: float
    wave_step: float
    n_pixels: int
    resolution: float

    @property
    def wave_end(self) -> float:
        return self.wave_start + self.wave_step * (self.n_pixels - 1)

    @property
    def wave(self) -> np.ndarray:
        return self.wave_start + self.wave_step * np.arange(self.n_pixels, dtype=np.float64)

    @property
    def wave_unit(self) -> np.ndarray:
        """The wavelengths mapped linearly onto [-1, 1] over the arm: the coordinate of a continuum tilt."""
        return 2 * (self.wave - self.wave_start) / (self.wave_end - self.wave_start) - 1

    @property
    def flux_column(self) -> str:
        return f"flux_{self.name}"

    @property
    def ivar_column(self) -> str:
        return f"ivar_{self.name}"

    def overlap(self, wave_min: float, wave_max: float) -> float:
        """Fraction of this arm's range covered by [wave_min, wave_max]."""
        lo, hi = max(self.wave_start, wave_min), min(self.wave_end, wave_max)
        return max(0.0, hi - lo) / (self.wave_end - self.wave_start)


@dataclass(frozen=True)
class Setup:
    """An instrument setup: its arms (in model input order) and its named line windows."""

    name: str
    arms: tuple[Arm, ...]
    medium: str = "air"
    description: str = ""
    line_windows: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    label_lines: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.arms:
            raise ConfigError(f"setup {self.name!r} has no arms")
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ConfigError(f"setup {self.name!r} has duplicate arm names {names}")
        if self.medium not in ("air", "vacuum"):
            raise ConfigError(f"setup {self.name!r}: medium must be 'air' or 'vacuum', not {self.medium!r}")
        for group in (g for groups in self.label_lines.values() for g in groups):
            if group not in self.line_windows:
                raise ConfigError(f"setup {self.name!r}: label_lines names unknown window group {group!r}")

    def __hash__(self) -> int:  # dict fields make the dataclass hash unusable; names are unique
        return hash((self.name, self.arms))

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(f"setup {self.name!r} has no arm {name!r} (arms: {[a.name for a in self.arms]})")

    @property
    def n_pixels(self) -> int:
        return sum(arm.n_pixels for arm in self.arms)

    @cached_property
    def wave(self) -> np.ndarray:
        """The model's input grid: all arms concatenated in order."""
        return np.concatenate([arm.wave for arm in self.arms])

    @property
    def arm_slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for arm in self.arms:
            out[arm.name] = slice(start, start + arm.n_pixels)
            start += arm.n_pixels
        return out

    def window_masks(self) -> dict[str, np.ndarray]:
        """Boolean mask over :attr:`wave` for each line-window group."""
        wave = self.wave
        masks = {}
        for group, windows in self.line_windows.items():
            mask = np.zeros(wave.shape, dtype=bool)
            for lo, hi in windows:
                mask |= (wave >= lo) & (wave <= hi)
            masks[group] = mask
        return masks

    def label_line_mask(self, label: str) -> np.ndarray:
        """Boolean mask over :attr:`wave` of the windows ``label`` is read from (its ``label_lines``
        groups); all False for a label that names none."""
        masks = self.window_masks()
        mask = np.zeros(self.wave.shape, dtype=bool)
        for group in self.label_lines.get(label, ()):
            mask |= masks[group]
        return mask

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "medium": self.medium,
            "arms": [
                {
                    "name": a.name,
                    "wave_start": a.wave_start,
                    "wave_step": a.wave_step,
                    "n_pixels": a.n_pixels,
                    "resolution": a.resolution,
                }
                for a in self.arms
            ],
            "line_windows": {g: [list(w) for w in ws] for g, ws in self.line_windows.items()},
            "label_lines": {k: list(v) for k, v in self.label_lines.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Setup:
        try:
            arms = tuple(
                Arm(
                    name=str(a["name"]),
                    wave_start=float(a["wave_start"]),
                    wave_step=float(a["wave_step"]),
                    n_pixels=int(a["n_pixels"]),
                    resolution=float(a["resolution"]),
                )
                for a in data["arms"]
            )
            return cls(
                name=str(data["name"]),
                arms=arms,
                medium=str(data.get("medium", "air")),
                description=str(data.get("description", "")),
                line_windows={
                    g: tuple((float(lo), float(hi)) for lo, hi in ws)
                    for g, ws in data.get("line_windows", {}).items()
                },
                label_lines={k: tuple(v) for k, v in data.get("label_lines", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid setup definition: {exc!r}") from exc

    def same_grid(self, other: Setup) -> bool:
        """True when both setups put flux on identical pixels (names may differ)."""
        return [(a.name, a.wave_start, a.wave_step, a.n_pixels) for a in self.arms] == [
            (a.name, a.wave_start, a.wave_step, a.n_pixels) for a in other.arms
        ]


DEFAULT_SETUP = "giraffe-hr10-hr21"


def available_setups() -> list[str]:
    folder = resources.files(__package__) / "setups"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def get_setup(name_or_path: str = DEFAULT_SETUP) -> Setup:
    """A shipped setup by name, or a setup TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        text = path.read_text()
    else:
        shipped = resources.files(__package__) / "setups" / f"{name_or_path}.toml"
        if not shipped.is_file():
            raise ConfigError(
                f"unknown setup {name_or_path!r}: shipped setups are {available_setups()}, "
                "or give the path of a setup .toml file"
            )
        text = shipped.read_text()
    try:
        return Setup.from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"setup {name_or_path!r} is not valid TOML: {exc}") from exc
