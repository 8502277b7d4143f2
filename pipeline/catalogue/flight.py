"""Serve a catalogue over Arrow Flight, and the client to query it from a notebook.

The server answers the same queries as :meth:`Catalogue.run` (a :class:`Query`, of rows or of
aggregates, sent as a JSON ticket) and SQL over the catalogue's views (an :class:`SqlRequest`,
``{"sql": ...}``, run in the sandbox of :mod:`.sql`: read-only, no file or network access, bounded
in memory, time and rows) with a stream of Arrow record batches, so a team queries one catalogue
without copying files. Every call must carry ``authorization: Bearer <token>`` (compared in constant
time) unless the server was started without a token, which :func:`serve` allows only on 127.0.0.1. A
query is parsed and validated before any data is read; a result larger than ``max_rows`` or slower
than ``max_seconds`` ends with an error instead of a silently truncated table; a bad query fails
that call only.

    >>> from speclabel.pipeline.catalogue.flight import connect
    >>> client = connect("grpc://labels.example.org:8815", token_file="~/.speclabel-token")
    >>> client.query("feh < -1 and mgfe_std < 0.05", columns=["spectrum_id", "feh"], limit=1000)
    >>> client.sql("SELECT release, count(*), avg(feh) FROM labels GROUP BY release")
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.flight as flight

from speclabel.core.errors import ConfigError, SpeclabelError, UsageError

from .expr import QueryError
from .reader import Catalogue, Query, aggregate_query, build_query
from .sql import CatalogueSql, SqlLimitError, SqlLimits, SqlRequest, SqlTimeoutError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceLimits:
    max_rows: int = 1_000_000  # per query; ask for a limit or narrow the query beyond this
    max_seconds: float = 120.0  # per query, from the ticket to the last batch
    batch_rows: int = 64 * 1024
    max_memory: str = "2GB"  # per SQL query (DuckDB's memory_limit); queries over it fail alone
    sql_threads: int | None = None  # per SQL query; None = DuckDB's default (all cores)

    def sql_limits(self) -> SqlLimits:
        return SqlLimits(
            max_rows=self.max_rows,
            max_seconds=self.max_seconds,
            memory=self.max_memory,
            threads=self.sql_threads,
        )


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace removed); warns if others may read the file."""
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if len(token) < 16:
        raise ConfigError(
            f"the token in {path} is {len(token)} characters long; use at least 16 (`openssl rand -hex 32`)"
        )
    if os.stat(path).st_mode & 0o077:
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    return token


class _BearerTokenFactory(flight.ServerMiddlewareFactory):
    """Refuses every call whose ``authorization`` header is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def start_call(self, info, headers):
        values = headers.get("authorization", [])
        presented = next((v for v in values if isinstance(v, str) and v.startswith("Bearer ")), None)
        if presented is None:
            raise flight.FlightUnauthenticatedError(
                "this catalogue service needs a token (authorization: Bearer ...)"
            )
        if not hmac.compare_digest(presented[len("Bearer ") :].encode(), self._token):
            raise flight.FlightUnauthenticatedError("invalid token")
        return None


class CatalogueFlightServer(flight.FlightServerBase):
    """A Flight server for one catalogue; ``port=0`` picks a free port (see :attr:`port`)."""

    def __init__(
        self,
        catalogue: Catalogue,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        limits: ServiceLimits | None = None,
        tls_certificates: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        scheme = "grpc+tls" if tls_certificates else "grpc"
        middleware = {"auth": _BearerTokenFactory(token)} if token else {}
        super().__init__(
            f"{scheme}://{host}:{port}", middleware=middleware, tls_certificates=tls_certificates
        )
        self.catalogue = catalogue
        self.limits = limits or ServiceLimits()
        self.host = host
        self.scheme = scheme

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def do_get(self, context, ticket):
        started = time.monotonic()
        try:
            query = _parse_ticket(ticket.ticket)
            if isinstance(query, SqlRequest):
                return self._sql_stream(query)
            if query.limit is not None and query.limit > self.limits.max_rows:
                raise QueryError(
                    f"limit {query.limit} exceeds this server's bound of {self.limits.max_rows} rows"
                )
            schema, batches = self.catalogue.stream(query, self.limits.batch_rows)
        except SpeclabelError as exc:
            log.info("refused query: %s", exc)
            raise _flight_error(exc) from None
        log.info("query %s", json.dumps(query.to_dict()))
        return flight.GeneratorStream(schema, self._bounded(batches, query.limit, started))

    def _sql_stream(self, request: SqlRequest) -> flight.GeneratorStream:
        db = CatalogueSql(
            self.catalogue,
            releases=request.releases,
            model_id=request.model_id,
            limits=self.limits.sql_limits(),
        )
        try:
            schema, batches = db.stream(request.sql, self.limits.batch_rows)
        except BaseException:
            db.close()
            raise
        log.info("sql %s", json.dumps(request.to_dict()))
        return flight.GeneratorStream(schema, self._sql_batches(db, batches))

    @staticmethod
    def _sql_batches(db: CatalogueSql, batches):
        try:
            yield from batches
        except SpeclabelError as exc:  # a bound reached mid-stream: this call ends, the server serves on
            raise _flight_error(exc) from None
        finally:
            db.close()

    def _bounded(self, batches, limit: int | None, started: float):
        try:
            yield from self._within_limits(batches, limit, started)
        except SpeclabelError as exc:  # a query error found while reading: this call ends
            raise _flight_error(exc) from None
        finally:
            batches.close()  # stops the query and frees its cursor

    def _within_limits(self, batches, limit: int | None, started: float):
        sent = 0
        for batch in batches:
            if time.monotonic() - started > self.limits.max_seconds:
                raise flight.FlightTimedOutError(
                    f"query ran past this server's bound of {self.limits.max_seconds:g} s; narrow it"
                )
            if limit is not None and sent + batch.num_rows >= limit:
                yield batch.slice(0, limit - sent)
                return
            sent += batch.num_rows
            if sent > self.limits.max_rows:
                raise flight.FlightServerError(
                    f"result exceeds this server's bound of {self.limits.max_rows} rows: "
                    "add a limit or narrow the query"
                )
            yield batch

    def get_schema(self, context, descriptor):
        """The schema of a query's result (descriptor command = query JSON) or of the catalogue."""
        try:
            query = _parse_ticket(descriptor.command) if descriptor.command else Query()
            if isinstance(query, SqlRequest):
                limits = self.limits.sql_limits()
                with CatalogueSql(
                    self.catalogue, releases=query.releases, model_id=query.model_id, limits=limits
                ) as db:
                    schema = db.schema(query.sql)
            else:
                schema = self.catalogue.result_schema(query)
        except SpeclabelError as exc:
            raise _flight_error(exc) from None
        return flight.SchemaResult(schema)

    def list_flights(self, context, criteria):
        schema = self.catalogue.schema()
        descriptor = flight.FlightDescriptor.for_command(b"{}")
        endpoint = flight.FlightEndpoint(b"{}", [])
        yield flight.FlightInfo(schema, descriptor, [endpoint], -1, -1)


def _flight_error(exc: SpeclabelError) -> Exception:
    """The Flight error a client sees: a bound reached (time, rows, memory) or an invalid query."""
    if isinstance(exc, SqlTimeoutError):
        return flight.FlightTimedOutError(str(exc))
    if isinstance(exc, SqlLimitError):
        return flight.FlightServerError(str(exc))
    return pa.ArrowInvalid(f"invalid query: {exc}")


def _parse_ticket(raw: bytes) -> Query | SqlRequest:
    """A JSON ticket: ``{"sql": ...}`` is an SQL request, anything else a :class:`Query`."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QueryError(f"the ticket is not a JSON query: {exc}") from None
    if isinstance(data, dict) and "sql" in data:
        return SqlRequest.from_dict(data)
    return Query.from_dict(data)


def serve(
    location: str,
    *,
    port: int,
    host: str | None = None,
    token: str | None = None,
    insecure_localhost: bool = False,
    limits: ServiceLimits | None = None,
    tls_certificates: list[tuple[bytes, bytes]] | None = None,
) -> CatalogueFlightServer:
    """A started server for the catalogue at ``location`` (call ``.serve()`` to block on it).

    Without a token only ``insecure_localhost`` is allowed, which binds to 127.0.0.1."""
    if token is None and not insecure_localhost:
        raise UsageError(
            "refusing to serve without a token: pass --token-file FILE (e.g. made with `openssl rand "
            "-hex 32 > FILE`), or --insecure-localhost to serve this machine only"
        )
    if insecure_localhost:
        if host not in (None, "127.0.0.1", "localhost"):
            raise UsageError(f"--insecure-localhost binds to 127.0.0.1 only, not {host}")
        host = "127.0.0.1"
    catalogue = Catalogue.open(location)
    return CatalogueFlightServer(
        catalogue,
        host=host or "0.0.0.0",
        port=port,
        token=token,
        limits=limits,
        tls_certificates=tls_certificates,
    )


class CatalogueClient:
    """Query a catalogue served by ``speclabel serve``: results come back as Arrow tables."""

    def __init__(
        self, url: str, token: str | None = None, *, timeout: float | None = None, tls_root_certs=None
    ):
        self._client = flight.FlightClient(url, tls_root_certs=tls_root_certs)
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = flight.FlightCallOptions(headers=headers, timeout=timeout)

    def query(
        self,
        where: str | None = None,
        *,
        columns=None,
        releases=None,
        cone=None,
        model_id: str | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """Same arguments as :meth:`Catalogue.query`."""
        return self._get(build_query(where, columns, releases, cone, model_id, limit))

    def aggregate(
        self,
        aggregates=("count",),
        *,
        group_by=None,
        where: str | None = None,
        releases=None,
        cone=None,
        model_id: str | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """Same arguments as :meth:`Catalogue.aggregate`: the groups, aggregated on the server."""
        return self._get(aggregate_query(aggregates, group_by, where, releases, cone, model_id, limit))

    def sql(self, text: str, *, releases=None, model_id: str | None = None) -> pa.Table:
        """One SQL ``SELECT`` over the served catalogue's views (``labels``, ``quarantine``,
        ``saliency``), as :meth:`Catalogue.sql`."""
        return self._get(SqlRequest(text, tuple(releases) if releases is not None else None, model_id))

    def sql_schema(self, text: str, *, releases=None, model_id: str | None = None) -> pa.Schema:
        """The columns an SQL query would return, without running it."""
        request = SqlRequest(text, tuple(releases) if releases is not None else None, model_id)
        descriptor = flight.FlightDescriptor.for_command(json.dumps(request.to_dict()).encode())
        return self._client.get_schema(descriptor, options=self._options).schema

    def schema(self, **query) -> pa.Schema:
        """The catalogue's columns (or, given query arguments, the result's)."""
        command = json.dumps(Query.from_dict(query).to_dict()).encode() if query else b""
        descriptor = flight.FlightDescriptor.for_command(command)
        return self._client.get_schema(descriptor, options=self._options).schema

    def _get(self, request: Query | SqlRequest) -> pa.Table:
        """The whole result of a query or SQL request, sent as its JSON ticket."""
        ticket = flight.Ticket(json.dumps(request.to_dict()).encode())
        return self._client.do_get(ticket, options=self._options).read_all()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CatalogueClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(
    url: str, token: str | None = None, *, token_file: str | None = None, **kwargs
) -> CatalogueClient:
    """A client for ``url`` (``grpc://host:port`` or ``grpc+tls://host:port``)."""
    if token is None and token_file is not None:
        token = read_token(token_file)
    return CatalogueClient(url, token, **kwargs)
