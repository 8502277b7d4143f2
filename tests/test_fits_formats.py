"""FITS decoders: each layout and its edge cases, on files written here with astropy."""

import gzip
import io
import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS
from fits_fixtures import giraffe_image, phase3_table, smooth_flux

from speclabel.core import contract
from speclabel.pipeline.fits_formats import (
    Unusable,
    decode,
    ivar_from_uncertainty,
    read_primary_header,
    spectrum_id,
    write_wcs1d,
)

N = 400


def _astropy_wavelengths(data: bytes, hdu: int = 0) -> np.ndarray:
    """Wavelengths in Angstrom from astropy's WCS (wcslib): the independent reference."""
    with fits.open(io.BytesIO(data)) as hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wcs = WCS(hdul[hdu].header)
        return wcs.spectral.pixel_to_world(np.arange(N)).to_value(u.AA)


def _sigma(n=N, value=0.02):
    return np.full(n, value)


def test_linear_wcs_image_as_gaia_eso_distributes_it():
    wave = 5330.0 + 0.05 * np.arange(N)
    flux = smooth_flux(wave)
    header = {
        "OBJECT": "NGC2516 field",
        "CNAME": "07574792-6047190",
        "RA": 119.4497,
        "DEC": -60.7886,
        "SETUP": "HR10",
        "SNR": 85.5,
        "VRAD": 23.4,
        "INSTRUME": "GIRAFFE",
    }
    data = giraffe_image(flux, _sigma(), crval=5330.0, step=0.05, header=header)
    spectrum = decode(data)
    assert spectrum.layout == "wcs1d"
    np.testing.assert_allclose(spectrum.wave, wave, rtol=0, atol=1e-9)
    np.testing.assert_allclose(spectrum.wave, _astropy_wavelengths(data), rtol=0, atol=1e-6)
    np.testing.assert_allclose(spectrum.flux, flux.astype(np.float32))
    np.testing.assert_allclose(spectrum.ivar, 1.0 / np.float32(0.02) ** 2, rtol=1e-6)
    assert spectrum.medium == "air" and spectrum.wave_unit == "Angstrom"
    meta = spectrum.meta
    assert (meta.cname, meta.object, meta.setup, meta.instrument) == (
        "07574792-6047190",
        "NGC2516 field",
        "HR10",
        "GIRAFFE",
    )
    assert (meta.ra, meta.dec, meta.snr, meta.rv_kms) == (119.4497, -60.7886, 85.5, 23.4)
    assert spectrum.flux.dtype == np.float64 and spectrum.flux.dtype.isnative


def test_cd_matrix_nanometres_and_vacuum():
    data = giraffe_image(
        np.ones(N), _sigma(), crval=848.4, step=0.005, crpix=3.0, ctype="WAVE", cunit="nm", use_cd=True
    )
    spectrum = decode(data)
    assert spectrum.medium == "vacuum" and spectrum.wave_unit == "nm"
    np.testing.assert_allclose(spectrum.wave * 10.0, _astropy_wavelengths(data), rtol=1e-12)
    assert spectrum.wave[2] == pytest.approx(848.4)


def test_log_linear_wcs_matches_wcslib():
    data = giraffe_image(np.ones(N), _sigma(), crval=5339.0, step=0.05, ctype="AWAV-LOG")
    spectrum = decode(data)
    reference = _astropy_wavelengths(data)
    np.testing.assert_allclose(spectrum.wave, reference, rtol=1e-12)
    steps = np.diff(spectrum.wave)
    assert steps[-1] > steps[0]  # logarithmic: constant Δλ/λ, growing Δλ
    np.testing.assert_allclose(steps / spectrum.wave[:-1], steps[0] / spectrum.wave[0], rtol=1e-6)


def test_iraf_dc_flag_log10_wavelengths():
    data = giraffe_image(
        np.ones(N), _sigma(), crval=np.log10(5339.0), step=4e-6, ctype=None, cunit=None, header={"DC-FLAG": 1}
    )
    spectrum = decode(data)
    np.testing.assert_allclose(spectrum.wave, 10 ** (np.log10(5339.0) + 4e-6 * np.arange(N)), rtol=1e-12)
    assert spectrum.medium is None  # undeclared: ingest's default medium applies


@pytest.mark.parametrize(
    ("kind", "stored", "expected"),
    [
        ("ERROR", np.array([0.1, 0.2, 0.0, -1.0, np.nan]), np.array([100.0, 25.0, 0.0, 0.0, 0.0])),
        ("VARIANCE", np.array([0.01, 0.04, 0.0, -1.0, np.inf]), np.array([100.0, 25.0, 0.0, 0.0, 0.0])),
        ("IVAR", np.array([100.0, 25.0, 0.0, -3.0, np.nan]), np.array([100.0, 25.0, 0.0, 0.0, 0.0])),
    ],
)
def test_error_variance_or_ivar_extension(kind, stored, expected):
    data = giraffe_image(np.ones(5), stored, crval=5339.0, step=0.05, uncertainty_kind=kind)
    np.testing.assert_allclose(decode(data).ivar, expected, rtol=1e-6)


def test_bad_pixels_quality_flags_and_nonfinite_flux_are_masked():
    flux = np.ones(N)
    flux[10] = np.nan
    quality = np.zeros(N, dtype=int)
    quality[20:23] = 4
    spectrum = decode(giraffe_image(flux, _sigma(), crval=5339.0, step=0.05, quality=quality))
    masked = np.flatnonzero(spectrum.ivar == 0)
    assert masked.tolist() == [10, 20, 21, 22]


def test_flux_in_a_named_extension():
    data = giraffe_image(
        np.full(N, 2.0), _sigma(), crval=5339.0, step=0.05, flux_extension="FLUX", header={"OBJECT": "x"}
    )
    spectrum = decode(data)
    assert spectrum.flux[0] == 2.0 and spectrum.meta.object == "x"
    np.testing.assert_allclose(spectrum.wave, _astropy_wavelengths(data, hdu=1), atol=1e-6)


def test_decreasing_wavelengths_are_reversed():
    flux = np.arange(N, dtype=float)
    spectrum = decode(giraffe_image(flux, _sigma(), crval=5400.0, step=-0.05))
    assert np.all(np.diff(spectrum.wave) > 0)
    assert spectrum.flux[0] == N - 1 and spectrum.wave[0] == pytest.approx(5400.0 - 0.05 * (N - 1))


def test_phase3_binary_table_with_units_ucd_and_quality():
    wave_nm = 533.9 + 0.005 * np.arange(N)
    flux = 3e-15 * smooth_flux(wave_nm * 10)
    qual = np.zeros(N, dtype=int)
    qual[5] = 1
    data = phase3_table(
        wave_nm,
        {"FLUX": flux, "ERR": np.full(N, 3e-17), "QUAL": qual},
        header={"OBJECT": "HD 12345", "SNR": 100.0, "SPEC_RES": 19800.0, "CONTNORM": False},
    )
    spectrum = decode(data)
    assert spectrum.layout == "eso-phase3"
    assert spectrum.wave_unit == "nm" and spectrum.medium == "air"
    np.testing.assert_allclose(spectrum.wave, wave_nm)
    np.testing.assert_allclose(spectrum.flux, flux.astype(np.float32))
    assert spectrum.ivar[5] == 0 and spectrum.ivar[6] == pytest.approx(1 / np.float32(3e-17) ** 2, rel=1e-6)
    assert spectrum.meta.resolution == 19800.0 and spectrum.meta.normalised is False
    assert spectrum.meta.object == "HD 12345" and spectrum.meta.frame == "BARYCENT"


def test_phase3_prefers_the_normalised_flux_then_flux_reduced():
    wave = 5339.0 + 0.05 * np.arange(N)
    both = phase3_table(
        wave,
        {
            "FLUX": np.full(N, 5.0),
            "ERR": np.full(N, 0.5),
            "FLUX_NORM": np.ones(N),
            "ERR_NORM": np.full(N, 0.1),
        },
        wave_unit="Angstrom",
        wave_ucd="em.wl",
    )
    spectrum = decode(both)
    assert spectrum.flux[0] == 1.0 and spectrum.ivar[0] == pytest.approx(100.0, rel=1e-6)
    assert spectrum.meta.normalised is True and spectrum.medium is None
    reduced = phase3_table(
        wave, {"FLUX_REDUCED": np.full(N, 7.0), "ERR_REDUCED": np.full(N, 0.7)}, wave_unit="Angstrom"
    )
    spectrum = decode(reduced)
    assert spectrum.flux[0] == 7.0 and spectrum.ivar[0] == pytest.approx(1 / np.float32(0.7) ** 2, rel=1e-6)


def test_phase3_without_an_error_column_is_unusable():
    data = phase3_table(np.linspace(533.9, 561.9, N), {"FLUX": np.ones(N)})
    with pytest.raises(Unusable) as info:
        decode(data)
    assert info.value.reason == contract.MISSING_ERROR


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda good: good[:-2000], contract.CORRUPT_FILE),  # truncated inside the error data
        (lambda good: good[:-100], contract.CORRUPT_FILE),  # truncated in the final padding
        (lambda good: b"this is not a FITS file" * 200, contract.CORRUPT_FILE),
        (lambda good: gzip.compress(good)[:300], contract.CORRUPT_FILE),  # damaged gzip
        (lambda good: giraffe_image(np.ones(N), _sigma(), crval=5339.0, step=0.0), contract.MISSING_WCS),
        (
            lambda good: giraffe_image(
                np.ones(N), _sigma(), crval=5.4e14, step=1e9, ctype="FREQ", cunit="Hz"
            ),
            contract.WRONG_UNITS,
        ),
        (
            lambda good: giraffe_image(
                np.ones(N), _sigma(), crval=5339.0, step=0.05, cunit="km/s", ctype=None
            ),
            contract.WRONG_UNITS,
        ),
        (
            lambda good: giraffe_image(np.ones(N), _sigma(), crval=5339.0, step=0.05, uncertainty_kind="SKY"),
            contract.MISSING_ERROR,
        ),
        (lambda good: _hdul_bytes([fits.PrimaryHDU(np.ones((3, N), np.float32))]), contract.UNKNOWN_FORMAT),
    ],
    ids=[
        "truncated",
        "truncated-padding",
        "not-fits",
        "bad-gzip",
        "no-wcs",
        "frequency-axis",
        "velocity-unit",
        "no-error",
        "2d-image",
    ],
)
def test_unusable_files_say_why(make, reason):
    good = giraffe_image(np.ones(N), _sigma(), crval=5339.0, step=0.05)
    with pytest.raises(Unusable) as info:
        decode(make(good))
    assert info.value.reason == reason, info.value.detail


def test_gzipped_file_decodes():
    good = giraffe_image(np.ones(N), _sigma(), crval=5339.0, step=0.05)
    assert decode(gzip.compress(good)).flux.size == N


def test_primary_header_from_the_first_blocks_only():
    data = giraffe_image(
        np.ones(N), _sigma(), crval=5339.0, step=0.05, header={"CNAME": "01234567-7654321", "OBJECT": "obj"}
    )
    stream = io.BytesIO(data)
    header = read_primary_header(stream.read)
    assert stream.tell() == 2880  # one block of cards: the data was not read
    assert header["CNAME"] == "01234567-7654321"
    with pytest.raises(Unusable):
        read_primary_header(io.BytesIO(data[:1000]).read)
    with pytest.raises(Unusable):
        read_primary_header(io.BytesIO(b"\0" * 6000).read)


def test_spectrum_id_is_cname_else_object_else_file_name():
    header = fits.Header({"CNAME": " 01234567-7654321 ", "OBJECT": "obj"})
    assert spectrum_id(header, "/d/a.fits") == ("01234567-7654321", "CNAME")
    assert spectrum_id(fits.Header({"OBJECT": "obj", "CNAME": ""}), "/d/a.fits") == ("obj", "OBJECT")
    assert spectrum_id(fits.Header(), "/d/star_hr10.fits.gz") == ("star_hr10", "filename")


def test_ivar_from_uncertainty_rejects_unknown_kind():
    with pytest.raises(ValueError):
        ivar_from_uncertainty("stddev", np.ones(3))


def test_simulator_writer_round_trips_through_the_decoder():
    flux = smooth_flux(5339.0 + 0.05 * np.arange(N))
    sigma = np.full(N, 0.01)
    sigma[7] = 0.0
    data = write_wcs1d(
        flux, sigma, wave_start=5339.0, wave_step=0.05, medium="air", cards={"CNAME": "c", "SETUP": "HR10"}
    )
    spectrum = decode(data)
    np.testing.assert_allclose(spectrum.wave, 5339.0 + 0.05 * np.arange(N), atol=1e-9)
    np.testing.assert_array_equal(spectrum.flux, flux.astype(np.float32))
    assert spectrum.ivar[7] == 0 and spectrum.medium == "air" and spectrum.meta.setup == "HR10"


def _hdul_bytes(hdus) -> bytes:
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()
