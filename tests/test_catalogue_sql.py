"""SQL over a catalogue: the views hold exactly the selected runs, and the sandbox holds against escapes."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from catalogue_data import LAYOUT, OPTIONS, add_side_tables, build_catalogue, label_rows

from speclabel.pipeline.catalogue import Catalogue, QueryError, write_release
from speclabel.pipeline.catalogue.sql import CatalogueSql, SqlLimitError, SqlLimits, SqlTimeoutError
from speclabel.pipeline.publish import Dataset


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """DR1 by m1 then relabelled by m2 (m1's files superseded), DR2 by m1 with quarantine and
    saliency maps; a stray file in the live folder and one in staging that no view may show."""
    root = tmp_path_factory.mktemp("sql") / "cat"
    given = build_catalogue(root, {"DR1": 900, "DR2": 400}, model_id="m1")
    relabelled = label_rows("DR1", 900, seed=7, model_id="m2")
    write_release(str(root), "DR1", [relabelled], model_id="m2", layout=LAYOUT, options=OPTIONS)
    cat = Catalogue.open(str(root))
    dr2_run = cat.index()["releases"]["DR2"]["run_id"]
    add_side_tables(root, "DR2", dr2_run, given["DR2"].column("spectrum_id").slice(0, 50))
    stray = label_rows("DR1", 30, seed=9, start=10_000)
    (root / "_staging" / "crashed").mkdir(parents=True)
    pq.write_table(stray, root / "_staging" / "crashed" / "part-x-0.parquet")
    pq.write_table(stray, root / "release=DR1" / "sky=-1" / "part-stray-0.parquet")
    return cat, {"DR1": relabelled, "DR1-m1": given["DR1"], "DR2": given["DR2"]}


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()


def test_labels_view_is_the_live_rows_of_each_release(catalogue):
    cat, given = catalogue
    result = cat.sql("SELECT spectrum_id, release, feh FROM labels WHERE feh < -0.3 AND release = 'DR1'")
    t = given["DR1"]
    with np.errstate(invalid="ignore"):
        expected = set(np.array(t.column("spectrum_id").to_pylist())[_column(t, "feh") < -0.3])
    assert len(expected) > 50 and set(result.column("spectrum_id").to_pylist()) == expected
    # The same rows as the Arrow reader, the stray and staged files nowhere.
    counts = cat.sql("SELECT release, count(*) AS n, avg(feh) AS mean FROM labels GROUP BY release")
    counts = {r["release"]: r for r in counts.to_pylist()}
    assert {r: counts[r]["n"] for r in counts} == {"DR1": 900, "DR2": 400}
    assert counts["DR2"]["mean"] == pytest.approx(np.nanmean(_column(given["DR2"], "feh")), rel=1e-12)
    assert (
        cat.sql("SELECT count(*) AS n FROM labels WHERE spectrum_id LIKE 'DR1-00001____'")["n"][0].as_py()
        == 0
    )


def test_partition_columns_and_model_choice_follow_the_query_rules(catalogue):
    cat, given = catalogue
    schema = cat.sql("SELECT * FROM labels LIMIT 1").schema
    assert schema.field("release").type == pa.string() and schema.field("sky").type == pa.int32()
    old = cat.sql("SELECT spectrum_id, feh FROM labels", releases=["DR1"], model_id="m1")
    reader = cat.query(columns=["spectrum_id", "feh"], releases=["DR1"], model_id="m1")
    assert old.sort_by("spectrum_id").equals(reader.sort_by("spectrum_id"))
    m1 = given["DR1-m1"]
    assert sorted(old.column("spectrum_id").to_pylist()) == sorted(m1.column("spectrum_id").to_pylist())
    assert not np.allclose(
        np.sort(_column(old, "feh")), np.sort(_column(given["DR1"], "feh")), equal_nan=True
    )
    assert set(cat.sql("SELECT DISTINCT release FROM labels", releases=["DR2"])["release"].to_pylist()) == {
        "DR2"
    }
    with pytest.raises(QueryError, match="unknown release"):
        cat.sql("SELECT 1", releases=["DR9"])


def test_quarantine_and_saliency_views(catalogue):
    cat, given = catalogue
    quarantine = cat.sql("SELECT spectrum_id, reason, release, run_id FROM quarantine ORDER BY 1")
    dr2_run = cat.index()["releases"]["DR2"]["run_id"]
    assert quarantine.to_pylist() == [
        {"spectrum_id": "DR2-bad-1", "reason": "nonfinite_flux", "release": "DR2", "run_id": dr2_run},
        {"spectrum_id": "DR2-bad-2", "reason": "wrong_length", "release": "DR2", "run_id": dr2_run},
    ]
    joined = cat.sql(
        "SELECT l.spectrum_id, s.saliency_feh FROM labels l JOIN saliency s USING (spectrum_id, release)"
    )
    ids = given["DR2"].column("spectrum_id").to_pylist()
    assert joined.num_rows == 50
    for sid, sal in zip(joined["spectrum_id"].to_pylist(), joined["saliency_feh"].to_pylist(), strict=True):
        assert sal == [float(ids.index(sid))] * 4
    # DR1 stored neither: an empty quarantine, and no saliency view with a message that says so.
    assert cat.sql("SELECT count(*) AS n FROM quarantine", releases=["DR1"])["n"][0].as_py() == 0
    with pytest.raises(QueryError, match="views here: labels, quarantine"):
        cat.sql("SELECT * FROM saliency", releases=["DR1"])


ESCAPES = [
    ("SELECT * FROM read_parquet('/etc/passwd')", "not allowed"),
    ("SELECT * FROM read_csv('/etc/passwd')", "not allowed"),
    ("SELECT * FROM read_text('/etc/hostname')", "not allowed"),
    ("SELECT * FROM glob('/etc/*')", "not allowed"),
    ("SELECT * FROM read_parquet('{root}/_staging/crashed/part-x-0.parquet')", "not allowed"),
    ("SELECT * FROM read_parquet('{root}/release=DR1/sky=-1/part-stray-0.parquet')", "not allowed"),
    ("SELECT * FROM read_parquet('{root}/_versions/**/*.parquet')", "not allowed"),
    ("SELECT * FROM 'https://example.org/x.parquet'", "not allowed|SQL:"),
    ("COPY (SELECT * FROM labels) TO '{out}'", "only SELECT"),
    ("COPY (SELECT 1 AS a) TO '{live}' (FORMAT parquet, USE_TMP_FILE false)", "only SELECT"),
    ("EXPORT DATABASE '{outdir}'", "only SELECT"),
    ("ATTACH '{out}.db' AS x", "only SELECT"),
    ("INSTALL httpfs", "only SELECT"),
    ("LOAD httpfs", "only SELECT"),
    ("SET enable_external_access = true", "only SELECT"),
    ("SET memory_limit = '100GB'", "only SELECT"),
    ("RESET lock_configuration", "only SELECT"),
    ("PRAGMA enable_profiling", "only SELECT"),
    ("CREATE TABLE t AS SELECT * FROM labels", "only SELECT"),
    ("DROP VIEW labels", "only SELECT"),
    ("SELECT 1; COPY (SELECT 1) TO '{out}'", "one SQL statement"),
    ("SELECT * FROM secret_table", "does not exist"),  # a Python variable: no replacement scans
]


@pytest.mark.parametrize(("text", "error"), ESCAPES)
def test_sandbox_refuses_escapes_and_keeps_answering(catalogue, tmp_path, text, error):
    cat, _ = catalogue
    root = cat.dataset.root
    live = cat.runs(["DR2"])[0].files[0]
    size = os.path.getsize(live)
    secret_table = pa.table({"token": ["hunter2"]})  # noqa: F841 (what a replacement scan would find)
    out = tmp_path / "out.csv"
    with CatalogueSql(cat) as db:
        with pytest.raises(QueryError, match=error):
            db.table(text.format(root=root, out=out, outdir=tmp_path / "export", live=live))
        assert db.table("SELECT count(*) AS n FROM labels")["n"][0].as_py() == 1300
    assert not out.exists() and not (tmp_path / "export").exists() and os.path.getsize(live) == size


def test_memory_time_and_row_bounds_stop_a_query_alone(catalogue):
    cat, _ = catalogue
    limits = SqlLimits(max_rows=100, max_seconds=1.0, memory="64MB", threads=1)
    with CatalogueSql(cat, limits=limits) as db:
        with pytest.raises(SqlLimitError, match="more memory than the bound of 64MB"):
            db.table("SELECT list(a.input_sha256 || b.input_sha256) FROM labels a, labels b")
        with pytest.raises(SqlTimeoutError, match="ran past the bound of 1 s"):
            db.table("SELECT sum(hash(a.i + b.j)) FROM range(1000000000) a(i), range(1000000) b(j)")
        with pytest.raises(SqlLimitError, match="exceeds the bound of 100 rows"):
            db.table("SELECT spectrum_id FROM labels")
        assert db.table("SELECT spectrum_id FROM labels LIMIT 100").num_rows == 100
        assert db.table("SELECT current_setting('memory_limit') AS m")["m"][0].as_py().startswith("61")


def test_schema_without_rows_and_user_errors(catalogue):
    cat, _ = catalogue
    with CatalogueSql(cat) as db:
        schema = db.schema("SELECT spectrum_id, feh * 2 AS twice, processed_at FROM labels")
        assert schema.names == ["spectrum_id", "twice", "processed_at"]
        assert schema.field("processed_at").type == pa.timestamp("us", tz="UTC")
        with pytest.raises(QueryError, match="fe_h"):
            db.table("SELECT fe_h FROM labels")
        with pytest.raises(QueryError, match="syntax error"):
            db.table("SELEC 1")
        with pytest.raises(QueryError, match="empty"):
            db.table("  ")


def test_reads_through_a_non_local_filesystem(catalogue):
    # A SubTreeFileSystem is not a LocalFileSystem: the Arrow-dataset path of s3:// or gs:// catalogues.
    cat, _ = catalogue
    root = cat.dataset.root
    remote = Catalogue.open(
        Dataset(root, pafs.SubTreeFileSystem(os.path.dirname(root), pafs.LocalFileSystem()), "cat")
    )
    text = "SELECT l.spectrum_id, l.release, l.sky, l.feh FROM labels l WHERE feh < 0 ORDER BY 1"
    assert remote.sql(text).equals(cat.sql(text))
    side = "SELECT count(*) AS n FROM quarantine JOIN saliency USING (release)"
    assert remote.sql(side).equals(cat.sql(side))
    with CatalogueSql(remote) as db, pytest.raises(QueryError, match="not allowed"):
        db.table(f"SELECT * FROM read_parquet('{root}/_staging/crashed/part-x-0.parquet')")
