"""Realistic survey spectrum files for the tests, written with astropy the way the surveys write them.

``giraffe_image`` writes the Gaia-ESO-like 1-D image layout (flux in the primary HDU with a wavelength
WCS, uncertainty in a named extension); ``phase3_table`` writes an ESO Phase 3 binary table with one
row of array columns. Both return the file's bytes; ``write`` puts bytes on disk.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from astropy.io import fits

SPEED_OF_LIGHT_KMS = 299_792.458


def smooth_flux(wave_angstrom: np.ndarray) -> np.ndarray:
    """A normalised spectrum with a few resolved absorption lines: smooth enough to test resampling."""
    flux = np.ones_like(wave_angstrom)
    for centre, depth, sigma in (
        (5528.4, 0.5, 0.25),
        (5557.0, 0.3, 0.2),
        (8542.1, 0.6, 0.8),
        (8773.9, 0.3, 0.3),
    ):
        flux -= depth * np.exp(-0.5 * ((wave_angstrom - centre) / sigma) ** 2)
    return flux


def giraffe_image(
    flux: np.ndarray,
    uncertainty: np.ndarray,
    *,
    crval: float,
    step: float,
    crpix: float = 1.0,
    ctype: str | None = "AWAV",
    cunit: str | None = "Angstrom",
    use_cd: bool = False,
    uncertainty_kind: str = "ERROR",
    header: dict | None = None,
    quality: np.ndarray | None = None,
    flux_extension: str | None = None,
) -> bytes:
    """A 1-D image spectrum; ``uncertainty_kind`` names the extension (ERROR, VARIANCE, IVAR, ...)."""
    wcs = {"CRVAL1": crval, "CRPIX1": crpix, ("CD1_1" if use_cd else "CDELT1"): step}
    if ctype is not None:
        wcs["CTYPE1"] = ctype
    if cunit is not None:
        wcs["CUNIT1"] = cunit
    data_hdu = fits.ImageHDU(np.asarray(flux, ">f4"), name=flux_extension) if flux_extension else None
    primary = fits.PrimaryHDU(None if data_hdu is not None else np.asarray(flux, ">f4"))
    for key, value in (header or {}).items():
        primary.header[key] = value
    for key, value in wcs.items():
        (data_hdu or primary).header[key] = value
    hdus = [primary] + ([data_hdu] if data_hdu is not None else [])
    hdus.append(fits.ImageHDU(np.asarray(uncertainty, ">f4"), name=uncertainty_kind))
    if quality is not None:
        hdus.append(fits.ImageHDU(np.asarray(quality, ">i2"), name="QUALITY"))
    return _bytes(fits.HDUList(hdus))


def phase3_table(
    wave: np.ndarray,
    columns: dict[str, np.ndarray],
    *,
    wave_unit: str = "nm",
    wave_ucd: str | None = "em.wl;obs.atmos",
    flux_unit: str = "erg cm**(-2) s**(-1) angstrom**(-1)",
    header: dict | None = None,
) -> bytes:
    """An ESO Phase 3 spectrum: empty primary HDU, one binary-table row of array columns."""
    n = wave.size
    cols = [fits.Column(name="WAVE", format=f"{n}D", unit=wave_unit, array=wave[None, :])]
    for name, values in columns.items():
        unit = flux_unit if name.startswith(("FLUX", "ERR")) else None
        fmt = f"{n}J" if name == "QUAL" else f"{n}E"
        cols.append(fits.Column(name=name, format=fmt, unit=unit, array=np.asarray(values)[None, :]))
    table = fits.BinTableHDU.from_columns(cols, name="SPECTRUM")
    if wave_ucd is not None:
        table.header["TUCD1"] = wave_ucd
    primary = fits.PrimaryHDU()
    defaults = {"INSTRUME": "GIRAFFE", "PRODCATG": "SCIENCE.SPECTRUM", "SPECSYS": "BARYCENT"}
    for key, value in {**defaults, **(header or {})}.items():
        primary.header[key] = value
    return _bytes(fits.HDUList([primary, table]))


def arm_file(arm, *, snr=50.0, header=None, **kwargs) -> bytes:
    """A normalised wcs1d spectrum covering ``arm``'s grid at S/N ``snr``."""
    return giraffe_image(
        smooth_flux(arm.wave),
        np.full(arm.n_pixels, 1.0 / snr),
        crval=arm.wave_start,
        step=arm.wave_step,
        header={"SETUP": arm.name.upper(), "SNR": snr, **(header or {})},
        **kwargs,
    )


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _bytes(hdul: fits.HDUList) -> bytes:
    buffer = io.BytesIO()
    hdul.writeto(buffer)
    return buffer.getvalue()
