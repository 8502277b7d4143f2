"""Label scaling: the network learns scaled labels; predictions come back in physical units.

``scaled = (physical - offset) / scale``, per label. ``standard`` uses the training mean and
standard deviation, ``minmax`` maps the training range onto [0, 1] (as Guiglion et al. 2020). The
scaler also keeps each label's training range, so that predictions outside it can be flagged as
extrapolations. Everything is stored in ``model.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from speclabel.core.errors import ConfigError
from speclabel.core.labels import LABEL_NAMES

SCALING_METHODS = ("standard", "minmax")


@dataclass(frozen=True, eq=False)  # numpy fields: compare with to_dict()
class LabelScaler:
    names: tuple[str, ...]
    method: str
    offset: np.ndarray  # [n_labels] float64
    scale: np.ndarray  # [n_labels] float64, > 0
    train_min: np.ndarray
    train_max: np.ndarray

    def __post_init__(self) -> None:
        if self.method not in SCALING_METHODS:
            raise ConfigError(f"label scaling must be one of {SCALING_METHODS}, not {self.method!r}")
        for name in ("offset", "scale", "train_min", "train_max"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != (len(self.names),):
                raise ConfigError(
                    f"label scaling {name} has shape {value.shape}, expected ({len(self.names)},)"
                )
            if not np.isfinite(value).all():
                raise ConfigError(f"label scaling {name} is not finite: {value}")
            object.__setattr__(self, name, value)
        if (self.scale <= 0).any():
            raise ConfigError(f"label scaling has a non-positive scale: {self.scale}")

    @classmethod
    def fit(
        cls, labels: np.ndarray, method: str = "standard", names: tuple[str, ...] = LABEL_NAMES
    ) -> LabelScaler:
        """Scaling of the training labels ``[N, n_labels]`` (physical units; NaN = a row lacks that
        label, and each label is scaled from the rows that have it)."""
        labels = np.asarray(labels, dtype=np.float64)
        if labels.ndim != 2 or labels.shape[1] != len(names) or labels.shape[0] < 2:
            raise ConfigError(
                f"need labels of shape [N >= 2, {len(names)}] to fit a scaling, got {labels.shape}"
            )
        counts = np.isfinite(labels).sum(axis=0)
        if (counts < 2).any():
            few = [f"{n} ({c})" for n, c in zip(names, counts, strict=True) if c < 2]
            raise ConfigError(f"label(s) {', '.join(few)} have fewer than 2 training values to fit a scaling")
        lo, hi = np.nanmin(labels, axis=0), np.nanmax(labels, axis=0)
        if method == "standard":
            offset, scale = np.nanmean(labels, axis=0), np.nanstd(labels, axis=0)
        elif method == "minmax":
            offset, scale = lo, hi - lo
        else:
            raise ConfigError(f"label scaling must be one of {SCALING_METHODS}, not {method!r}")
        # A label with no spread in the training set (a test set of twins) must not divide by zero.
        scale = np.where(hi > lo, scale, 1.0)
        return cls(tuple(names), method, offset, scale, lo, hi)

    def transform(self, physical: np.ndarray) -> np.ndarray:
        return (np.asarray(physical, dtype=np.float64) - self.offset) / self.scale

    def inverse(self, scaled):
        """Physical labels from scaled ones; works on numpy arrays and torch tensors ``[..., n_labels]``."""
        if isinstance(scaled, np.ndarray):
            return scaled * self.scale + self.offset
        import torch

        return scaled * torch.as_tensor(self.scale, dtype=scaled.dtype) + torch.as_tensor(
            self.offset, dtype=scaled.dtype
        )

    def outside_training_range(self, physical: np.ndarray) -> np.ndarray:
        """Boolean ``[..., n_labels]``: the value lies outside the range the model was trained on."""
        physical = np.asarray(physical)
        return (physical < self.train_min) | (physical > self.train_max)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "names": list(self.names),  # model output order (JSON objects written with sorted keys lose it)
            "labels": {
                name: {
                    "offset": float(self.offset[i]),
                    "scale": float(self.scale[i]),
                    "train_min": float(self.train_min[i]),
                    "train_max": float(self.train_max[i]),
                }
                for i, name in enumerate(self.names)
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> LabelScaler:
        try:
            labels = data["labels"]
            names = tuple(data["names"])
            column = {k: np.array([labels[n][k] for n in names], dtype=np.float64) for k in labels[names[0]]}
            return cls(
                names,
                data["method"],
                column["offset"],
                column["scale"],
                column["train_min"],
                column["train_max"],
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid label scaling {data!r}: {exc!r}") from exc
