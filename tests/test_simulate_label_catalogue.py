"""The Gaia-ESO-style label catalogue of the simulator: absolute abundances, errors, nulls, flags,
FITS/Parquet/CSV round trips and the CNAMEs that join it to the spectra."""

import gzip
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from speclabel.core.errors import ConfigError
from speclabel.jobs.cli import main
from speclabel.pipeline.simulate import (
    SOLAR_ABUNDANCES,
    LabelCatalogueConfig,
    draw_labels,
    label_catalogue,
    write_label_catalogue,
)

LABEL_OF = {"TEFF": "teff", "LOGG": "logg", "FEH": "feh", "MG1": "mgfe", "AL1": "alfe"}


def _truth(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    labels = draw_labels(rng, n)
    columns = {
        "spectrum_id": pa.array([f"T-{i:06d}" for i in range(n)]),
        "snr": pa.array(np.exp(rng.uniform(np.log(10), np.log(150), n)).astype(np.float32)),
    }
    return pa.table({**columns, **{k: pa.array(labels[k].astype(np.float32)) for k in LABEL_OF.values()}})


def _np(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def test_solar_values_are_the_documented_ones():
    assert (SOLAR_ABUNDANCES["Mg"], SOLAR_ABUNDANCES["Al"], SOLAR_ABUNDANCES["Fe"]) == (7.53, 6.37, 7.45)


def test_without_scatter_the_values_are_the_truth_and_abundances_are_absolute():
    truth = _truth(300)
    cat = label_catalogue(truth, LabelCatalogueConfig(seed=4, scatter=False, null_fraction={}))
    assert cat.column("CNAME").to_pylist() == truth.column("spectrum_id").to_pylist()
    feh = _np(truth, "feh")
    np.testing.assert_allclose(_np(cat, "MG1"), _np(truth, "mgfe") + feh + 7.53, atol=2e-6)
    np.testing.assert_allclose(_np(cat, "AL1"), _np(truth, "alfe") + feh + 6.37, atol=2e-6)
    for name in ("TEFF", "LOGG", "FEH"):
        np.testing.assert_array_equal(_np(cat, name), _np(truth, LABEL_OF[name]).astype(np.float32))
    # Errors: a floor plus a 1/S/N part; the large-error rows are 10 times that.
    snr = _np(truth, "snr")
    expected = (50.0 + 600.0 / snr).astype(np.float32)
    e_teff = cat.column("E_TEFF").to_numpy().astype(np.float32)
    large = ~np.isclose(e_teff, expected, rtol=1e-5)
    np.testing.assert_allclose(e_teff[large], 10 * expected[large], rtol=1e-5)
    assert 0 < large.sum() < 20
    assert cat.column("PECULI").type == pa.bool_() and all(c.null_count == 0 for c in cat.columns)


def test_scatter_follows_the_quoted_errors_nulls_and_flags():
    n = 6000
    truth = _truth(n, seed=1)
    config = LabelCatalogueConfig(seed=2)
    cat = label_catalogue(truth, config)
    peculiar = np.array(cat.column("PECULI").to_pylist())
    assert 0.02 < peculiar.mean() < 0.04
    feh = _np(truth, "feh")
    for name, label in LABEL_OF.items():
        value, error = cat.column(name), cat.column(f"E_{name}")
        null = value.is_null().to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(null, error.is_null().to_numpy(zero_copy_only=False))
        assert abs(null.mean() - config.null_fraction[name]) < 0.015, name
        element = {"MG1": "Mg", "AL1": "Al"}.get(name)
        true = _np(truth, label) + (feh + SOLAR_ABUNDANCES[element] if element else 0.0)
        pull = (value.fill_null(np.nan).to_numpy() - true) / error.fill_null(np.nan).to_numpy()
        normal = ~null & ~peculiar
        assert abs(np.std(pull[normal]) - 1.0) < 0.05, name
        assert abs(np.mean(pull[normal])) < 0.05, name
        # PECULI rows are off by more than their errors say.
        assert np.median(np.abs(pull[~null & peculiar])) > 2.0, name
    assert label_catalogue(truth, config).equals(cat)  # the same seed, the same catalogue
    assert not label_catalogue(truth, LabelCatalogueConfig(seed=3)).equals(cat)


def test_fits_round_trip_with_astropy(tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    cat = label_catalogue(_truth(200, seed=5), LabelCatalogueConfig(seed=5))
    path = tmp_path / "ges.fits"
    write_label_catalogue(str(path), cat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy does not parse "dex" as a unit
        back = Table.read(path, hdu="LABELS")
    assert back.colnames == cat.column_names
    assert list(back["CNAME"]) == cat.column("CNAME").to_pylist()
    assert back["PECULI"].dtype == bool and list(back["PECULI"]) == cat.column("PECULI").to_pylist()
    for name in ("SNR", *LABEL_OF, *(f"E_{n}" for n in LABEL_OF)):
        column = cat.column(name)
        null = column.is_null().to_numpy(zero_copy_only=False)
        stored = np.ma.filled(back[name].astype(np.float64), np.nan)
        np.testing.assert_array_equal(np.isnan(stored), null)  # a null is NaN in FITS
        np.testing.assert_array_equal(stored[~null], column.to_numpy(zero_copy_only=False)[~null])
    header = fits.getheader(path, "LABELS")
    assert (header["SUN_MG"], header["SUN_AL"]) == (7.53, 6.37)
    units = {header[f"TTYPE{i}"]: header.get(f"TUNIT{i}") for i in range(1, header["TFIELDS"] + 1)}
    assert units["TEFF"] == units["E_TEFF"] == "K" and units["MG1"] == "dex" and units["CNAME"] is None
    write_label_catalogue(str(tmp_path / "ges.fits.gz"), cat)
    assert gzip.decompress((tmp_path / "ges.fits.gz").read_bytes()) == path.read_bytes()


def test_parquet_and_csv_outputs_and_a_bad_suffix(tmp_path):
    cat = label_catalogue(_truth(50, seed=6), LabelCatalogueConfig(seed=6))
    write_label_catalogue(str(tmp_path / "ges.parquet"), cat)
    assert pq.read_table(tmp_path / "ges.parquet").equals(cat)
    write_label_catalogue(str(tmp_path / "ges.csv"), cat)
    back = pacsv.read_csv(tmp_path / "ges.csv")
    assert back.column("CNAME").to_pylist() == cat.column("CNAME").to_pylist()
    assert back.column("AL1").null_count == cat.column("AL1").null_count
    with pytest.raises(ConfigError, match=r"name it \.fits"):
        write_label_catalogue(str(tmp_path / "ges.txt"), cat)


@pytest.mark.parametrize("fmt", ["fits", "parquet"])
def test_cli_writes_a_catalogue_keyed_by_the_ids_of_the_spectra(tmp_path, capsys, fmt):
    from astropy.table import Table

    out = tmp_path / ("sim" if fmt == "fits" else "sim.parquet")
    catalogue = tmp_path / "ges.fits"
    argv = ["simulate", "--n", "12", "--chunk-size", "5", "--format", fmt, "--out", str(out)]
    argv += ["--setup", "giraffe-hr15n", "--seed", "3", "--label-catalogue", str(catalogue)]
    assert main([*argv, "--workers", "1"]) == 0
    assert "wrote label catalogue" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cat = Table.read(catalogue)
    truth = pq.read_table(out / "labels.parquet" if fmt == "fits" else out)
    # The CNAME is the id the spectra carry: the CNAME ingest keys FITS stars by, or spectrum_id.
    assert list(cat["CNAME"]) == truth.column("spectrum_id").to_pylist()
    if fmt == "fits":  # and the simulator's own id is kept as OBJECT
        assert truth.column("object").to_pylist()[0].startswith("SIM-")
    written = catalogue.read_bytes()
    elsewhere = [str(tmp_path / "other") if a == str(out) else a for a in argv]
    assert main([*elsewhere, "--workers", "1"]) == 2  # new spectra, but the catalogue exists
    assert f"{catalogue} exists; choose another --label-catalogue" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert main([*elsewhere[:-1], str(tmp_path / "ges.txt"), "--workers", "1"]) == 2  # before any work
    assert "name it .fits" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main([*argv, "--workers", "2", "--overwrite"]) == 0
    assert catalogue.read_bytes() == written  # same seed, same bytes, however many processes
