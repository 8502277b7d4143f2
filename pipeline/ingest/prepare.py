"""The per-file science of ingest: one FITS file onto its arm's grid, one star from its files, and
contract Parquet rows passed through; the store rows they become. Plain functions, no Ray, no I/O."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from speclabel.core import contract
from speclabel.core.arrays import fixed_size_list, spectra_arrays
from speclabel.core.fingerprints import spectrum_sha256
from speclabel.core.setups import Arm, Setup

from ..fits_formats import SpectrumMeta, Unusable, decode
from ..normalise import is_normalised, normalise
from ..resample import (
    angstrom_per_unit,
    arm_edges,
    convert_medium,
    pixel_edges,
    resample,
    to_rest_frame,
)
from .options import IngestOptions

log = logging.getLogger(__name__)


# -- one FITS file, one star ----------------------------------------------------------------------


@dataclass
class PreparedArm:
    """One file's spectrum on one arm of the setup's grid."""

    path: str
    arm: str
    flux: np.ndarray  # float32, NaN where masked
    ivar: np.ndarray  # float32, 0 where masked
    snr: float
    normalised_input: bool
    meta: SpectrumMeta


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def choose_arm(meta: SpectrumMeta, wave: np.ndarray, setup: Setup, options: IngestOptions) -> Arm:
    """The arm a file belongs to: the one its header's SETUP (or DISPELEM) names, else by coverage."""
    arms = {_key(arm.name): arm for arm in setup.arms}
    low, high = float(wave[0]), float(wave[-1])
    named = None
    if meta.setup:
        named = arms.get(_key(meta.setup))
        if named is None:
            instrument = f" of {meta.instrument}" if meta.instrument else ""
            raise Unusable(
                contract.WRONG_SETUP,
                f"header SETUP = {meta.setup!r}{instrument}; setup {setup.name} has arms "
                f"{[a.name for a in setup.arms]}",
            )
    elif meta.dispelem:
        named = arms.get(_key(meta.dispelem))  # DISPELEM is often a grating name: only a hint
    if named is not None:
        if named.overlap(low, high) <= 0:
            raise Unusable(
                contract.NO_OVERLAP,
                f"header names arm {named.name} ({named.wave_start:.1f}-{named.wave_end:.1f} Å) but the "
                f"wavelengths span {low:.1f}-{high:.1f} Å ({setup.medium}, rest frame)",
            )
        return named
    best = max(setup.arms, key=lambda arm: arm.overlap(low, high))
    coverage = best.overlap(low, high)
    if coverage < options.min_arm_coverage:
        raise Unusable(
            contract.NO_OVERLAP,
            f"wavelengths {low:.1f}-{high:.1f} Å ({setup.medium}, rest frame) cover {coverage:.0%} of arm "
            f"{best.name} at most; a file whose header names no setup must cover "
            f"{options.min_arm_coverage:.0%} of an arm of {setup.name}",
        )
    return best


def measured_snr(flux: np.ndarray, ivar: np.ndarray) -> float:
    good = (ivar > 0) & np.isfinite(flux)
    return float(np.median(np.abs(flux[good]) * np.sqrt(ivar[good]))) if good.any() else 0.0


def prepare_file(path: str, data: bytes, setup: Setup, options: IngestOptions) -> PreparedArm:
    """Decode one FITS file and put it on its arm's grid; raises :class:`Unusable` with the reason."""
    raw = decode(data)
    wave = raw.wave * angstrom_per_unit(raw.wave_unit)  # the decoder checked that the unit is a length
    wave = convert_medium(wave, raw.medium or options.default_medium, setup.medium)
    meta = raw.meta
    in_rest_frame = (meta.frame or "").strip().upper() == "SOURCE"
    if options.rv_shift and meta.rv_kms is not None and not in_rest_frame:
        wave = to_rest_frame(wave, meta.rv_kms)
    arm = choose_arm(meta, wave, setup, options)
    if meta.resolution and abs(meta.resolution / arm.resolution - 1.0) > options.resolution_tolerance:
        instrument = f" ({meta.instrument})" if meta.instrument else ""
        raise Unusable(
            contract.WRONG_RESOLUTION,
            f"SPEC_RES = {meta.resolution:g}{instrument}, arm {arm.name} has R = {arm.resolution:g}",
        )
    normalised_input = is_normalised(options.normalised, raw.flux, raw.ivar, raw.flux_unit, meta.normalised)
    lower, upper = pixel_edges(wave)
    flux, ivar = resample(lower, upper, raw.flux, raw.ivar, *arm_edges(arm))
    if not normalised_input:
        result = normalise(arm.wave, flux, ivar, options.continuum)
        if result is None:
            raise Unusable(
                contract.NO_GOOD_PIXELS,
                f"{int((ivar > 0).sum())} unmasked pixels on arm {arm.name}: too few to fit a continuum",
            )
        flux, ivar = result
    if not (ivar > 0).any():
        raise Unusable(contract.NO_GOOD_PIXELS, f"no unmasked pixel on arm {arm.name} after resampling")
    snr = meta.snr if meta.snr is not None else measured_snr(raw.flux, raw.ivar)
    return PreparedArm(
        path, arm.name, flux.astype(np.float32), ivar.astype(np.float32), snr, normalised_input, meta
    )


@dataclass
class StarResult:
    spectrum_id: str
    arms: dict[str, PreparedArm]  # the kept file per arm (empty when nothing is stored)
    quarantine: list[tuple[str, str]]  # (reason "code: detail", source path)

    @property
    def stored(self) -> bool:
        return bool(self.arms)


def assemble_star(
    star_id: str, files: list[tuple[str, bytes | Unusable]], setup: Setup, options: IngestOptions
) -> StarResult:
    """The arms of one star from its files: best S/N per arm, duplicates and missing arms quarantined."""
    quarantine: list[tuple[str, str]] = []
    by_arm: dict[str, list[PreparedArm]] = defaultdict(list)
    for path, data in files:
        try:
            if isinstance(data, Unusable):
                raise data
            prepared = prepare_file(path, data, setup, options)
        except Unusable as exc:
            quarantine.append((f"{exc.reason}: {exc.detail}", path))
            continue
        except Exception as exc:  # a bug or an astropy corner case must not end the run
            log.exception("unexpected error decoding %s", path)
            quarantine.append((f"{contract.DECODE_ERROR}: {type(exc).__name__}: {exc}", path))
            continue
        by_arm[prepared.arm].append(prepared)
    kept: dict[str, PreparedArm] = {}
    for arm in setup.arms:
        candidates = by_arm.get(arm.name, [])
        if not candidates:
            continue
        best = max(candidates, key=lambda p: p.snr if np.isfinite(p.snr) else -np.inf)
        kept[arm.name] = best
        for other in candidates:
            if other is not best:
                quarantine.append(
                    (
                        f"{contract.DUPLICATE}: a second {arm.name} spectrum of {star_id} "
                        f"(S/N {other.snr:.1f}); kept {best.path} (S/N {best.snr:.1f})",
                        other.path,
                    )
                )
    missing = [arm.name for arm in setup.arms if arm.name not in kept]
    if kept and missing and options.missing_arm == "quarantine":
        for prepared in kept.values():
            quarantine.append(
                (
                    f"{contract.MISSING_ARM}: {star_id} has no usable {'/'.join(missing)} spectrum, so its "
                    f"{prepared.arm} spectrum is not stored (--missing-arm quarantine)",
                    prepared.path,
                )
            )
        kept = {}
    return StarResult(star_id, kept, quarantine)


def star_table(stars: list[StarResult], setup: Setup) -> pa.Table:
    """Store rows (without ``input_sha256``) for stars with something to store; missing arms masked."""
    stars = [s for s in stars if s.stored]
    columns: dict[str, pa.Array] = {"spectrum_id": pa.array([s.spectrum_id for s in stars], pa.string())}
    for arm in setup.arms:
        flux = np.full((len(stars), arm.n_pixels), np.nan, dtype=np.float32)
        ivar = np.zeros((len(stars), arm.n_pixels), dtype=np.float32)
        for k, star in enumerate(stars):
            if arm.name in star.arms:
                flux[k] = star.arms[arm.name].flux
                ivar[k] = star.arms[arm.name].ivar
        columns[arm.flux_column] = fixed_size_list(flux, pa.float32())
        columns[arm.ivar_column] = fixed_size_list(ivar, pa.float32())
    # Position, name and S/N come from the first arm (in setup order) that the star has.
    first = [next(star.arms[a.name] for a in setup.arms if a.name in star.arms) for star in stars]
    columns["ra"] = pa.array([p.meta.ra for p in first], pa.float64())
    columns["dec"] = pa.array([p.meta.dec for p in first], pa.float64())
    columns["snr"] = pa.array([p.snr for p in first], pa.float32())
    columns["object"] = pa.array([p.meta.object for p in first], pa.string())
    columns[contract.SOURCE_FILES] = pa.array(
        [[s.arms[a.name].path for a in setup.arms if a.name in s.arms] for s in stars], pa.list_(pa.string())
    )
    return _finish_store_table(columns, setup)


def _finish_store_table(columns: dict[str, pa.Array], setup: Setup) -> pa.Table:
    """Add ``input_sha256`` (of the stored flux and ivar) and order the columns as the store schema."""
    schema = contract.store_schema(setup)
    n = len(columns["spectrum_id"])
    arrays = spectra_arrays(pa.table(columns), setup)
    columns[contract.INPUT_SHA256] = pa.array(spectrum_sha256(arrays, setup) if n else [], pa.string())
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def split_invalid(table: pa.Table, setup: Setup) -> tuple[pa.Table, list[int], np.ndarray]:
    """Rows of a store table that pass :func:`contract.validate`, the indices that do not, and reasons."""
    reasons = contract.validate(table, setup)
    good = np.array([r is None for r in reasons], dtype=bool)
    return table.filter(pa.array(good)), list(np.flatnonzero(~good)), reasons


# -- Parquet pass-through -------------------------------------------------------------------------


def pass_through(
    table: pa.Table, source: str, row_offset: int, duplicate_rows: list[int], setup: Setup
) -> tuple[pa.Table, pa.Table]:
    """Validated store rows and quarantine rows for one batch of a contract Parquet file.

    Other columns (labels, ...) are not carried. An input without ``ivar_<arm>`` gets ivar 1 at finite
    flux (its weights are unknown) and 0 elsewhere.
    """
    contract.check_table_columns(table.schema, setup, source=source)
    arrays = spectra_arrays(table, setup)
    known = np.zeros(table.num_rows, dtype=bool)
    known[list(duplicate_rows)] = True
    reasons = contract.validate(table, setup, arrays=arrays, known_duplicates=known)
    good = np.array([r is None for r in reasons], dtype=bool)
    bad = np.flatnonzero(~good)
    quarantine = contract.quarantine_table(
        table.column("spectrum_id").take(pa.array(bad, pa.int64())).to_pylist(),
        [f"{reasons[i]} (row {row_offset + i})" for i in bad],
        source,
    )
    kept = table.filter(pa.array(good))
    columns: dict[str, pa.Array] = {
        "spectrum_id": kept.column("spectrum_id").combine_chunks().cast(pa.string())
    }
    for arm in setup.arms:
        flux = arrays.flux[arm.name][good]
        ivar = arrays.ivar[arm.name]
        ivar = np.isfinite(flux).astype(np.float32) if ivar is None else ivar[good]
        columns[arm.flux_column] = fixed_size_list(flux, pa.float32())
        columns[arm.ivar_column] = fixed_size_list(ivar, pa.float32())
    for name, dtype in contract.OPTIONAL_COLUMNS.items():
        if name == "release":
            continue
        columns[name] = (
            kept.column(name).combine_chunks().cast(dtype)
            if name in kept.column_names
            else pa.nulls(kept.num_rows, dtype)
        )
    columns[contract.SOURCE_FILES] = pa.array([[source]] * kept.num_rows, pa.list_(pa.string()))
    return _finish_store_table(columns, setup), quarantine
