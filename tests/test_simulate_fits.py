"""`speclabel simulate --format fits`: the Gaia-ESO-like files ingest reads, plus the truth table."""

import io

import numpy as np
import pyarrow.parquet as pq

from speclabel.core.setups import SPEED_OF_LIGHT_KMS
from speclabel.jobs.cli import main
from speclabel.pipeline.fits_formats import decode, read_primary_header
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk


def test_fits_output_holds_the_survey_in_the_observed_frame(tmp_path, setup):
    out = tmp_path / "sim"
    argv = ["simulate", "--n", "5", "--seed", "4", "--chunk-size", "3", "--format", "fits", "--out", str(out)]
    assert main([*argv, "--workers", "1"]) == 0
    files = sorted((out / "spectra").rglob("*.fits"))
    assert [f.relative_to(out / "spectra").as_posix() for f in files[:3]] == [
        "00000/SIM-00000000_hr10.fits",
        "00000/SIM-00000000_hr21.fits",
        "00000/SIM-00000001_hr10.fits",
    ]
    assert len(files) == 10
    truth = pq.read_table(out / "labels.parquet")
    survey = [simulate_chunk(setup, SurveyConfig(n=5, seed=4, chunk_size=3), c) for c in range(2)]
    rows = [row for table in survey for row in table.to_pylist()]
    assert truth.column("spectrum_id").to_pylist() == [r["object"] for r in rows]  # the CNAME
    assert truth.column("object").to_pylist() == [r["spectrum_id"] for r in rows]
    np.testing.assert_array_equal(truth.column("feh").to_numpy(), [r["feh"] for r in rows])
    assert 5.0 < np.std(truth.column("vrad").to_numpy()) < 120.0

    for k, row in enumerate(rows):
        for arm in setup.arms:
            data = (out / "spectra" / f"{k // 3:05d}" / f"{row['spectrum_id']}_{arm.name}.fits").read_bytes()
            header = read_primary_header(io.BytesIO(data).read)
            assert header["CNAME"] == row["object"] and header["OBJECT"] == row["spectrum_id"]
            assert header["SETUP"] == arm.name.upper() and header["CTYPE1"] == "AWAV"
            assert (header["RA"], header["DEC"]) == (row["ra"], row["dec"])
            spectrum = decode(data)
            scale = 1 + truth.column("vrad")[k].as_py() / SPEED_OF_LIGHT_KMS
            np.testing.assert_allclose(spectrum.wave, arm.wave * scale, rtol=1e-13)
            flux = np.asarray(row[arm.flux_column], dtype=np.float32)
            ivar = np.asarray(row[arm.ivar_column], dtype=np.float32)
            np.testing.assert_array_equal(spectrum.flux, flux)
            np.testing.assert_array_equal(spectrum.ivar == 0, ivar == 0)
            np.testing.assert_allclose(spectrum.ivar[ivar > 0], ivar[ivar > 0], rtol=1e-6)
        assert header["SNR"] > 0 and np.isfinite(header["VRAD"])

    # The same seed writes the same bytes however many processes write.
    parallel = tmp_path / "parallel"
    assert main([*argv[:-1], str(parallel), "--workers", "2"]) == 0
    for f in files:
        assert (parallel / f.relative_to(out)).read_bytes() == f.read_bytes()
    assert not any(c.startswith("flux_") for c in truth.column_names)
