"""The tiny architecture and the small label arrays that the model, label and report tests share.

A test that needs another size derives it (``TINY_ARCH.replace(dropout=0.3)``) rather than spelling
a whole configuration again.
"""

from __future__ import annotations

import numpy as np

from speclabel.model.arch import ArchConfig

# Two small conv layers and one dense layer: a few hundred weights on the tiny setups, fast on CPU.
TINY_ARCH = ArchConfig(
    name="tiny", conv_channels=(3, 2), kernel_size=5, pool_size=2, dense_units=(8,), dropout=0.0
)

# Three stars (teff, logg, feh, mgfe, alfe) spanning plausible ranges: enough to fit a label scaling.
LABELS = np.array(
    [[4500.0, 2.5, -0.3, 0.2, 0.1], [5800.0, 4.4, 0.1, 0.0, -0.05], [5100.0, 3.1, -1.2, 0.35, 0.3]]
)

# Where random test stars' labels are drawn from: (low, high) per label (teff, logg, feh, mgfe, alfe).
LABEL_RANGES = ((4000.0, 6500.0), (1.0, 5.0), (-2.0, 0.4), (-0.2, 0.4), (-0.3, 0.4))


def uniform_labels(rng: np.random.Generator, n: int, ranges=LABEL_RANGES) -> np.ndarray:
    """``n`` stars' labels ``[n, 5]``, each uniform in its ``(low, high)`` of ``ranges``."""
    return np.column_stack([rng.uniform(low, high, n) for low, high in ranges])
