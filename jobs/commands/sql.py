"""Run one SQL SELECT over a label catalogue (DuckDB) or a catalogue server; print or write the rows.

Examples:
  speclabel sql labels/ "SELECT release, count(*) AS n, avg(feh) FROM labels GROUP BY release"
  speclabel sql labels/ "SELECT * FROM labels WHERE feh < -2 ORDER BY snr DESC" --out poor.fits
  speclabel sql labels/ "SELECT reason, count(*) FROM quarantine GROUP BY reason" --release DR6
  speclabel sql grpc://HOST:8815 "SELECT ..." --token-file ~/.speclabel-token

Views: labels (the catalogue rows with release and sky), quarantine (the rows the runs refused:
spectrum_id, reason, detail, source, release, run_id) and, where runs stored full saliency maps,
saliency. They hold exactly the runs `speclabel query` reads: the live run of each release, or
with --model-id the latest published run of that model; --release keeps only those releases.
The SQL is DuckDB's, sandboxed: one SELECT, read-only, no access to other files or the network, and
bounded by --max-seconds and --max-memory (a server applies its own bounds, and a row bound).
Without --out the first 20 rows are printed; --out writes .parquet, .csv or .fits.
"""

from __future__ import annotations

import argparse

from ._types import positive_float
from .query import PRINT_ROWS, add_query_arguments

HELP = "run an SQL SELECT over a label catalogue or a catalogue server (DuckDB, sandboxed)"
SERVER_SCHEMES = ("grpc://", "grpc+tls://")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_query_arguments(parser, "catalogue folder or URI, or a server grpc://HOST:PORT")
    parser.add_argument("sql", metavar="SQL", help='one SELECT, e.g. "SELECT count(*) FROM labels"')
    parser.add_argument("--out", metavar="FILE", help="write the rows to FILE.parquet, .csv or .fits")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--max-seconds", type=positive_float, metavar="S", help="stop the query after S seconds (local)"
    )
    parser.add_argument("--max-memory", metavar="SIZE", help="memory bound of the query, e.g. 4GB (local)")
    server = parser.add_argument_group("against a server (speclabel serve)")
    server.add_argument("--token-file", metavar="FILE", help="file holding the server's token")
    server.add_argument("--tls-root-certs", metavar="PEM", help="CA certificates for grpc+tls://")


def run(args: argparse.Namespace) -> int:
    from speclabel.core.errors import UsageError
    from speclabel.pipeline.catalogue.export import format_table, output_format, write_table

    if args.out:
        output_format(args.out)  # a bad suffix is a usage error before any work
    remote = args.catalogue.startswith(SERVER_SCHEMES)
    if remote and (args.max_seconds or args.max_memory):
        raise UsageError("--max-seconds and --max-memory bound local queries; a server has its own bounds")
    if not remote and (args.token_file or args.tls_root_certs):
        raise UsageError("--token-file and --tls-root-certs are for a server (grpc://HOST:PORT)")
    releases = tuple(args.releases) if args.releases else None
    if remote:
        table = _remote(args, releases)
        shown, more = (
            (table, False) if args.out else (table.slice(0, PRINT_ROWS), table.num_rows > PRINT_ROWS)
        )
    else:
        table, shown, more = _local(args, releases)
    if args.out:
        fmt = write_table(table, args.out, overwrite=args.overwrite)
        print(f"sql: wrote {table.num_rows} rows, {table.num_columns} columns to {args.out} ({fmt})")
        return 0
    print(format_table(shown, more=more))
    return 0


def _local(args, releases):
    """(all rows or None, rows to print, whether more rows follow): printing reads 21 rows at most."""
    import pyarrow as pa

    from speclabel.pipeline.catalogue import Catalogue
    from speclabel.pipeline.catalogue.sql import CatalogueSql, SqlLimits

    limits = SqlLimits(max_seconds=args.max_seconds, memory=args.max_memory)
    with CatalogueSql(
        Catalogue.open(args.catalogue), releases=releases, model_id=args.model_id, limits=limits
    ) as db:
        if args.out:
            table = db.table(args.sql)
            return table, table, False
        schema, batches = db.stream(args.sql, batch_rows=PRINT_ROWS + 1)
        read = []
        try:
            for batch in batches:
                read.append(batch)
                if sum(b.num_rows for b in read) > PRINT_ROWS:
                    break
        finally:
            batches.close()  # stops the query: the rest is never computed
    shown = pa.Table.from_batches(read, schema=schema)
    return None, shown.slice(0, PRINT_ROWS), shown.num_rows > PRINT_ROWS


def _remote(args, releases):
    import pyarrow as pa
    import pyarrow.flight as flight

    from speclabel.core.errors import ConfigError, InputError
    from speclabel.pipeline.catalogue import QueryError
    from speclabel.pipeline.catalogue.flight import connect
    from speclabel.pipeline.catalogue.sql import SqlLimitError

    tls = None
    if args.tls_root_certs:
        with open(args.tls_root_certs, "rb") as fh:
            tls = fh.read()
    # The server's answers as this command's errors and exit codes (a refused query is a usage error).
    try:
        with connect(args.catalogue, token_file=args.token_file, tls_root_certs=tls) as client:
            return client.sql(args.sql, releases=releases, model_id=args.model_id)
    except flight.FlightUnauthenticatedError as exc:
        raise ConfigError(f"{args.catalogue} refused the token: {_server_message(exc)}") from None
    except flight.FlightUnavailableError as exc:
        raise InputError(f"cannot reach {args.catalogue}: {_server_message(exc)}") from None
    except (flight.FlightTimedOutError, flight.FlightServerError) as exc:
        raise SqlLimitError(_server_message(exc)) from None
    except pa.ArrowInvalid as exc:
        raise QueryError(_server_message(exc).removeprefix("invalid query: ")) from None


def _server_message(exc: Exception) -> str:
    """The server's message without gRPC's detail lines."""
    return str(exc).split(". Detail:", 1)[0].strip()
