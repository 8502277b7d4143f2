"""Serve a label catalogue over Arrow Flight, so a team can query it from notebooks without copying files.

Example:
  openssl rand -hex 32 > ~/.speclabel-token && chmod 600 ~/.speclabel-token
  speclabel serve labels/ --port 8815 --token-file ~/.speclabel-token

and in Python:
  from speclabel.pipeline.catalogue.flight import connect
  client = connect("grpc://HOST:8815", token_file="~/.speclabel-token")
  table = client.query("feh < -1", columns=["spectrum_id", "feh", "mgfe"], cone=(83.8, -5.4, 2))
  table = client.sql("SELECT release, count(*) AS n, avg(feh) FROM labels GROUP BY release")

A token is required (clients send it as `authorization: Bearer TOKEN`) unless --insecure-localhost,
which serves 127.0.0.1 only. Without TLS (--tls-cert/--tls-key) the token crosses the network in
clear text: use TLS, or an SSH tunnel to a --insecure-localhost server, beyond a trusted network.
Each query is validated before it runs and is bounded in rows and time (SQL also in memory, and
sandboxed: read-only, no file or network access); a bad query fails alone and the server keeps
serving. --port 0 picks a free port; the address is printed. Stop with Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import argparse

from ._types import non_negative_int, positive_float, positive_int

HELP = "serve a label catalogue over Arrow Flight (token-protected queries from notebooks)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("catalogue", metavar="CATALOGUE", help="catalogue folder or URI (s3://, gs://)")
    parser.add_argument(
        "--port", type=non_negative_int, required=True, help="port (0 = any free port, printed)"
    )
    parser.add_argument(
        "--host", help="address to bind (default 0.0.0.0; 127.0.0.1 with --insecure-localhost)"
    )
    parser.add_argument("--token-file", metavar="FILE", help="file holding the token clients must send")
    parser.add_argument(
        "--insecure-localhost", action="store_true", help="serve without a token, bound to 127.0.0.1 only"
    )
    parser.add_argument(
        "--max-rows", type=positive_int, default=1_000_000, help="rows per query (default 1000000)"
    )
    parser.add_argument(
        "--max-seconds", type=positive_float, default=120.0, help="seconds per query (default 120)"
    )
    parser.add_argument(
        "--max-memory", default="2GB", metavar="SIZE", help="memory per SQL query, e.g. 4GB (default 2GB)"
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", metavar="PEM", help="TLS private key (with --tls-cert)")


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from speclabel.core.errors import UsageError
    from speclabel.pipeline.catalogue.flight import ServiceLimits, read_token, serve

    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert:
        with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
            tls = [(cert.read(), key.read())]
    server = serve(
        args.catalogue,
        port=args.port,
        host=args.host,
        token=read_token(args.token_file) if args.token_file else None,
        insecure_localhost=args.insecure_localhost,
        limits=ServiceLimits(
            max_rows=args.max_rows, max_seconds=args.max_seconds, max_memory=args.max_memory
        ),
        tls_certificates=tls,
    )
    # Flight's serve() returns on SIGINT by itself; schedulers and containers stop with SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"serve: {args.catalogue} at {server.url}", flush=True)
    server.serve()
    print("serve: stopped", flush=True)
    return 0
