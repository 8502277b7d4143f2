"""`speclabel query` and `speclabel stats`: outputs that astropy and pandas read, errors and exit codes."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from astropy.io import fits
from astropy.table import Table
from catalogue_data import build_catalogue

from speclabel.jobs.cli import main
from speclabel.pipeline.catalogue import Catalogue


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "cat"
    given = build_catalogue(root, {"DR1": 800, "DR2": 300})
    return str(root), given


def _expected_ids(given, release, mask_fn):
    t = given[release]
    mask = mask_fn(t)
    return sorted(np.array(t.column("spectrum_id").to_pylist())[mask])


# TOPCAT reads TUNIT = 'dex'; astropy warns that dex is not a FITS-standard unit string.
@pytest.mark.filterwarnings("ignore:'dex' did not parse as fits unit")
def test_fits_output_has_units_and_the_selected_rows(catalogue, tmp_path, capsys):
    root, given = catalogue
    out = tmp_path / "metal_poor.fits"
    args = ["query", root, "--release", "DR1", "--where", "feh < -0.5", "--out", str(out)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    table = Table.read(out, hdu="LABELS")
    feh = given["DR1"].column("feh").to_numpy()
    assert sorted(table["spectrum_id"]) == _expected_ids(given, "DR1", lambda t: feh < -0.5)
    header = fits.getheader(out, extname="LABELS")
    units = {header[f"TTYPE{i}"]: header.get(f"TUNIT{i}") for i in range(1, header["TFIELDS"] + 1)}
    assert units["teff"] == "K" and units["teff_std"] == "K"
    assert units["feh"] == units["mgfe"] == units["alfe_std"] == "dex"
    assert units["ra"] == units["dec"] == "deg"
    assert units["sal_feh_peak_wave"] == "Angstrom"
    assert table["teff_members"].shape == (len(table), 3)
    # Rows without a position: null in Arrow, NaN in FITS (which astropy shows as masked).
    selected = given["DR1"].filter(pa.array(feh < -0.5))
    assert np.ma.count_masked(table["ra"]) == selected.column("ra").null_count > 0
    assert table["processed_at"][0].startswith("2026-01-01T00:00:00")


def test_csv_and_parquet_outputs_read_in_pandas(catalogue, tmp_path):
    root, _ = catalogue
    cone = ["--cone", "40", "-30", "30"]
    columns = "spectrum_id,release,feh,teff_members"
    assert main(["query", root, *cone, "--columns", columns, "--out", str(tmp_path / "c.csv")]) == 0
    assert main(["query", root, *cone, "--columns", columns, "--out", str(tmp_path / "c.parquet")]) == 0
    csv = pd.read_csv(tmp_path / "c.csv").sort_values("spectrum_id")
    parquet = pd.read_parquet(tmp_path / "c.parquet").sort_values("spectrum_id")
    expected = Catalogue.open(root).query(cone=(40, -30, 30), columns=["spectrum_id"])
    assert len(csv) == len(parquet) == len(expected) > 0
    assert list(csv.columns) == [*columns.split(","), "cone_distance"]
    assert csv["spectrum_id"].tolist() == parquet["spectrum_id"].tolist()
    assert np.allclose(csv["feh"], parquet["feh"], atol=1e-6)
    assert json.loads(csv["teff_members"].iloc[0]) == pytest.approx(list(parquet["teff_members"].iloc[0]))
    # An existing output is not replaced without --overwrite.
    assert main(["query", root, "--out", str(tmp_path / "c.csv")]) == 2


def test_printed_table_is_readable_and_says_what_it_shows(catalogue, capsys):
    root, _ = catalogue
    assert main(["query", root, "--where", "teff > 4000"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["spectrum_id", "release", "ra", "dec", "snr", "teff"]
    assert len(lines) == 1 + 20 + 1 and "(20 rows of " in lines[-1]
    assert main(["query", root, "--columns", "spectrum_id,feh", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["spectrum_id", "feh"] and lines[-1] == "(3 rows)"


def test_group_by_and_aggregate_print_and_write_the_groups(catalogue, tmp_path, capsys):
    root, given = catalogue
    selection = ["query", root, "--where", "feh < 0", "--group-by", "release"]
    assert main([*selection, "--aggregate", "count,mean(feh)", "--aggregate", "max(teff)"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["release", "count", "mean_feh", "max_teff"] and lines[-1] == "(2 rows)"
    expected = {}
    for release in ("DR1", "DR2"):
        feh = given[release].column("feh").to_numpy()
        teff = given[release].column("teff").to_numpy()
        expected[release] = ((feh < 0).sum(), feh[feh < 0].mean(), teff[feh < 0].max())
    assert [line.split()[:2] for line in lines[1:3]] == [[r, str(expected[r][0])] for r in ("DR1", "DR2")]
    out = tmp_path / "groups.csv"
    assert main([*selection, "--aggregate", "count,mean(feh),max(teff)", "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert frame["release"].tolist() == ["DR1", "DR2"]
    for row in frame.itertuples():
        assert (row.count, row.mean_feh, row.max_teff) == pytest.approx(expected[row.release], rel=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--aggregate", "mean(spectrum_id)"], "mean needs a numeric column"),
        (["--aggregate", "avg(feh)"], "unknown aggregate function 'avg'"),
        (["--group-by", "teff_members"], "it is a list column"),
        (["--where", "fe_h < 1"], "did you mean feh"),
        (["--columns", "spectrum_id,tef"], "did you mean teff"),
        (["--release", "DR7"], "unknown release"),
        (["--cone", "10", "95", "1"], "dec must be within"),
        (["--out", "x.txt"], ".parquet, .csv or .fits"),
    ],
)
def test_bad_queries_are_usage_errors(catalogue, capsys, args, message):
    root, _ = catalogue
    assert main(["query", root, *args]) == 2
    assert message in capsys.readouterr().err


def test_not_a_catalogue_is_a_job_error(tmp_path, capsys):
    assert main(["query", str(tmp_path)]) == 1
    assert "not a speclabel catalogue" in capsys.readouterr().err


def test_a_missing_catalogue_says_it_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "labels"
    assert main(["query", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"catalogue {missing} does not exist" in err and "not a speclabel catalogue" not in err
    assert main(["stats", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_stats_counts_and_percentiles(catalogue, capsys):
    root, given = catalogue
    assert main(["stats", root, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["releases"]
    assert stats["DR1"]["rows"] == 800 and stats["DR2"]["rows"] == 300
    assert stats["DR1"]["rows_per_model"] == {"m1": 800}
    feh = given["DR1"].column("feh").to_numpy()
    for p in (16, 50, 84):
        assert stats["DR1"]["labels"]["feh"][f"p{p}"] == pytest.approx(np.percentile(feh, p), abs=0.02)
    assert stats["DR1"]["labels"]["teff"]["max"] == pytest.approx(
        float(given["DR1"].column("teff").to_numpy().max())
    )
    flags = given["DR1"].column("flags").to_numpy()
    assert stats["DR1"]["flags"]["low_snr"] == int(((flags & 2) != 0).sum()) > 0
    assert main(["stats", root, "--release", "DR2"]) == 0
    text = capsys.readouterr().out
    assert "DR2" in text and "DR1" not in text and "p50" in text
