"""Which data a model was trained on: an order-free, mergeable fingerprint of a labelled spectra table.

Each row contributes sha256(spectrum_id, sha256 of its flux and ivar, its labels); the fingerprint
is the count and the sum of those digests modulo 2**256. Row order, batching and the number of
workers do not change it, partial fingerprints from many workers merge by addition, and any change
to an id, a pixel or a label changes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..pipeline.contract import LABEL_NAMES, spectra_arrays, spectrum_sha256
from ..pipeline.setups import Setup

_MODULUS = 2**256


@dataclass
class DataFingerprint:
    count: int = 0
    total: int = 0

    def add_table(self, table: pa.Table, setup: Setup) -> DataFingerprint:
        return self.add_digests(row_digests(table, setup))

    def add_digests(self, digests) -> DataFingerprint:
        """Add rows by their :func:`row_digests` (a streaming job keeps digests, not rows)."""
        for row_digest in digests:
            self.total = (self.total + int.from_bytes(row_digest, "big")) % _MODULUS
            self.count += 1
        return self

    def merge(self, other: DataFingerprint) -> DataFingerprint:
        return DataFingerprint(self.count + other.count, (self.total + other.total) % _MODULUS)

    @property
    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.count}:{self.total:064x}".encode()).hexdigest()[:32]


def row_digests(table: pa.Table, setup: Setup) -> list[bytes]:
    """Each row's 32-byte contribution: sha256 of its id, its flux and ivar content and its labels."""
    content = spectrum_sha256(spectra_arrays(table, setup), setup)
    labels = np.stack(
        [table.column(c).cast(pa.float64()).fill_null(np.nan).to_numpy() for c in LABEL_NAMES], axis=1
    )
    return [
        hashlib.sha256(f"{sid}\x00{digest}\x00".encode() + row.astype("<f8").tobytes()).digest()
        for sid, digest, row in zip(table.column("spectrum_id").to_pylist(), content, labels, strict=True)
    ]
