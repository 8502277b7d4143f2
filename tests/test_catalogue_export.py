"""pipeline.catalogue.export: a query result as Parquet, CSV and FITS, read back by other readers."""

import csv
import datetime as dt
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from catalogue_data import build_catalogue

from speclabel.core.errors import UsageError
from speclabel.pipeline.catalogue import Catalogue
from speclabel.pipeline.catalogue import export as E

# astropy warns that dex is no FITS-standard unit string; TOPCAT reads it, which is what it is for.
pytestmark = pytest.mark.filterwarnings("ignore:'dex' did not parse as fits unit")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """Every column of 120 catalogue rows, 3 of them without a position (null ra, dec, healpix)."""
    root = tmp_path_factory.mktemp("export") / "cat"
    build_catalogue(root, {"DR1": 120})
    table = Catalogue.open(str(root)).query()
    assert table.column("healpix").null_count == table.column("ra").null_count > 0
    return table


def test_parquet_output_is_the_table(result, tmp_path):
    path = str(tmp_path / "rows.parquet")
    assert E.write_table(result, path) == "parquet"
    back = pq.read_table(path)
    assert back.schema.remove_metadata() == result.schema.remove_metadata()
    assert back.equals(result)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_csv_output_reads_back_with_the_csv_module(result, tmp_path):
    path = str(tmp_path / "rows.csv")
    assert E.write_table(result, path) == "csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == result.column_names and len(rows) == result.num_rows
    expected = result.to_pylist()
    for got, want in zip(rows, expected, strict=True):
        assert got["spectrum_id"] == want["spectrum_id"] and got["release"] == want["release"]
        assert np.float32(got["feh"]) == np.float32(want["feh"])
        assert int(got["flags"]) == want["flags"]
        # Null positions are empty fields; per-member labels are bracketed lists of exact float32 values.
        if want["ra"] is None:
            assert got["ra"] == got["dec"] == got["healpix"] == ""
        else:
            assert float(got["ra"]) == want["ra"] and int(got["healpix"]) == want["healpix"]
        assert json.loads(got["teff_members"]) == want["teff_members"]
        assert dt.datetime.fromisoformat(got["processed_at"]) == want["processed_at"]


def test_fits_output_has_values_units_and_fits_nulls(result, tmp_path):
    path = str(tmp_path / "rows.fits")
    assert E.write_table(result, path) == "fits"
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "LABELS"]
        header, data = hdul["LABELS"].header, hdul["LABELS"].data
        assert header["ORIGIN"] == "speclabel" and len(data) == result.num_rows
        columns = [header[f"TTYPE{i}"] for i in range(1, header["TFIELDS"] + 1)]
        assert columns == result.column_names
        units = {header[f"TTYPE{i}"]: header.get(f"TUNIT{i}") for i in range(1, len(columns) + 1)}
        assert units == {name: E.column_unit(name) for name in columns}
        assert (
            units["teff"] == "K"
            and units["mgfe_members"] == "dex"
            and units["sal_feh_peak_wave"] == "Angstrom"
        )
        ra = result.column("ra").to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(data["ra"], ra)  # nulls are NaN
        assert np.isnan(data["ra"]).sum() == result.column("ra").null_count
        np.testing.assert_array_equal(data["teff"], result.column("teff").to_numpy())
        assert data["teff"].dtype == np.dtype(">f4") and data["ra"].dtype == np.dtype(">f8")
        np.testing.assert_array_equal(
            data["teff_members"], np.array(result.column("teff_members").to_pylist())
        )
        assert list(data["spectrum_id"]) == result.column("spectrum_id").to_pylist()
        # Null integers get a TNULL value that no real row has.
        k = columns.index("healpix") + 1
        healpix = result.column("healpix")
        null_value = header[f"TNULL{k}"]
        raw = np.asarray(data["healpix"])
        assert (raw == null_value).sum() == healpix.null_count
        valid = ~healpix.is_null().to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(raw[valid], healpix.drop_null().to_numpy())
        # Timestamps as ISO 8601 text in UTC, to the microsecond.
        stamps = [dt.datetime.fromisoformat(s).replace(tzinfo=dt.UTC) for s in data["processed_at"]]
        assert stamps == result.column("processed_at").to_pylist()


def test_fits_pads_ragged_lists_and_blanks_null_strings():
    table = pa.table(
        {
            "spectrum_id": ["a", "b", "c"],
            "object": pa.array(["NGC 2516", None, "M67"]),
            "feh_members": pa.array([[0.1, 0.2, 0.3], None, [0.5]], pa.list_(pa.float32())),
            "flags": pa.array([1, None, 4], pa.int32()),
        }
    )
    with fits.open(pa.BufferReader(E.fits_bytes(table))) as hdul:
        data = hdul["LABELS"].data
        assert list(data["object"]) == ["NGC 2516", "", "M67"]
        members = np.asarray(data["feh_members"])
        assert members.shape == (3, 3) and members.dtype == np.dtype(">f4")
        np.testing.assert_array_equal(members[0], np.float32([0.1, 0.2, 0.3]))
        assert (
            np.isnan(members[1]).all() and members[2, 0] == np.float32(0.5) and np.isnan(members[2, 1:]).all()
        )
        assert hdul["LABELS"].header["TUNIT3"] == "dex"
    from astropy.table import Table

    back = Table.read(pa.BufferReader(E.fits_bytes(table)), hdu="LABELS")
    assert back["flags"].mask.tolist() == [False, True, False] and back["flags"][2] == 4


def test_fits_round_trips_boolean_columns_with_nulls(tmp_path):
    # e.g. `speclabel sql labels/ "SELECT spectrum_id, feh < -1 AS poor FROM labels" --out x.fits`
    from astropy.table import Table

    table = pa.table(
        {
            "spectrum_id": ["a", "b", "c", "d"],
            "poor": pa.array([True, None, False, True]),
            "seen": pa.array([True, False, False, True]),
        }
    )
    out = tmp_path / "poor.fits"
    E.write_table(table, str(out))
    back = Table.read(out, hdu="LABELS")
    assert back["poor"].mask.tolist() == [False, True, False, False]
    assert back["poor"].filled(-1).tolist() == [1, -1, 0, 1]
    assert back["seen"].dtype == np.bool_ and back["seen"].tolist() == [True, False, False, True]
    with fits.open(out) as hdul:
        assert hdul["LABELS"].columns["seen"].format == "L"  # a FITS logical where no value is null


def test_existing_outputs_are_kept_unless_overwrite(result, tmp_path):
    path = str(tmp_path / "rows.parquet")
    E.write_table(result.slice(0, 5), path)
    with pytest.raises(UsageError, match="exists; choose another name or pass --overwrite"):
        E.write_table(result, path)
    assert pq.read_table(path).num_rows == 5
    E.write_table(result.slice(0, 7), path, overwrite=True)
    assert pq.read_table(path).num_rows == 7
    # A URI names the same file.
    with pytest.raises(UsageError, match="exists"):
        E.write_table(result, f"file://{path}")


def test_a_failed_write_leaves_no_file(result, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(E.pacsv, "write_csv", broken)
    with pytest.raises(OSError, match="no space"):
        E.write_table(result, str(tmp_path / "rows.csv"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.parquet", "parquet"),
        ("A.PQ", "parquet"),
        ("s3://b/x.csv", "csv"),
        ("x.FITS", "fits"),
        ("x.fit", "fits"),
    ],
)
def test_output_format_from_the_suffix(name, fmt):
    assert E.output_format(name) == fmt


def test_unknown_suffix_is_a_usage_error(result, tmp_path):
    with pytest.raises(UsageError, match=r"name it \.parquet, \.csv or \.fits"):
        E.write_table(result, str(tmp_path / "rows.txt"))
    assert os.listdir(tmp_path) == []


def test_units_of_catalogue_columns():
    assert [E.column_unit(c) for c in ("teff", "teff_std", "logg", "alfe_members")] == [
        "K",
        "K",
        "dex",
        "dex",
    ]
    assert E.column_unit("ra") == E.column_unit("dec") == E.column_unit("cone_distance") == "deg"
    assert E.column_unit("sal_mgfe_peak_wave") == "Angstrom"
    assert [E.column_unit(c) for c in ("snr", "sal_mgfe_mg_i", "flags", "spectrum_id")] == [None] * 4


def test_terminal_table_says_what_it_shows(result):
    small = result.select(["spectrum_id", "feh"]).slice(0, 3)
    text = E.format_table(small, total=result.num_rows)
    lines = text.splitlines()
    assert lines[0].split() == ["spectrum_id", "feh"] and len(lines) == 5
    assert lines[-1] == f"(3 rows of {result.num_rows} (use --limit N or --out FILE for more))"
    feh = small.column("feh").to_pylist()[0]
    assert lines[1].split()[1] == f"{feh:.6g}"
    assert E.format_table(small.slice(0, 1)).splitlines()[-1] == "(1 row)"
    assert E.format_table(small.slice(0, 0)) == "(no rows)\n(0 rows)"
