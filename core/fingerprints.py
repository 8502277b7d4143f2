"""Fingerprints: what a spectrum, a labelled table or a set of input files is, as a short digest.

* :func:`spectrum_sha256` - one spectrum's flux and ivar content (reprocessing tells a changed
  spectrum from an unchanged one by it; ids alone cannot).
* :class:`DataFingerprint` - which data a model was trained on: each row contributes sha256(spectrum_id,
  sha256 of its flux and ivar, its labels) (:func:`speclabel.core.arrays.row_digests`); the fingerprint
  is the count and the sum of those digests modulo 2**256. Row order, batching and the number of
  workers do not change it, partial fingerprints from many workers merge by addition, and any change
  to an id, a pixel or a label changes it.
* :func:`files_fingerprint` - a list of files by path, size and modification time, with the settings
  that decide what a job makes of them (ingest's rerun check, submit's idempotent ids).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .arrays import SpectraArrays
    from .setups import Setup

_MODULUS = 2**256


@dataclass
class DataFingerprint:
    count: int = 0
    total: int = 0

    def add_digests(self, digests) -> DataFingerprint:
        """Add rows by their ``core.arrays.row_digests`` (a streaming job keeps digests, not rows)."""
        for row_digest in digests:
            self.total = (self.total + int.from_bytes(row_digest, "big")) % _MODULUS
            self.count += 1
        return self

    def merge(self, other: DataFingerprint) -> DataFingerprint:
        return DataFingerprint(self.count + other.count, (self.total + other.total) % _MODULUS)

    @property
    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.count}:{self.total:064x}".encode()).hexdigest()[:32]


def spectrum_sha256(arrays: SpectraArrays, setup: Setup) -> list[str]:
    """Per-row sha256 of the flux and ivar content (float32 little-endian, arms in setup order).

    Reprocessing compares these to tell a changed spectrum from an unchanged one; ids alone cannot.
    Rows without an ivar column hash their flux only.
    """
    n = next(iter(arrays.flux.values())).shape[0]
    parts = []
    for arm in setup.arms:
        parts.append(np.ascontiguousarray(arrays.flux[arm.name], dtype="<f4"))
        if arrays.ivar[arm.name] is not None:
            parts.append(np.ascontiguousarray(arrays.ivar[arm.name], dtype="<f4"))
    out = []
    for i in range(n):
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part[i].tobytes())
        out.append(digest.hexdigest())
    return out


def files_fingerprint(files: Iterable[tuple[str, int, int | None]], **fields) -> str:
    """sha256 over ``(path, size, mtime_ns)`` of each file, in the order given, and ``fields`` (JSON).

    ``fields`` carry what decides what a job makes of the files (setup, options, version). Contents
    are not read: hashing terabytes of spectra to decide whether to start a job would cost more than
    the job.
    """
    payload = {**fields, "files": [list(f) for f in files]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
