"""`speclabel sql`: printed and written results, refused statements, and the same command against a server."""

import os

import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.table import Table
from catalogue_data import build_catalogue

from speclabel.jobs.cli import main
from speclabel.pipeline.catalogue import Catalogue
from speclabel.pipeline.catalogue.flight import serve

TOKEN = "fedcba9876543210fedcba9876543210"
METAL_POOR = (
    "SELECT spectrum_id, release, feh, teff_members FROM labels WHERE feh < -0.5 ORDER BY spectrum_id"
)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqlcli") / "cat"
    given = build_catalogue(root, {"DR1": 600, "DR2": 200})
    return str(root), given


def test_prints_the_first_rows_and_says_more_follow(catalogue, capsys):
    root, _ = catalogue
    assert main(["sql", root, "SELECT release, count(*) AS n FROM labels GROUP BY 1 ORDER BY 1"]) == 0
    out = capsys.readouterr().out
    assert "DR1 600" in " ".join(out.split()) and "DR2 200" in " ".join(out.split()) and "(2 rows)" in out
    assert main(["sql", root, "SELECT spectrum_id FROM labels"]) == 0
    out = capsys.readouterr().out
    assert "(20 rows; more follow" in out and len(out.strip().splitlines()) == 22


@pytest.mark.filterwarnings("ignore:'dex' did not parse as fits unit")
def test_writes_parquet_csv_and_fits_like_query(catalogue, tmp_path):
    root, _ = catalogue
    expected = Catalogue.open(root).sql(METAL_POOR)
    assert expected.num_rows > 20
    for name in ("poor.parquet", "poor.csv", "poor.fits"):
        assert main(["sql", root, METAL_POOR, "--out", str(tmp_path / name)]) == 0
    assert pq.read_table(tmp_path / "poor.parquet").equals(expected)
    csv = pd.read_csv(tmp_path / "poor.csv")
    assert csv["spectrum_id"].tolist() == expected["spectrum_id"].to_pylist()
    fits = Table.read(tmp_path / "poor.fits", hdu="LABELS")
    assert list(fits["spectrum_id"]) == expected["spectrum_id"].to_pylist()
    assert fits["feh"].unit == "dex" or str(fits["feh"].unit) == "dex"
    assert main(["sql", root, METAL_POOR, "--out", str(tmp_path / "poor.csv")]) == 2  # exists


def test_refused_statements_and_bad_sql_exit_2(catalogue, tmp_path, capsys):
    root, _ = catalogue
    target = tmp_path / "copy.csv"
    assert main(["sql", root, f"COPY (SELECT * FROM labels) TO '{target}'"]) == 2
    assert "only SELECT queries are allowed" in capsys.readouterr().err and not target.exists()
    assert main(["sql", root, "SELECT * FROM read_parquet('/etc/passwd')"]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert main(["sql", root, "SELECT nope FROM labels"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["sql", root, "SELECT 1", "--out", "x.txt"]) == 2
    assert main(["sql", root, "SELECT 1", "--token-file", "t"]) == 2


def test_local_bounds(catalogue, capsys):
    root, _ = catalogue
    endless = "SELECT sum(hash(a.i + b.j)) FROM range(1000000000) a(i), range(1000000) b(j)"
    assert main(["sql", root, endless, "--max-seconds", "0.5"]) == 1
    assert "ran past the bound of 0.5 s" in capsys.readouterr().err


def test_same_command_against_a_server(catalogue, tmp_path, capsys):
    root, _ = catalogue
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    server = serve(root, port=0, host="127.0.0.1", token=TOKEN)
    try:
        url = server.url
        out = tmp_path / "remote.parquet"
        args = ["sql", url, METAL_POOR, "--release", "DR1", "--token-file", str(token_file)]
        assert main([*args, "--out", str(out)]) == 0
        expected = Catalogue.open(root).sql(METAL_POOR, releases=["DR1"])
        assert pq.read_table(out).equals(expected) and expected.num_rows > 20
        capsys.readouterr()
        assert main(args) == 0
        assert "(20 rows; more follow" in capsys.readouterr().out
        assert main(["sql", url, "SET threads = 64", "--token-file", str(token_file)]) == 2
        assert "only SELECT" in capsys.readouterr().err
        assert main(["sql", url, "SELECT 1"]) == 1  # no token
        assert "needs a token" in capsys.readouterr().err
        assert main(["sql", url, "SELECT 1", "--max-seconds", "5", "--token-file", str(token_file)]) == 2
    finally:
        server.shutdown()
