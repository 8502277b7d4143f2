"""Ingest's per-file science (pipeline/ingest/prepare.py): one file onto its arm's grid against
direct numpy computations, one star from its files, and contract Parquet rows passed through."""

import numpy as np
import pyarrow as pa
import pytest
from fits_fixtures import arm_file, giraffe_image, phase3_table, smooth_flux

from speclabel.core import contract
from speclabel.core.arrays import spectra_arrays
from speclabel.core.fingerprints import spectrum_sha256
from speclabel.core.setups import SPEED_OF_LIGHT_KMS
from speclabel.pipeline.fits_formats import Unusable
from speclabel.pipeline.ingest import IngestOptions, assemble_star, pass_through, prepare_file, star_table
from speclabel.pipeline.resample import air_to_vacuum, to_rest_frame, vacuum_to_air

OPTIONS = IngestOptions(release="T")


def _reference_rebin(centres, flux, arm):
    """Mean of piecewise-constant flux over each arm pixel via its running integral (contiguous pixels)."""
    edges = np.concatenate([[1.5 * centres[0] - 0.5 * centres[1]], 0.5 * (centres[1:] + centres[:-1])])
    edges = np.append(edges, 1.5 * centres[-1] - 0.5 * centres[-2])
    integral = np.concatenate([[0.0], np.cumsum(flux * np.diff(edges))])
    lo, hi = arm.wave - arm.wave_step / 2, arm.wave + arm.wave_step / 2
    return (np.interp(hi, edges, integral) - np.interp(lo, edges, integral)) / arm.wave_step


# -- one file -------------------------------------------------------------------------------------


def test_vacuum_log_grid_in_nm_with_a_radial_velocity_lands_on_the_setup_grid(setup):
    """A -LOG vacuum spectrum in nm, observed at +75 km/s, against a direct numpy computation."""
    arm = setup.arm("hr10")
    rv = 75.0
    n = 5000
    crval_nm, step_nm = 534.0, 0.0059  # observed-frame vacuum wavelengths, logarithmic
    pixels = np.arange(1, n + 1)
    observed_vacuum_nm = crval_nm * np.exp(step_nm * (pixels - 1) / crval_nm)
    # Shifting before or after the medium conversion differs by 4e-9 of λ; ingest shifts in air.
    rest_air = to_rest_frame(vacuum_to_air(observed_vacuum_nm * 10.0), rv)
    flux = smooth_flux(rest_air)  # the star's lines sit at their rest air wavelengths
    data = giraffe_image(
        flux,
        np.full(n, 0.01),
        crval=crval_nm,
        step=step_nm,
        ctype="WAVE-LOG",
        cunit="nm",
        header={"VRAD": rv, "SPECSYS": "BARYCENT", "OBJECT": "x"},
    )
    prepared = prepare_file("x.fits", data, setup, IngestOptions(release="T", normalised="yes"))
    assert prepared.arm == "hr10"
    expected = _reference_rebin(rest_air, flux.astype(np.float32), arm)
    covered = (arm.wave - arm.wave_step > rest_air[0]) & (arm.wave + arm.wave_step < rest_air[-1])
    assert covered.sum() > 4000
    np.testing.assert_allclose(prepared.flux[covered], expected[covered], rtol=2e-6)
    assert np.all(
        prepared.ivar[~covered & ((arm.wave < rest_air[0] - 0.1) | (arm.wave > rest_air[-1] + 0.1))] == 0
    )
    # The Mg I line is back at its rest air wavelength.
    window = np.abs(arm.wave - 5528.4) < 1.0
    assert arm.wave[window][np.argmin(prepared.flux[window])] == pytest.approx(5528.4, abs=arm.wave_step)
    # Without the shift (or with SPECSYS = SOURCE) the line stays where it was observed.
    unshifted = prepare_file(
        "x.fits", data, setup, IngestOptions(release="T", normalised="yes", rv_shift=False)
    )
    observed = 5528.4 * (1 + rv / SPEED_OF_LIGHT_KMS)
    window = np.abs(arm.wave - observed) < 1.0
    assert arm.wave[window][np.argmin(unshifted.flux[window])] == pytest.approx(observed, abs=arm.wave_step)


def test_unnormalised_phase3_flux_is_continuum_normalised(setup):
    arm = setup.arm("hr21")
    wave_nm = air_to_vacuum(arm.wave) / 10.0  # a vacuum table: no obs.atmos in the UCD
    x = (arm.wave - arm.wave.mean()) / (arm.wave[-1] - arm.wave[0])
    continuum = 2e-15 * (1 + 0.4 * x - 0.3 * x**2)
    normalised = smooth_flux(arm.wave)
    data = phase3_table(
        wave_nm,
        {"FLUX": continuum * normalised, "ERR": continuum * normalised / 200.0},
        wave_ucd="em.wl",
        header={"OBJECT": "y", "SNR": 200.0, "SPEC_RES": 17000.0, "CONTNORM": False},
    )
    prepared = prepare_file("y.fits", data, setup, IngestOptions(release="T", default_medium="vacuum"))
    assert prepared.arm == "hr21" and not prepared.normalised_input
    good = prepared.ivar > 0
    assert good.mean() > 0.99
    np.testing.assert_allclose(prepared.flux[good], normalised[good], atol=0.01)


@pytest.mark.parametrize(
    ("header", "wave_start", "reason"),
    [
        ({"SETUP": "U580", "INSTRUME": "UVES"}, 5339.0, contract.WRONG_SETUP),
        ({"SETUP": "HR21"}, 5339.0, contract.NO_OVERLAP),  # the header says HR21, the WCS says HR10
        ({"SPEC_RES": 47000.0, "INSTRUME": "UVES"}, 5339.0, contract.WRONG_RESOLUTION),
        ({}, 6000.0, contract.NO_OVERLAP),
        ({}, 5500.0, contract.NO_OVERLAP),  # covers only 43 % of HR10 and names no setup
    ],
)
def test_files_of_other_setups_and_instruments_are_refused(setup, header, wave_start, reason):
    data = giraffe_image(np.ones(5601), np.full(5601, 0.01), crval=wave_start, step=0.05, header=header)
    with pytest.raises(Unusable) as info:
        prepare_file("z.fits", data, setup, OPTIONS)
    assert info.value.reason == reason, info.value.detail


def test_arm_from_header_then_from_coverage(setup):
    hr21 = setup.arm("hr21")
    data = giraffe_image(
        np.ones(hr21.n_pixels), np.full(hr21.n_pixels, 0.01), crval=hr21.wave_start, step=0.05
    )
    assert prepare_file("a.fits", data, setup, OPTIONS).arm == "hr21"
    declared = arm_file(hr21, header={"SETUP": "hr21"})
    assert prepare_file("b.fits", declared, setup, OPTIONS).arm == "hr21"


# -- one star -------------------------------------------------------------------------------------


def test_duplicates_keep_the_highest_snr(setup):
    hr10, hr21 = setup.arms
    files = [
        ("low.fits", arm_file(hr10, snr=30.0)),
        ("high.fits", arm_file(hr10, snr=80.0)),
        ("red.fits", arm_file(hr21, snr=60.0)),
        ("broken.fits", Unusable(contract.CORRUPT_FILE, "cannot read")),
    ]
    star = assemble_star("S1", files, setup, OPTIONS)
    assert star.arms["hr10"].path == "high.fits" and star.arms["hr21"].path == "red.fits"
    reasons = {source: reason for reason, source in star.quarantine}
    assert set(reasons) == {"low.fits", "broken.fits"}
    assert reasons["low.fits"].startswith(
        "duplicate: a second hr10 spectrum of S1 (S/N 30.0); kept high.fits"
    )
    table = star_table([star], setup)
    assert table.column(contract.SOURCE_FILES).to_pylist() == [["high.fits", "red.fits"]]
    assert table.column("snr").to_pylist() == [80.0]
    assert all(r is None for r in contract.validate(table, setup))


def test_missing_arm_quarantines_or_masks(setup):
    files = [("blue.fits", arm_file(setup.arm("hr10"), header={"RA": 10.5, "DEC": -3.0}))]
    quarantined = assemble_star("S2", files, setup, OPTIONS)
    assert not quarantined.stored
    assert [contract.reason_code(r) for r, _ in quarantined.quarantine] == [contract.MISSING_ARM]
    masked = assemble_star("S2", files, setup, IngestOptions(release="T", missing_arm="mask"))
    table = star_table([masked], setup)
    arrays = spectra_arrays(table, setup)
    assert np.all(arrays.ivar["hr21"] == 0) and np.all(np.isnan(arrays.flux["hr21"]))
    assert (arrays.ivar["hr10"] > 0).all()
    assert table.column("ra").to_pylist() == [10.5]
    assert all(r is None for r in contract.validate(table, setup))
    expected_hash = spectrum_sha256(arrays, setup)
    assert table.column(contract.INPUT_SHA256).to_pylist() == expected_hash


# -- Parquet pass-through -------------------------------------------------------------------------


def test_pass_through_keeps_good_rows_exactly_and_quarantines_the_rest(setup, small_survey):
    table = small_survey.slice(0, 6)
    flux = table.column("flux_hr10").to_pylist()
    ivar = table.column("ivar_hr10").to_pylist()
    flux[2][100] = float("nan")  # at an unmasked pixel
    ivar[2][100] = 1.0
    table = table.set_column(
        table.schema.get_field_index("flux_hr10"),
        "flux_hr10",
        pa.array(flux, table.schema.field("flux_hr10").type),
    )
    table = table.set_column(
        table.schema.get_field_index("ivar_hr10"),
        "ivar_hr10",
        pa.array(ivar, table.schema.field("ivar_hr10").type),
    )
    stored, refused = pass_through(table, "in.parquet", 100, [4], setup)
    assert stored.schema.equals(contract.store_schema(setup), check_metadata=True)
    assert stored.column("spectrum_id").to_pylist() == [table["spectrum_id"][i].as_py() for i in (0, 1, 3, 5)]
    assert refused.column("reason").to_pylist() == [contract.NONFINITE_FLUX, contract.DUPLICATE_ID]
    assert refused.column("detail")[1].as_py().endswith("(row 104)")
    original = spectra_arrays(table.take([0, 1, 3, 5]), setup)
    kept = spectra_arrays(stored, setup)
    for arm in setup.arms:
        np.testing.assert_array_equal(kept.flux[arm.name], original.flux[arm.name])
        np.testing.assert_array_equal(kept.ivar[arm.name], original.ivar[arm.name])
    assert stored.column(contract.INPUT_SHA256).to_pylist() == spectrum_sha256(original, setup)
    no_ivar = table.drop_columns(["ivar_hr10", "ivar_hr21"]).slice(0, 2)
    stored, _ = pass_through(no_ivar, "in.parquet", 0, [], setup)
    assert np.all(spectra_arrays(stored, setup).ivar["hr10"] == 1.0)


def test_an_unexpected_decoding_error_quarantines_the_file_not_the_run(setup, monkeypatch):
    from speclabel.pipeline.ingest import prepare

    real = prepare.prepare_file

    def flaky(path, data, setup, options):
        if path == "odd.fits":
            raise ZeroDivisionError("an astropy corner case")
        return real(path, data, setup, options)

    monkeypatch.setattr(prepare, "prepare_file", flaky)
    files = [
        ("odd.fits", b""),
        ("red.fits", arm_file(setup.arm("hr21"))),
        ("blue.fits", arm_file(setup.arm("hr10"))),
    ]
    star = assemble_star("S3", files, setup, OPTIONS)
    assert star.stored and set(star.arms) == {"hr10", "hr21"}
    assert star.quarantine == [("decode_error: ZeroDivisionError: an astropy corner case", "odd.fits")]
