"""Saliency: input gradients d(label_k) / d(flux) of the ensemble mean, in physical label units per unit flux.

For each member one forward pass, then one backward pass per label through the same graph (the
weights need no gradients, so each backward computes input gradients only). The ensemble-mean
gradient is the mean of the members' gradients, each multiplied by its label's scale (scaled ->
physical units). Gradients at masked pixels are set to zero: the network saw the continuum there,
not data, so no label was read from those pixels.

Full maps are ``n_labels x n_pixels`` per spectrum, so three reductions are offered:

* :func:`summarise`: per spectrum and label, the share of |gradient| inside each named line-window
  group of the setup (``Setup.window_masks()``), and the wavelength of the peak |gradient|;
* full maps, for a selected subset (``Ensemble.predict(..., saliency="full")``);
* :class:`SaliencyAccumulator`: population sums (of the gradient, of |gradient|, and a count) that
  merge across batches and workers, for population-averaged maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from speclabel.core.errors import IntegrityError
from speclabel.core.setups import Setup


def member_gradients(
    network: nn.Module, flux: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled predictions ``[B, L]`` and their input gradients ``[B, L, P]`` for one network.

    Rows of a batch do not interact (no batch statistics in the network), so the gradient of the
    batch sum of label k with respect to the input holds each row's own d(label_k)/d(flux).
    """
    x = flux.detach().requires_grad_(True)
    with torch.enable_grad():
        out = network(x, mask)
        n_labels = out.shape[1]
        grads = [
            torch.autograd.grad(out[:, k].sum(), x, retain_graph=k < n_labels - 1)[0] for k in range(n_labels)
        ]
    return out.detach(), torch.stack(grads, dim=1)


@dataclass
class SaliencySummary:
    """Per spectrum and label: where the |gradient| lies.

    ``shares[b, k, g]``: fraction of sum |d label_k / d flux| falling in window group ``groups[g]``;
    ``peak_wave[b, k]``: wavelength (Angstrom) of the largest |gradient|; ``total_abs[b, k]``: the
    sum of |gradient| over all pixels (physical label units per unit flux).
    """

    groups: tuple[str, ...]
    shares: np.ndarray  # [B, L, G] float32
    peak_wave: np.ndarray  # [B, L] float64
    total_abs: np.ndarray  # [B, L] float32

    @classmethod
    def concatenate(cls, parts: list[SaliencySummary]) -> SaliencySummary:
        return cls(
            parts[0].groups,
            np.concatenate([p.shares for p in parts]),
            np.concatenate([p.peak_wave for p in parts]),
            np.concatenate([p.total_abs for p in parts]),
        )


def summarise(gradients: np.ndarray, setup: Setup) -> SaliencySummary:
    """The compact summary of full maps ``[B, L, P]``."""
    masks = setup.window_masks()
    groups = tuple(masks)
    magnitude = np.abs(gradients)
    total = magnitude.sum(axis=2, dtype=np.float64)
    shares = np.zeros((*total.shape, len(groups)))
    for g, window in enumerate(masks.values()):
        shares[:, :, g] = magnitude[:, :, window].sum(axis=2, dtype=np.float64)
    # A zero map (a label that ignores its input) has zero shares everywhere, not NaN.
    np.divide(shares, total[:, :, None], out=shares, where=total[:, :, None] > 0)
    peak_wave = setup.wave[magnitude.argmax(axis=2)]
    return SaliencySummary(groups, shares.astype(np.float32), peak_wave, total.astype(np.float32))


@dataclass
class SaliencyAccumulator:
    """Population sums of saliency maps: merge partial results from any number of workers.

    ``mean = sum / count`` is the population-averaged gradient (signs can cancel between stars);
    ``mean_abs = sum_abs / count`` shows where labels are read from regardless of sign.
    """

    sum: np.ndarray  # [L, P] float64
    sum_abs: np.ndarray  # [L, P] float64
    count: int = 0

    @classmethod
    def empty(cls, n_labels: int, n_pixels: int) -> SaliencyAccumulator:
        return cls(np.zeros((n_labels, n_pixels)), np.zeros((n_labels, n_pixels)), 0)

    def add(self, gradients: np.ndarray) -> None:
        """Add full maps ``[B, L, P]``."""
        if gradients.shape[1:] != self.sum.shape:
            raise ValueError(f"saliency maps of shape {gradients.shape[1:]} do not fit {self.sum.shape}")
        self.sum += gradients.sum(axis=0, dtype=np.float64)
        self.sum_abs += np.abs(gradients).sum(axis=0, dtype=np.float64)
        self.count += int(gradients.shape[0])

    def merge(self, other: SaliencyAccumulator) -> SaliencyAccumulator:
        if other.sum.shape != self.sum.shape:
            raise IntegrityError(
                f"cannot merge saliency sums of shapes {self.sum.shape} and {other.sum.shape}"
            )
        return SaliencyAccumulator(
            self.sum + other.sum, self.sum_abs + other.sum_abs, self.count + other.count
        )

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.sum_abs / max(self.count, 1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (e.g. for ``np.savez`` or a Parquet row) that :meth:`from_arrays` reads back."""
        return {"sum": self.sum, "sum_abs": self.sum_abs, "count": np.array(self.count, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SaliencyAccumulator:
        return cls(
            np.asarray(arrays["sum"], np.float64),
            np.asarray(arrays["sum_abs"], np.float64),
            int(arrays["count"]),
        )
