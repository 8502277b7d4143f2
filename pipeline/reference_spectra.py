"""Noise-free reference spectra for the label refinement (``model/refine.py``), read from Parquet.

``speclabel train --reference-spectra PATH`` stores them in the model directory. They are a
synthetic grid at known labels on the model's setup: a Parquet file, folder or glob (local or URI)
with ``spectrum_id``, the setup's flux columns and a column per label of the model; ivar columns are
optional (a pixel with ivar 0 is masked; without them every finite pixel is good).
``speclabel simulate --noise-free`` writes them for the built-in survey, and
``../shared/data/giraffe_synth_train_noisefree.parquet`` holds them for the shared file.

Every row read is accounted for: a row is kept, or left out with its reason:

* ``test_split``: its ``spectrum_id`` is in the model's common test split. The refined labels'
  error calibration is fitted on those stars; a reference spectrum of the very star being
  calibrated would make its error look smaller than it is on any other star;
* ``missing_label``: a label is null or not finite (the spectrum has no place in label space);
* ``no_flux``: its flux is null, of the wrong length, or has fewer than half its pixels good;
* ``duplicate``: an earlier row had the same ``spectrum_id``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from speclabel.core.arrays import label_matrix, spectra_arrays
from speclabel.core.errors import InputError
from speclabel.core.fingerprints import files_fingerprint
from speclabel.core.setups import Setup
from speclabel.core.storage import absolute_location, resolve_files
from speclabel.model.refine import ReferenceLibrary, quadratic_terms
from speclabel.model.splits import SplitRule

from .training_data import PARQUET_EXTENSIONS

REASONS = ("test_split", "missing_label", "no_flux", "duplicate")
MIN_GOOD_FRACTION = 0.5


@dataclass(frozen=True, eq=False)  # numpy inside
class ReferenceSpectra:
    """The kept rows as a library, and the accounting of every row read."""

    library: ReferenceLibrary
    n_read: int
    left_out: dict[str, int]  # reason -> rows
    source: dict  # model.json refine.source: location, files fingerprint, the counts

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.left_out.items() if n)
        return f"{self.n_read} read, {len(self.library.labels)} kept" + (
            f" ({dropped} left out)" if dropped else ""
        )


def check_reference_spectra(location: str, setup: Setup, label_names: tuple[str, ...]):
    """The filesystem, files and columns to read of the reference spectra at ``location``, checked
    (columns, declared setup) without reading a spectrum: ``speclabel train`` calls it before the
    members train, so that a wrong path fails in seconds, not after the training."""
    fs, files = resolve_files(location, PARQUET_EXTENSIONS)
    columns = ["spectrum_id", *(arm.flux_column for arm in setup.arms), *label_names]
    per_file = []
    for path in files:
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"cannot read the reference spectra {path}: {exc}") from exc
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise InputError(
                f"reference spectra {path} lack the column(s) {missing} (labels of the model: "
                f"{', '.join(label_names)})"
            )
        declared = (schema.metadata or {}).get(b"speclabel.setup")
        if declared is not None and declared.decode() != setup.name:
            raise InputError(
                f"reference spectra {path} are on setup {declared.decode()!r}, the model on {setup.name!r}"
            )
        ivar = [arm.ivar_column for arm in setup.arms if arm.ivar_column in schema.names]
        per_file.append((path, columns + ivar))
    return fs, per_file


def read_reference_spectra(
    location: str, setup: Setup, label_names: tuple[str, ...], split: SplitRule
) -> ReferenceSpectra:
    """The reference spectra at ``location`` on ``setup``'s grid with the labels ``label_names``,
    leaving out the rows of the common test split ``split`` and rows unfit to be references."""
    fs, per_file = check_reference_spectra(location, setup, label_names)
    tables, stamps = [], []
    for path, columns in per_file:
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
        info = fs.get_file_info(path)
        stamps.append((path, info.size, info.mtime_ns))
    table = pa.concat_tables(tables, promote_options="permissive")
    ids = np.asarray(table.column("spectrum_id").cast(pa.string()).to_pylist(), dtype=object)
    arrays = spectra_arrays(table, setup)
    flux, ivar = arrays.concatenated(setup)
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    labels = label_matrix(table, label_names)

    reason = np.full(len(ids), "", dtype=object)
    _, first = np.unique(ids.astype(str), return_index=True)
    duplicate = np.ones(len(ids), dtype=bool)
    duplicate[first] = False
    # The first reason that applies, in the order of REASONS.
    for name, hit in reversed(
        [
            ("test_split", split.is_test(ids)),
            ("missing_label", ~np.isfinite(labels).all(axis=1)),
            ("no_flux", good.mean(axis=1) < MIN_GOOD_FRACTION),
            ("duplicate", duplicate),
        ]
    ):
        reason[np.asarray(hit, dtype=bool)] = name
    keep = reason == ""
    left_out = {name: int((reason == name).sum()) for name in REASONS}
    needed = quadratic_terms(len(label_names)) + 1
    if keep.sum() < needed:
        raise InputError(
            f"only {int(keep.sum())} usable reference spectra at {location} ({left_out}): the local "
            f"quadratic in {len(label_names)} labels needs at least {needed}"
        )
    library = ReferenceLibrary(
        labels[keep], np.where(good[keep], flux[keep], 1.0), good[keep], setup, label_names
    )
    source = {
        "location": absolute_location(location),
        "files_fingerprint": files_fingerprint(stamps),
        "rows_read": len(ids),
        "rows_kept": int(keep.sum()),
        "left_out": left_out,
    }
    return ReferenceSpectra(library, len(ids), left_out, source)
