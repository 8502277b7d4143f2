"""Spectra tables as the arrays the network and its training take: the one place Arrow becomes numpy.

``model/`` never sees an Arrow table: jobs and notebooks turn tables into these arrays here first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError
from .fingerprints import DataFingerprint, spectrum_sha256
from .labels import LABEL_NAMES
from .setups import Setup


def arm_matrix(column: pa.Array | pa.ChunkedArray, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """A list column as an ``(n_rows, n_pixels)`` float32 matrix plus a per-row status.

    Status: 0 = ok, 1 = null row, 2 = wrong length. Rows that are not ok are filled with NaN.
    Null elements inside a list become NaN. Works for list, large_list and fixed_size_list columns.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n_rows = len(arr)
    status = np.zeros(n_rows, dtype=np.int8)
    status[np.asarray(arr.is_null())] = 1
    if pa.types.is_fixed_size_list(arr.type):
        if arr.type.list_size != n_pixels:
            status[status == 0] = 2
            return np.full((n_rows, n_pixels), np.nan, dtype=np.float32), status
        child = arr.values.slice(arr.offset * n_pixels, n_rows * n_pixels)
        values = child.cast(pa.float32()).to_numpy(zero_copy_only=False)
        matrix = values.reshape(n_rows, n_pixels).copy() if n_rows else np.empty((0, n_pixels), np.float32)
        matrix[status != 0] = np.nan
        return matrix, status
    lengths = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)
    status[(status == 0) & (lengths != n_pixels)] = 2
    matrix = np.full((n_rows, n_pixels), np.nan, dtype=np.float32)
    ok = status == 0
    if ok.any():
        # flatten() drops null rows and keeps list order, so the ok rows' values are contiguous
        # blocks of n_pixels once the wrong-length rows are taken out.
        keep = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
        flat = arr.flatten().cast(pa.float32()).to_numpy(zero_copy_only=False)
        row_of_value = np.repeat(np.arange(n_rows), keep)
        matrix[ok] = flat[ok[row_of_value]].reshape(-1, n_pixels)
    return matrix, status


def fixed_size_list(matrix: np.ndarray, dtype: pa.DataType | None = None) -> pa.FixedSizeListArray:
    """An ``(n_rows, n)`` matrix as a fixed_size_list column (values cast to ``dtype`` when given)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), dtype), matrix.shape[1])


@dataclass
class SpectraArrays:
    """The numeric content of a batch of spectra on a setup's grid, per arm."""

    flux: dict[str, np.ndarray]  # arm -> (n, n_pixels) float32
    ivar: dict[str, np.ndarray | None]  # arm -> (n, n_pixels) float32, None when absent
    status: dict[str, np.ndarray]  # arm -> per-row status of the flux column (see arm_matrix)
    ivar_status: dict[str, np.ndarray | None]

    def concatenated(self, setup: Setup) -> tuple[np.ndarray, np.ndarray]:
        """Flux and ivar over the setup's concatenated grid; absent ivar is all ones."""
        flux = np.concatenate([self.flux[a.name] for a in setup.arms], axis=1)
        ivar = np.concatenate(
            [
                self.ivar[a.name] if self.ivar[a.name] is not None else np.ones_like(self.flux[a.name])
                for a in setup.arms
            ],
            axis=1,
        )
        return flux, ivar


def spectra_arrays(table: pa.Table, setup: Setup) -> SpectraArrays:
    flux, ivar, status, ivar_status = {}, {}, {}, {}
    for arm in setup.arms:
        flux[arm.name], status[arm.name] = arm_matrix(table.column(arm.flux_column), arm.n_pixels)
        if arm.ivar_column in table.column_names:
            ivar[arm.name], ivar_status[arm.name] = arm_matrix(table.column(arm.ivar_column), arm.n_pixels)
        else:
            ivar[arm.name], ivar_status[arm.name] = None, None
    return SpectraArrays(flux, ivar, status, ivar_status)


def model_inputs(arrays: SpectraArrays, setup: Setup) -> tuple[np.ndarray, np.ndarray]:
    """Flux and mask over the concatenated grid, ready for the network.

    Masked pixels (ivar == 0, or non-finite flux) are set to the continuum, 1.0: a masked pixel then
    carries no line signal instead of garbage. The mask (1 = good) is returned for models that use
    it as a second input channel and for zeroing saliency on masked pixels.
    """
    flux, ivar = arrays.concatenated(setup)
    good = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    return np.where(good, flux, np.float32(1.0)).astype(np.float32, copy=False), good


def label_matrix(table: pa.Table, names: Sequence[str]) -> np.ndarray:
    """``[n_rows, len(names)]`` float64 labels; a missing label (null) is NaN."""
    columns = [table.column(c).cast(pa.float64()).fill_null(np.nan).to_numpy() for c in names]
    return np.stack(columns, axis=1) if columns else np.zeros((table.num_rows, 0))


def training_arrays(
    table: pa.Table,
    setup: Setup,
    *,
    clean: pa.Table | None = None,
    label_names: Sequence[str] = LABEL_NAMES,
) -> dict[str, np.ndarray]:
    """The arrays of :class:`ArrayData` from a labelled spectra table (validated rows).

    ``labels`` has one column per name of ``label_names``, NaN where a row lacks that label.

    ``clean``: a table of noise-free twins (``spectrum_id`` and flux columns) matched by id; rows
    without a twin are an error, because augmentation would silently differ between rows.
    """
    arrays = spectra_arrays(table, setup)
    flux, mask = model_inputs(arrays, setup)
    _, ivar = arrays.concatenated(setup)
    missing = [c for c in label_names if c not in table.column_names]
    if missing:
        raise InputError(f"training table lacks label column(s) {missing}")
    labels = label_matrix(table, label_names)
    out = {
        "spectrum_id": np.asarray(table.column("spectrum_id").to_pylist(), dtype=object),
        "flux": flux,
        "mask": mask,
        "ivar": np.where(mask, ivar, 0.0).astype(np.float32),
        "labels": labels.astype(np.float64),
        "label_err": None,
        "flux_clean": None,
    }
    err_columns = [f"{c}_err" for c in label_names]
    if any(c in table.column_names for c in err_columns):
        # A label without an error column has NaN errors: inverse-variance weighting gives its
        # entries the error floor (as for a single missing error).
        out["label_err"] = np.stack(
            [
                table.column(c).cast(pa.float64()).fill_null(np.nan).to_numpy()
                if c in table.column_names
                else np.full(table.num_rows, np.nan)
                for c in err_columns
            ],
            axis=1,
        )
    if "snr" in table.column_names:
        out["snr"] = table.column("snr").cast(pa.float64()).fill_null(np.nan).to_numpy()
    if clean is not None:
        position = {sid: i for i, sid in enumerate(clean.column("spectrum_id").to_pylist())}
        absent = [sid for sid in out["spectrum_id"] if sid not in position]
        if absent:
            raise InputError(f"{len(absent)} spectra have no noise-free twin, e.g. {absent[:3]}")
        twins = clean.take(pa.array([position[sid] for sid in out["spectrum_id"]]))
        clean_flux = np.concatenate(
            [spectra_arrays(twins, setup).flux[a.name] for a in setup.arms], axis=1
        ).astype(np.float32)
        out["flux_clean"] = clean_flux
    return out


def prepare_arrays(
    table: pa.Table,
    setup: Setup,
    *,
    clean: pa.Table | None = None,
    label_names: Sequence[str] = LABEL_NAMES,
) -> dict[str, np.ndarray]:
    """Training arrays of a validated labelled table, with its fingerprint."""
    arrays = training_arrays(table, setup, clean=clean, label_names=label_names)
    digests = row_digests(table, setup, label_names=label_names)
    arrays["fingerprint"] = DataFingerprint().add_digests(digests).hexdigest
    arrays["label_names"] = tuple(label_names)
    return arrays


def row_digests(table: pa.Table, setup: Setup, *, label_names: Sequence[str] = LABEL_NAMES) -> list[bytes]:
    """Each row's 32-byte contribution: sha256 of its id, its flux and ivar content and its labels."""
    content = spectrum_sha256(spectra_arrays(table, setup), setup)
    labels = label_matrix(table, label_names)
    return [
        hashlib.sha256(f"{sid}\x00{digest}\x00".encode() + row.astype("<f8").tobytes()).digest()
        for sid, digest, row in zip(table.column("spectrum_id").to_pylist(), content, labels, strict=True)
    ]
