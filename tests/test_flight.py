"""The Arrow Flight service: answers queries, refuses bad tokens, survives bad queries, bounds results."""

import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from catalogue_data import build_catalogue

from speclabel.core.errors import UsageError
from speclabel.pipeline.catalogue import Catalogue
from speclabel.pipeline.catalogue.flight import ServiceLimits, connect, serve

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("flight") / "cat"
    build_catalogue(root, {"DR1": 900, "DR2": 300})
    return str(root)


@pytest.fixture(scope="module")
def server(catalogue):
    server = serve(catalogue, port=0, host="127.0.0.1", token=TOKEN, limits=ServiceLimits(max_rows=500))
    yield server
    server.shutdown()


def test_answers_the_same_query_as_the_library(server, catalogue):
    kwargs = {"columns": ["spectrum_id", "feh", "release"], "cone": (40.0, -30.0, 30.0)}
    with connect(server.url, TOKEN) as client:
        remote = client.query("feh < 0", **kwargs).sort_by("spectrum_id")
        schema = client.schema()
    local = Catalogue.open(catalogue).query("feh < 0", **kwargs).sort_by("spectrum_id")
    assert len(local) > 0 and remote.equals(local)
    assert {"spectrum_id", "feh", "release", "sky", "healpix"} <= set(schema.names)


def test_aggregates_on_the_server_as_the_library(server, catalogue):
    kwargs = {"group_by": ["release"], "where": "feh < 0", "cone": (40.0, -30.0, 30.0)}
    with connect(server.url, TOKEN) as client:
        remote = client.aggregate(["count", "mean(feh)"], **kwargs)
        with pytest.raises(pa.ArrowInvalid, match="mean needs a numeric column"):
            client.aggregate(["mean(spectrum_id)"])
    local = Catalogue.open(catalogue).aggregate(["count", "mean(feh)"], **kwargs)
    assert remote.column_names == ["release", "count", "mean_feh"] and remote.equals(local)
    assert sum(remote.column("count").to_pylist()) > 0


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token-wrong-token"])
def test_refuses_a_missing_or_wrong_token(server, token):
    with connect(server.url, token) as client, pytest.raises(flight.FlightUnauthenticatedError):
        client.query(limit=1)


def test_survives_malformed_queries_and_answers_the_next(server):
    with connect(server.url, TOKEN) as client:
        with pytest.raises(pa.ArrowInvalid, match="did you mean feh"):
            client.query("fe_h < 1")
        with pytest.raises(pa.ArrowInvalid, match="unknown release"):
            client.query(releases=["DR9"])
        options = client._options
    raw = flight.FlightClient(server.url)
    for ticket in (b"not json", b'{"where": 5}', b'{"drop": "table"}', b"[1, 2]", b'{"cone": [1, 2]}'):
        with pytest.raises(pa.ArrowInvalid, match="invalid query"):
            raw.do_get(flight.Ticket(ticket), options=options).read_all()
    with connect(server.url, TOKEN) as client:
        assert len(client.query("teff > 0", columns=["spectrum_id"], limit=10)) == 10


def test_bounds_result_size(server):
    with connect(server.url, TOKEN) as client:
        with pytest.raises(flight.FlightServerError, match="bound of 500 rows"):
            client.query()
        with pytest.raises(pa.ArrowInvalid, match="exceeds this server's bound"):
            client.query(limit=501)
        assert len(client.query(releases=["DR2"], columns=["spectrum_id"], limit=300)) == 300


def test_token_is_required_unless_localhost_only(catalogue):
    with pytest.raises(UsageError, match="refusing to serve without a token"):
        serve(catalogue, port=0)
    with pytest.raises(UsageError, match=r"127\.0\.0\.1 only"):
        serve(catalogue, port=0, host="0.0.0.0", insecure_localhost=True)
    local = serve(catalogue, port=0, insecure_localhost=True)
    try:
        assert local.url.startswith("grpc://127.0.0.1:")
        with connect(local.url) as client:
            assert len(client.query(limit=3)) == 3
    finally:
        local.shutdown()


def _serve_command(catalogue, *options: str) -> list[str]:
    """`speclabel serve CATALOGUE --port 0 [options]` in a child interpreter."""
    return [sys.executable, "-m", "speclabel.jobs", "serve", catalogue, "--port", "0", *options]


def test_cli_serves_on_a_free_port_until_terminated(catalogue, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    process = subprocess.Popen(
        _serve_command(catalogue, "--token-file", str(token_file)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("serve: ") and " at grpc://0.0.0.0:" in line, line + process.stderr.read()
        port = int(line.rsplit(":", 1)[1])
        with connect(f"grpc://127.0.0.1:{port}", token_file=str(token_file)) as client:
            assert client.query("release = 'DR2'", columns=["release"]).num_rows == 300
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "stopped" in out


def test_cli_refuses_to_start_without_a_token(catalogue, tmp_path):
    result = subprocess.run(
        _serve_command(catalogue),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--token-file" in result.stderr
    short = tmp_path / "short"
    short.write_text("abc")
    result = subprocess.run(
        _serve_command(catalogue, "--token-file", str(short)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "at least 16" in result.stderr


def test_bounds_query_time_and_keeps_serving(catalogue):
    # A zero-second budget is exceeded by the first batch: the call fails, the server does not.
    slow = serve(catalogue, port=0, insecure_localhost=True, limits=ServiceLimits(max_seconds=0.0))
    try:
        with connect(slow.url) as client:
            with pytest.raises(flight.FlightTimedOutError, match="bound of 0 s"):
                client.query()
            with pytest.raises(flight.FlightTimedOutError):
                client.query(limit=5)
    finally:
        slow.shutdown()


def test_sql_answers_as_the_library(server, catalogue):
    text = (
        "SELECT release, count(*) AS n, avg(feh) AS feh FROM labels WHERE teff > 4500 GROUP BY 1 ORDER BY 1"
    )
    with connect(server.url, TOKEN) as client:
        remote = client.sql(text)
        only = client.sql("SELECT DISTINCT release FROM labels", releases=["DR2"])
        schema = client.sql_schema("SELECT spectrum_id, feh FROM labels")
    assert remote.equals(Catalogue.open(catalogue).sql(text)) and remote.num_rows == 2
    assert only["release"].to_pylist() == ["DR2"]
    assert schema.names == ["spectrum_id", "feh"] and schema.field("feh").type == pa.float32()


def test_sql_escapes_fail_alone_and_the_server_keeps_serving(catalogue, tmp_path):
    limits = ServiceLimits(max_rows=500, max_seconds=1.0, max_memory="64MB", sql_threads=1)
    sandboxed = serve(catalogue, port=0, insecure_localhost=True, limits=limits)
    out = tmp_path / "x.csv"
    refused = [
        "SELECT * FROM read_parquet('/etc/passwd')",
        f"COPY (SELECT * FROM labels) TO '{out}'",
        f"ATTACH '{tmp_path / 'x.db'}'",
        "INSTALL httpfs",
        "SET enable_external_access = true",
        "SELECT 1; SELECT 2",
    ]
    good = "SELECT count(*) AS n FROM labels"
    try:
        with connect(sandboxed.url) as client:
            for text in refused:
                with pytest.raises(pa.ArrowInvalid, match="invalid query"):
                    client.sql(text)
                assert client.sql(good)["n"][0].as_py() == 1200
            with pytest.raises(flight.FlightServerError, match="more memory than the bound of 64MB"):
                client.sql("SELECT list(a.input_sha256 || b.input_sha256) FROM labels a, labels b")
            assert client.sql(good)["n"][0].as_py() == 1200
            with pytest.raises(flight.FlightTimedOutError, match="ran past the bound of 1 s"):
                client.sql("SELECT sum(hash(a.i + b.j)) FROM range(1000000000) a(i), range(1000000) b(j)")
            assert client.sql(good)["n"][0].as_py() == 1200
            with pytest.raises(flight.FlightServerError, match="bound of 500 rows"):
                client.sql("SELECT spectrum_id FROM labels")
            options = client._options
        raw = flight.FlightClient(sandboxed.url)
        for ticket in (b'{"sql": 5}', b'{"sql": "SELECT 1", "drop": 1}', b'{"sql": ""}'):
            with pytest.raises(pa.ArrowInvalid, match="invalid query"):
                raw.do_get(flight.Ticket(ticket), options=options).read_all()
        with connect(sandboxed.url) as client:
            assert client.sql("SELECT spectrum_id FROM labels LIMIT 500").num_rows == 500
    finally:
        sandboxed.shutdown()
    assert not out.exists()
