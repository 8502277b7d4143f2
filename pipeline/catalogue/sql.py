"""SQL over a label catalogue with DuckDB, in a sandbox: read-only, no file or network access, bounded.

Each :class:`CatalogueSql` is one in-memory DuckDB database with these views, over exactly the runs
that :meth:`Catalogue.runs` selects (the live run of each release, or the latest published run of
``model_id``), taken from the index and the run manifests, never from listing folders:

- ``labels``: the catalogue rows, with the ``release`` and ``sky`` partition columns;
- ``quarantine``: the rows those runs refused (``spectrum_id, reason, detail, source, release,
  run_id``; empty when none were);
- ``saliency``: the full saliency maps those runs stored (``--saliency full``), where there are any.

Staged, superseded-but-unselected and side files are never in a view and cannot be read. After the
views are made the database is locked: external access off (no ``read_parquet('/etc/...')``,
``COPY``, ``ATTACH``, ``INSTALL``, HTTP), except reading the selected files themselves on a local
catalogue; no Python replacement scans; no spilling to disk; a memory limit; then the configuration
is locked, so ``SET`` fails. Only one ``SELECT`` statement is run at a time (a ``SELECT`` cannot
write; everything else is refused by its statement type before DuckDB runs it), under a time limit
(a timer interrupts it) and, where asked, a row limit on the result.

Local catalogues are read by DuckDB's own Parquet reader (``allowed_paths`` = the selected files);
catalogues on object stores through the Arrow datasets of the catalogue's filesystem, so DuckDB
needs no credentials or extensions of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads

from speclabel.core.contract import QUARANTINE_SCHEMA
from speclabel.core.errors import SpeclabelError
from speclabel.core.layout import QUARANTINE, RELEASE, SALIENCY

from .expr import QueryError
from .expr_sql import string_literal
from .query_sql import labels_source, read_parquet
from .reader import Catalogue, RunFiles

VIEWS = ("labels", "quarantine", "saliency")
MAX_SQL_LENGTH = 100_000


class SqlLimitError(SpeclabelError):
    """A query ran into a bound (rows, time, memory): narrow it or add a LIMIT."""


class SqlTimeoutError(SqlLimitError):
    """A query ran past its time bound and was interrupted."""


@dataclass(frozen=True)
class SqlLimits:
    """Bounds per query; None leaves one off (the local command line has no row or time bound)."""

    max_rows: int | None = None
    max_seconds: float | None = None
    memory: str | None = None  # DuckDB's memory_limit, e.g. "2GB"; None = DuckDB's default (80 % of RAM)
    threads: int | None = None


@dataclass(frozen=True)
class SqlRequest:
    """One SQL query and its run selection: the same object drives the library, CLI and Flight."""

    sql: str
    releases: tuple[str, ...] | None = None
    model_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sql, str) or not self.sql.strip():
            raise QueryError("the SQL query is empty")
        if len(self.sql) > MAX_SQL_LENGTH:
            raise QueryError(
                f"the SQL query is {len(self.sql)} characters long; the limit is {MAX_SQL_LENGTH}"
            )
        if self.releases is not None and (
            isinstance(self.releases, str) or not all(isinstance(r, str) and r for r in self.releases)
        ):
            raise QueryError(f"releases must be a list of names, got {self.releases!r}")
        if self.model_id is not None and not isinstance(self.model_id, str):
            raise QueryError(f"model_id must be a string, got {self.model_id!r}")

    def to_dict(self) -> dict:
        data = {"sql": self.sql, "releases": list(self.releases or []) or None, "model_id": self.model_id}
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> SqlRequest:
        unknown = set(data) - {"sql", "releases", "model_id"}
        if unknown:
            raise QueryError(f"unknown SQL request field(s) {sorted(unknown)}")
        releases = data.get("releases")
        return cls(
            sql=data.get("sql"),
            releases=tuple(releases) if isinstance(releases, list) else releases,
            model_id=data.get("model_id"),
        )


class CatalogueSql:
    """A sandboxed DuckDB database over the selected runs of ``catalogue``; close it when done.

    >>> with CatalogueSql(Catalogue.open("labels/")) as db:
    ...     table = db.table("SELECT release, count(*) AS n, avg(feh) FROM labels GROUP BY release")
    """

    def __init__(
        self,
        catalogue: Catalogue,
        *,
        releases: Sequence[str] | None = None,
        model_id: str | None = None,
        limits: SqlLimits | None = None,
    ) -> None:
        import duckdb

        self.catalogue = catalogue
        self.limits = limits or SqlLimits()
        runs = catalogue.runs(releases, model_id)
        self._con = duckdb.connect(":memory:")
        self._sources = 0
        try:
            self._allowed: list[str] = []
            self.views = self._make_views(runs)
            self._lock()
        except BaseException:
            self._con.close()
            raise

    # -- the views --------------------------------------------------------------------------------

    def _make_views(self, runs: list[RunFiles]) -> tuple[str, ...]:
        if self.catalogue.dataset.local:
            self._allowed += [f for run in runs for f in run.files]
        source = labels_source(self.catalogue, runs, self._register, self.catalogue.schema_of_runs(runs))
        self._view("labels", [source])
        views = ["labels"]
        for kind, name in ((QUARANTINE, "quarantine"), (SALIENCY, "saliency")):
            parts = []
            for run in runs:
                files = self._side_files(kind, run)
                if files:
                    release, run_id = string_literal(run.release), string_literal(run.run_id)
                    columns = f"{release} AS {RELEASE}, {run_id} AS run_id"
                    parts.append(f"(SELECT *, {columns} FROM {self._source(files)})")
            if parts:
                self._view(name, parts)
                views.append(name)
            elif name == "quarantine":
                empty = QUARANTINE_SCHEMA.empty_table()
                empty = empty.append_column(RELEASE, pa.array([], pa.string()))
                self._view(name, [self._register(empty.append_column("run_id", pa.array([], pa.string())))])
                views.append(name)
        return tuple(views)

    def _side_files(self, kind: str, run: RunFiles) -> list[str]:
        dataset = self.catalogue.dataset
        folder = dataset.side_dir(kind, run.release, run.run_id)
        return [p for p in dataset.files_under(folder) if p.endswith(".parquet")]

    def _source(self, files: list[str]) -> str:
        """A FROM item reading side ``files``: DuckDB's reader locally, an Arrow dataset elsewhere."""
        dataset = self.catalogue.dataset
        if dataset.local:
            self._allowed += files
            return read_parquet(files, hive=False)
        return self._register(pads.dataset(files, format="parquet", filesystem=dataset.fs))

    def _register(self, arrow) -> str:
        name = f"_source_{self._sources}"
        self._sources += 1
        self._con.register(name, arrow)
        return name

    def _view(self, name: str, parts: list[str]) -> None:
        body = " UNION ALL BY NAME ".join(p if p.startswith("(") else f"(SELECT * FROM {p})" for p in parts)
        self._con.execute(f"CREATE VIEW {name} AS {body}")

    def _lock(self) -> None:
        """Applied after the views exist: the views keep reading their files, nothing else can."""
        con = self._con
        if self._allowed:
            con.execute(f"SET allowed_paths = [{', '.join(string_literal(f) for f in self._allowed)}]")
        settings = [
            "SET TimeZone = 'UTC'",
            "SET python_enable_replacements = false",
            "SET autoload_known_extensions = false",
            "SET autoinstall_known_extensions = false",
            "SET max_temp_directory_size = '0B'",
        ]
        if self.limits.memory:
            settings.append(f"SET memory_limit = {string_literal(self.limits.memory)}")
        if self.limits.threads:
            settings.append(f"SET threads = {int(self.limits.threads)}")
        settings += ["SET enable_external_access = false", "SET lock_configuration = true"]
        for statement in settings:
            try:
                con.execute(statement)
            except Exception as exc:  # a bad --max-memory value, say
                raise QueryError(f"cannot apply {statement!r}: {exc}") from None

    # -- queries ----------------------------------------------------------------------------------

    def check(self, text: str) -> str:
        """``text`` if it is one SELECT statement; refuses anything else before it runs."""
        import duckdb

        SqlRequest(text)
        try:
            statements = self._con.extract_statements(text)
        except duckdb.Error as exc:
            raise QueryError(f"SQL: {_message(exc)}") from None
        if len(statements) != 1:
            raise QueryError(f"give one SQL statement at a time, not {len(statements)}")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise QueryError(
                f"only SELECT queries are allowed here, not {kind.name}: the catalogue is read-only "
                f"(views: {', '.join(self.views)})"
            )
        return text

    def stream(self, text: str, batch_rows: int = 64 * 1024) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """The result's schema and its batches, within the limits; the timer runs from this call
        to the last batch (close the iterator to stop early)."""
        self.check(text)
        started = time.monotonic()
        timer = self._timer()
        try:
            reader = self._run(lambda: self._con.sql(text).to_arrow_reader(batch_rows), started)
        except BaseException:
            if timer:
                timer.cancel()
            raise
        return reader.schema, self._bounded(reader, timer, started)

    def _bounded(self, reader, timer, started) -> Iterator[pa.RecordBatch]:
        sent, max_rows = 0, self.limits.max_rows
        try:
            while True:
                batch = self._run(lambda: next(reader, None), started)
                if batch is None:
                    return
                sent += batch.num_rows
                if max_rows is not None and sent > max_rows:
                    raise SqlLimitError(
                        f"the result exceeds the bound of {max_rows} rows: add a LIMIT or narrow the query"
                    )
                yield batch
        finally:
            if timer:
                timer.cancel()
            reader.close()

    def table(self, text: str) -> pa.Table:
        if self.limits.max_rows is not None:
            schema, batches = self.stream(text)
            return pa.Table.from_batches(list(batches), schema=schema)
        # Unbounded in rows: DuckDB's own table conversion, a fifth faster than streaming batches.
        self.check(text)
        started = time.monotonic()
        timer = self._timer()
        try:
            return self._run(lambda: self._con.sql(text).to_arrow_table(), started)
        finally:
            if timer:
                timer.cancel()

    def schema(self, text: str) -> pa.Schema:
        """The result's schema, without reading rows."""
        self.check(text)
        return self._run(lambda: self._con.sql(text).limit(0).to_arrow_table().schema, time.monotonic())

    def _timer(self) -> threading.Timer | None:
        if self.limits.max_seconds is None:
            return None
        timer = threading.Timer(self.limits.max_seconds, self._con.interrupt)
        timer.daemon = True
        timer.start()
        return timer

    def _run(self, fn, started: float):
        """``fn()`` with DuckDB's errors as speclabel's: a limit, or a query the user can fix."""
        import duckdb

        try:
            return fn()
        except duckdb.InterruptException:
            raise SqlTimeoutError(
                f"the query ran past the bound of {self.limits.max_seconds:g} s "
                f"(stopped after {time.monotonic() - started:.1f} s): narrow it or add a LIMIT"
            ) from None
        except duckdb.OutOfMemoryException:
            raise SqlLimitError(
                f"the query needs more memory than the bound of {self.limits.memory or 'this machine'}: "
                "narrow it, aggregate, or add a LIMIT"
            ) from None
        except duckdb.PermissionException as exc:
            raise QueryError(
                f"not allowed: {_message(exc)} (SQL here reads the catalogue's views only)"
            ) from None
        except duckdb.CatalogException as exc:
            raise QueryError(f"SQL: {_message(exc)}\n(views here: {', '.join(self.views)})") from None
        except duckdb.Error as exc:
            raise QueryError(f"SQL: {_message(exc)}") from None

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> CatalogueSql:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sql(
    catalogue: Catalogue,
    text: str,
    *,
    releases: Sequence[str] | None = None,
    model_id: str | None = None,
    limits: SqlLimits | None = None,
) -> pa.Table:
    """The result of one SELECT over the catalogue's views as an Arrow table."""
    with CatalogueSql(catalogue, releases=releases, model_id=model_id, limits=limits) as db:
        return db.table(text)


def _message(exc: Exception) -> str:
    return str(exc).strip()
