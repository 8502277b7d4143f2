"""Train / validation / test splits by hashing ``spectrum_id``: no global index, any order, any worker.

* The common **test** split holds out the same spectra from every member, so that the ensemble's
  test metrics are honest: a row is a test row when ``u(test_salt, spectrum_id) < test_fraction``.
* Each member draws its own **validation** split from the rest with its own seed:
  ``u(val_salt, seed, spectrum_id) < val_fraction``; the remaining rows are its training rows.

``u`` is the first 8 bytes of a sha256 digest read as an unsigned integer over 2**64, a uniform
number in [0, 1) that depends on nothing but its key. A streaming job decides each row on its own,
and the same id lands in the same split on every machine, in every run and in every later release.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from speclabel.core.errors import ConfigError

_TWO_TO_64 = float(2**64)


@dataclass(frozen=True)
class SplitRule:
    test_fraction: float = 0.10
    val_fraction: float = 0.10
    test_salt: str = "speclabel-test-v1"
    val_salt: str = "speclabel-val-v1"

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"split fractions must satisfy 0 <= test < 1 and 0 < val < 1, got test={self.test_fraction} "
                f"val={self.val_fraction}"
            )

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "rule": (
                "u(key) = int(sha256(key)[:8], big-endian) / 2**64; test if "
                "u(test_salt + '\\x00' + spectrum_id) < test_fraction; "
                "otherwise validation of member seed s if "
                "u(val_salt + '\\x00' + str(s) + '\\x00' + spectrum_id) < val_fraction, else training"
            ),
        }

    @classmethod
    def from_dict(cls, data: dict) -> SplitRule:
        return cls(**{k: data[k] for k in ("test_fraction", "val_fraction", "test_salt", "val_salt")})

    def is_test(self, spectrum_ids: Iterable[str]) -> np.ndarray:
        return hash_uniform(spectrum_ids, self.test_salt) < self.test_fraction

    def member_masks(self, spectrum_ids: Iterable[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) boolean masks of member ``seed``; test rows are in neither."""
        ids = _as_list(spectrum_ids)
        test = self.is_test(ids)
        val = (hash_uniform(ids, f"{self.val_salt}\x00{int(seed)}") < self.val_fraction) & ~test
        return ~test & ~val, val

    def split_of(self, spectrum_ids: Iterable[str], seed: int) -> np.ndarray:
        """``"train"``, ``"val"`` or ``"test"`` per row for member ``seed`` (for streaming filters)."""
        train, val = self.member_masks(spectrum_ids, seed)
        return np.where(train, "train", np.where(val, "val", "test"))


def hash_uniform(spectrum_ids: Iterable[str], salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per id, fixed by (salt, id) alone."""
    prefix = salt.encode() + b"\x00"
    ids = _as_list(spectrum_ids)
    out = np.empty(len(ids), dtype=np.float64)
    for i, sid in enumerate(ids):
        digest = hashlib.sha256(prefix + sid.encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / _TWO_TO_64
    return out


def _as_list(spectrum_ids) -> list[str]:
    if hasattr(spectrum_ids, "to_pylist"):  # pyarrow Array / ChunkedArray
        spectrum_ids = spectrum_ids.to_pylist()
    return [str(s) for s in spectrum_ids]
