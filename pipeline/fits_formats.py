"""Decoders for survey spectrum FITS files: one small registered plug-in per file layout.

A decoder turns the bytes of one file into a :class:`RawSpectrum`: the wavelengths as stored (with
their unit and declared medium), the flux, the inverse variance (0 = masked pixel) and the header
metadata that ingest needs. Nothing is resampled here (see :mod:`.resample`). A file that cannot be
used raises :class:`Unusable` with a quarantine reason code from :mod:`.contract`.

Layouts, tried in this order (the first whose ``identify`` accepts the file decodes it):

``eso-phase3``
    ESO Phase 3 1-D spectrum: a binary table with one row whose array columns hold ``WAVE``, ``FLUX``
    and ``ERR`` (names and units from TTYPE/TUNIT; a table of one pixel per row also works). A
    normalised flux column (a name with FLUX and NORM, e.g. ``FLUX_NORM`` with ``ERR_NORM``) is
    preferred, then ``FLUX``, then ``FLUX_REDUCED`` (with ``ERR_REDUCED``). ``QUAL`` != 0 masks a
    pixel. The wavelength column is in air when its UCD (TUCDn) contains ``obs.atmos``.
``wcs1d``
    A 1-D image, as Gaia-ESO GIRAFFE products are distributed (one file per star and setup): flux in
    the primary HDU, or in an extension named FLUX, SPECTRUM, SPEC, SCI or DATA; wavelengths from
    CRVAL1, CRPIX1 (FITS default 0) and CD1_1 (or CDELT1 × PC1_1) in CUNIT1 (no unit = Angstrom);
    CTYPE1 ``AWAV`` = air, ``WAVE`` = vacuum, ``...-LOG`` = logarithmic (FITS WCS paper III), and
    ``DC-FLAG = 1`` = log10 wavelengths (IRAF). The uncertainty comes from an extension named ERROR,
    ERR, SIGMA, NOISE or UNCERTAINTY (σ), VARIANCE or VAR (σ²), or IVAR or INVVAR (1/σ²); QUALITY,
    QUAL, MASK, BADPIX or FLAGS != 0 masks a pixel.

Header keywords read from the primary header (then the data HDU's): ``CNAME``, ``OBJECT``, ``RA``,
``DEC`` (degrees), ``SETUP`` (e.g. HR10; ``DISPELEM`` is used when it names an arm), ``SNR``
(or ``S_N``), radial velocity ``VRAD`` (or ``VHELIO``, ``RADVEL``, ``RV``; km/s), ``SPECSYS``,
``SPEC_RES``, ``INSTRUME`` and ``CONTNORM``.

An error ≤ 0 or non-finite, a variance ≤ 0, a negative ivar, a non-finite flux or a quality flag
masks the pixel (ivar 0).
"""

from __future__ import annotations

import gzip
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from speclabel.core import contract

from .resample import WavelengthUnitError, angstrom_per_unit

SIGMA_NAMES = ("ERR", "ERROR", "SIGMA", "NOISE", "UNCERTAINTY")
VARIANCE_NAMES = ("VAR", "VARIANCE")
IVAR_NAMES = ("IVAR", "INVVAR", "INV_VAR")
QUALITY_NAMES = ("QUAL", "QUALITY", "MASK", "BADPIX", "FLAGS")
FLUX_EXTENSIONS = ("FLUX", "SPECTRUM", "SPEC", "SCI", "DATA")
WAVE_COLUMNS = ("WAVE", "WAVELENGTH", "LAMBDA")
SNR_KEYS = ("SNR", "S_N")
RV_KEYS = ("VRAD", "VHELIO", "RADVEL", "RV")
# CTYPE1 values (before any "-ALG" suffix) that describe a wavelength axis, and the medium they declare.
WAVELENGTH_CTYPES = {
    "": None,
    "LINEAR": None,
    "WAVELENGTH": None,
    "LAMBDA": None,
    "WAVE": "vacuum",
    "AWAV": "air",
}
FITS_EXTENSIONS = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")
GZIP_MAGIC = b"\x1f\x8b"
HEADER_BLOCK = 2880
MAX_HEADER_BLOCKS = 400  # 1.1 MB of header cards: far beyond any real spectrum's primary header


class Unusable(Exception):
    """A file that cannot be ingested; ``reason`` is a quarantine reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SpectrumMeta:
    cname: str | None = None
    object: str | None = None
    ra: float | None = None
    dec: float | None = None
    setup: str | None = None
    dispelem: str | None = None
    snr: float | None = None
    rv_kms: float | None = None
    frame: str | None = None
    resolution: float | None = None
    instrument: str | None = None
    normalised: bool | None = None


@dataclass
class RawSpectrum:
    """One file's spectrum as stored: increasing wavelengths in ``wave_unit``; ivar 0 = masked."""

    layout: str
    wave: np.ndarray
    wave_unit: str
    medium: str | None  # "air", "vacuum", or None when the file does not say
    flux: np.ndarray
    ivar: np.ndarray
    flux_unit: str
    meta: SpectrumMeta


@dataclass(frozen=True)
class Layout:
    name: str
    identify: Callable[[fits.HDUList], bool]
    decode: Callable[[fits.HDUList], RawSpectrum]


LAYOUTS: list[Layout] = []


def register(name: str, identify: Callable[[fits.HDUList], bool]):
    """Register ``decode(hdul) -> RawSpectrum`` for files that ``identify(hdul)`` accepts."""

    def wrap(decode: Callable[[fits.HDUList], RawSpectrum]):
        LAYOUTS.append(Layout(name, identify, decode))
        return decode

    return wrap


# -- reading --------------------------------------------------------------------------------------


def is_fits_path(path: str) -> bool:
    return path.lower().endswith(FITS_EXTENSIONS)


def maybe_gunzip(data: bytes) -> bytes:
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise Unusable(contract.CORRUPT_FILE, f"gzip stream is damaged: {exc}") from exc


def open_fits(data: bytes) -> fits.HDUList:
    """All HDUs of a FITS file read into memory; a truncated or unreadable file is :class:`Unusable`."""
    data = maybe_gunzip(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns about non-standard cards that real files have
        warnings.filterwarnings("error", message=".*truncated.*")
        try:
            hdul = fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False)
            for hdu in hdul:
                _ = hdu.data  # astropy reads data lazily: a short file fails here
        except Exception as exc:  # astropy raises OSError, TypeError, ValueError... for damaged bytes
            raise Unusable(
                contract.CORRUPT_FILE, f"not a readable FITS file ({type(exc).__name__}: {exc})"
            ) from exc
    return hdul


def decode(data: bytes) -> RawSpectrum:
    """Decode one FITS file with the first registered layout that accepts it."""
    hdul = open_fits(data)
    for layout in LAYOUTS:
        if layout.identify(hdul):
            return layout.decode(hdul)
    shapes = ", ".join(f"{h.name or '#' + str(i)} {type(h).__name__}" for i, h in enumerate(hdul))
    raise Unusable(contract.UNKNOWN_FORMAT, f"no known spectrum layout (HDUs: {shapes})")


def read_primary_header(read: Callable[[int], bytes]) -> fits.Header:
    """The primary header from a stream's first blocks, without reading the data (``read(n)`` -> bytes)."""
    text = bytearray()
    for _ in range(MAX_HEADER_BLOCKS):
        block = read(HEADER_BLOCK)
        if len(block) < HEADER_BLOCK:
            raise Unusable(contract.CORRUPT_FILE, "file ends inside the primary header")
        text += block
        if not text.startswith(b"SIMPLE  ="):
            raise Unusable(contract.CORRUPT_FILE, "not a FITS file (no SIMPLE card)")
        cards = [block[k : k + 80] for k in range(0, HEADER_BLOCK, 80)]
        if any(card.rstrip() == b"END" for card in cards):
            break
    else:
        raise Unusable(contract.CORRUPT_FILE, "no END card in the primary header")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fits.Header.fromstring(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Unusable(contract.CORRUPT_FILE, f"unreadable primary header: {exc}") from exc


def spectrum_id(header: fits.Header, path: str) -> tuple[str, str]:
    """``(id, source)``: CNAME, else OBJECT, else the file name without its extensions."""
    for key in ("CNAME", "OBJECT"):
        value = _text(header.get(key))
        if value:
            return value, key
    name = os.path.basename(path)
    for ext in sorted(FITS_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)], "filename"
    return name, "filename"


# -- metadata and uncertainties -------------------------------------------------------------------


def _text(value) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def _number(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _first(headers: list[fits.Header], keys: tuple[str, ...]):
    for header in headers:
        for key in keys:
            if key in header and header[key] not in (None, ""):
                return header[key]
    return None


def header_meta(headers: list[fits.Header], normalised: bool | None = None) -> SpectrumMeta:
    contnorm = _first(headers, ("CONTNORM",))
    return SpectrumMeta(
        cname=_text(_first(headers, ("CNAME",))),
        object=_text(_first(headers, ("OBJECT",))),
        ra=_number(_first(headers, ("RA",))),
        dec=_number(_first(headers, ("DEC",))),
        setup=_text(_first(headers, ("SETUP",))),
        dispelem=_text(_first(headers, ("DISPELEM",))),
        snr=_number(_first(headers, SNR_KEYS)),
        rv_kms=_number(_first(headers, RV_KEYS)),
        frame=_text(_first(headers, ("SPECSYS",))),
        resolution=_number(_first(headers, ("SPEC_RES",))),
        instrument=_text(_first(headers, ("INSTRUME",))),
        normalised=normalised
        if normalised is not None
        else (contnorm if isinstance(contnorm, bool) else None),
    )


def ivar_from_uncertainty(kind: str, values: np.ndarray) -> np.ndarray:
    """Inverse variance from σ, σ² or 1/σ²; non-positive or non-finite uncertainties give 0 (masked)."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    out = np.zeros(values.shape)
    if kind == "sigma":
        ok &= values > 0
        out[ok] = 1.0 / values[ok] ** 2
    elif kind == "variance":
        ok &= values > 0
        out[ok] = 1.0 / values[ok]
    elif kind == "ivar":
        ok &= values > 0
        out[ok] = values[ok]
    else:
        raise ValueError(f"unknown uncertainty kind {kind!r}")
    return out


def _uncertainty_kind(name: str) -> str | None:
    name = name.upper()
    for kind, names in (("sigma", SIGMA_NAMES), ("variance", VARIANCE_NAMES), ("ivar", IVAR_NAMES)):
        if name in names:
            return kind
    return None


def _finish(
    layout: str,
    wave: np.ndarray,
    wave_unit: str,
    medium: str | None,
    flux: np.ndarray,
    ivar: np.ndarray,
    quality: np.ndarray | None,
    flux_unit: str,
    meta: SpectrumMeta,
) -> RawSpectrum:
    """Native-endian float64 arrays in increasing wavelength, with every bad pixel's ivar at 0."""
    wave = np.asarray(wave, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64).copy()
    if not (wave.shape == flux.shape == ivar.shape) or wave.ndim != 1:
        raise Unusable(
            contract.CORRUPT_FILE,
            f"wavelength, flux and uncertainty differ in shape: {wave.shape}, {flux.shape}, {ivar.shape}",
        )
    if wave.size < 2:
        raise Unusable(contract.NO_GOOD_PIXELS, f"the spectrum has {wave.size} pixel(s)")
    try:
        angstrom_per_unit(wave_unit)
    except WavelengthUnitError as exc:
        raise Unusable(contract.WRONG_UNITS, str(exc)) from exc
    if not np.isfinite(wave).all():
        raise Unusable(contract.BAD_WAVELENGTHS, "wavelengths contain NaN or inf")
    step = np.diff(wave)
    if (step < 0).all():
        wave, flux, ivar = wave[::-1], flux[::-1], ivar[::-1]
        quality = quality[::-1] if quality is not None else None
    elif not (step > 0).all():
        raise Unusable(contract.BAD_WAVELENGTHS, "wavelengths are not strictly monotonic")
    ivar[~np.isfinite(flux)] = 0.0
    if quality is not None:
        ivar[np.asarray(quality) != 0] = 0.0
    return RawSpectrum(layout, wave, wave_unit, medium, flux, ivar, flux_unit, meta)


# -- layout: ESO Phase 3 binary table -------------------------------------------------------------


def _table_hdu(hdul: fits.HDUList) -> fits.BinTableHDU | None:
    for hdu in hdul:
        if isinstance(hdu, fits.BinTableHDU) and hdu.columns is not None:
            names = {n.upper() for n in hdu.columns.names}
            if names & set(WAVE_COLUMNS) and any("FLUX" in n for n in names):
                return hdu
    return None


def _flux_column(names: list[str]) -> tuple[str, bool]:
    """The flux column to use and whether it is a normalised variant."""
    upper = {n.upper(): n for n in names}
    normalised = [n for n in upper if "FLUX" in n and "NORM" in n]
    if normalised:
        return upper[sorted(normalised)[0]], True
    for candidate in ("FLUX", "FLUX_REDUCED"):
        if candidate in upper:
            return upper[candidate], False
    return upper[sorted(n for n in upper if "FLUX" in n)[0]], False


def _error_column(names: list[str], flux_name: str) -> tuple[str, str] | None:
    upper = {n.upper(): n for n in names}
    for stem in (*SIGMA_NAMES, *VARIANCE_NAMES, *IVAR_NAMES):
        candidate = flux_name.upper().replace("FLUX", stem, 1)
        if candidate in upper:
            return upper[candidate], _uncertainty_kind(stem)
    return None


def _column_values(hdu: fits.BinTableHDU, name: str) -> np.ndarray:
    column = hdu.data[name]
    if column.ndim == 2 and len(column) == 1:
        return np.asarray(column[0])
    if column.ndim == 1:
        return np.asarray(column)
    raise Unusable(
        contract.UNKNOWN_FORMAT,
        f"table {hdu.name} holds {len(column)} spectra; one spectrum per file is supported",
    )


@register("eso-phase3", identify=lambda hdul: _table_hdu(hdul) is not None)
def decode_phase3(hdul: fits.HDUList) -> RawSpectrum:
    hdu = _table_hdu(hdul)
    names = list(hdu.columns.names)
    upper = {n.upper(): n for n in names}
    wave_name = next(upper[n] for n in WAVE_COLUMNS if n in upper)
    flux_name, normalised_variant = _flux_column(names)
    error = _error_column(names, flux_name)
    if error is None:
        raise Unusable(contract.MISSING_ERROR, f"no error column for {flux_name} (columns: {names})")
    error_name, kind = error
    quality_name = next((upper[n] for n in QUALITY_NAMES if n in upper), None)
    if len(hdu.data) == 0:
        raise Unusable(contract.NO_GOOD_PIXELS, f"table {hdu.name} has no rows")
    index = names.index(wave_name) + 1
    ucd = str(hdu.header.get(f"TUCD{index}", "")).lower()
    medium = "air" if "obs.atmos" in ucd else None
    wave_unit = hdu.columns[wave_name].unit or ""
    flux_unit = hdu.columns[flux_name].unit or ""
    headers = [hdul[0].header, hdu.header]
    meta = header_meta(headers, normalised=True if normalised_variant else None)
    return _finish(
        "eso-phase3",
        _column_values(hdu, wave_name),
        wave_unit,
        medium,
        _column_values(hdu, flux_name),
        ivar_from_uncertainty(kind, _column_values(hdu, error_name)),
        _column_values(hdu, quality_name) if quality_name else None,
        flux_unit,
        meta,
    )


# -- layout: 1-D image with a wavelength WCS ------------------------------------------------------


def _image_1d(hdu) -> bool:
    return isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU) and hdu.data is not None and hdu.data.ndim == 1


def _flux_hdu(hdul: fits.HDUList):
    if _image_1d(hdul[0]):
        return hdul[0]
    for hdu in hdul[1:]:
        if _image_1d(hdu) and hdu.name.upper() in FLUX_EXTENSIONS:
            return hdu
    return None


def wcs_wavelengths(header: fits.Header, n_pixels: int) -> tuple[np.ndarray, str, str | None]:
    """Wavelengths of pixels 1..n from a 1-D spectral WCS: ``(wave, unit, medium)``."""
    ctype = str(header.get("CTYPE1", "")).strip().upper()
    base, _, algorithm = ctype.partition("-")
    algorithm = algorithm.strip("-")
    if base not in WAVELENGTH_CTYPES:
        raise Unusable(contract.WRONG_UNITS, f"CTYPE1 = {ctype!r} is not a wavelength axis")
    if algorithm not in ("", "LOG"):
        raise Unusable(contract.MISSING_WCS, f"CTYPE1 = {ctype!r}: only linear and -LOG axes are supported")
    crval = _number(header.get("CRVAL1"))
    step = _number(header.get("CD1_1"))
    if step is None:
        cdelt = _number(header.get("CDELT1"))
        step = None if cdelt is None else cdelt * (_number(header.get("PC1_1")) or 1.0)
    if crval is None or not step:
        raise Unusable(contract.MISSING_WCS, "no CRVAL1 and CDELT1/CD1_1 wavelength solution")
    crpix = _number(header.get("CRPIX1")) or 0.0  # FITS standard default
    offset = step * (np.arange(1, n_pixels + 1, dtype=np.float64) - crpix)
    if algorithm == "LOG":
        wave = crval * np.exp(offset / crval)
    elif header.get("DC-FLAG") == 1:
        wave = 10.0 ** (crval + offset)
    else:
        wave = crval + offset
    return wave, str(header.get("CUNIT1", "")).strip(), WAVELENGTH_CTYPES[base]


@register("wcs1d", identify=lambda hdul: _flux_hdu(hdul) is not None)
def decode_wcs1d(hdul: fits.HDUList) -> RawSpectrum:
    flux_hdu = _flux_hdu(hdul)
    flux = flux_hdu.data
    wave, wave_unit, medium = wcs_wavelengths(flux_hdu.header, flux.size)
    uncertainty, quality = None, None
    for hdu in hdul:
        if hdu is flux_hdu or hdu.data is None or not isinstance(hdu, fits.ImageHDU | fits.PrimaryHDU):
            continue
        kind = _uncertainty_kind(hdu.name)
        if kind and uncertainty is None:
            uncertainty = (kind, hdu)
        elif hdu.name.upper() in QUALITY_NAMES and quality is None:
            quality = hdu
    if uncertainty is None:
        names = [h.name for h in hdul]
        raise Unusable(contract.MISSING_ERROR, f"no error, variance or ivar extension (HDUs: {names})")
    kind, error_hdu = uncertainty
    if error_hdu.data.shape != flux.shape:
        raise Unusable(
            contract.CORRUPT_FILE,
            f"extension {error_hdu.name} has shape {error_hdu.data.shape}, the flux {flux.shape}",
        )
    if quality is not None and quality.data.shape != flux.shape:
        raise Unusable(
            contract.CORRUPT_FILE,
            f"extension {quality.name} has shape {quality.data.shape}, the flux {flux.shape}",
        )
    headers = [hdul[0].header] if flux_hdu is hdul[0] else [hdul[0].header, flux_hdu.header]
    return _finish(
        "wcs1d",
        wave,
        wave_unit,
        medium,
        flux,
        ivar_from_uncertainty(kind, error_hdu.data),
        quality.data if quality is not None else None,
        str(flux_hdu.header.get("BUNIT", "")).strip(),
        header_meta(headers),
    )


def write_wcs1d(
    flux: np.ndarray,
    sigma: np.ndarray,
    *,
    wave_start: float,
    wave_step: float,
    medium: str,
    cards: dict,
) -> bytes:
    """A ``wcs1d`` file as bytes: flux in the primary HDU with a linear WCS, σ in extension ERROR.

    ``cards`` (OBJECT, CNAME, RA, DEC, SETUP, SNR, VRAD, ...) go into the primary header. σ = 0 marks a
    masked pixel.
    """
    primary = fits.PrimaryHDU(np.asarray(flux, dtype=np.float32))
    header = primary.header
    header["CTYPE1"] = ("AWAV" if medium == "air" else "WAVE", "air or vacuum wavelength")
    header["CUNIT1"] = "Angstrom"
    header["CRPIX1"] = 1.0
    header["CRVAL1"] = float(wave_start)
    header["CDELT1"] = float(wave_step)
    for key, value in cards.items():
        header[key] = value
    error = fits.ImageHDU(np.asarray(sigma, dtype=np.float32), name="ERROR")
    error.header["COMMENT"] = "1-sigma flux uncertainty; 0 = masked pixel"
    buffer = io.BytesIO()
    fits.HDUList([primary, error]).writeto(buffer)
    return buffer.getvalue()
