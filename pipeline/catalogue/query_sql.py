"""`speclabel query` on DuckDB: a :class:`~.reader.Query` as one generated SELECT over the runs' files.

The rows are those of the same runs the rest of the catalogue reads (:meth:`Catalogue.runs`: the
index and the run manifests, never a folder listing). The SQL is generated, never taken from the
user: ``--where`` is parsed and type-checked (:mod:`.expr`) and rendered with Arrow's semantics
(:mod:`.expr_sql`), column names are quoted, numbers typed. A cone search prunes three times, as
the Arrow reader does: files outside the sky cells that meet the cone are never handed to DuckDB,
row groups whose fine ``healpix`` range misses it are skipped by DuckDB's statistics, and rows
by the exact great-circle distance, computed as :func:`.layout.cone_expression` computes it.

Local catalogues are read by DuckDB's Parquet reader (one ``read_parquet`` per run, as a run writes
one schema; runs may differ in columns, joined by name); catalogues on object stores through the
Arrow dataset of the catalogue's filesystem, so DuckDB needs no credentials or extensions.

One DuckDB database per :class:`Catalogue`, opened on its first query and reused (opening one costs
more than a small cone search); each query runs on its own cursor, so threads can query at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import pyarrow as pa

from .aggregate import aggregate_items, check_aggregates
from .expr import QueryError, parse
from .expr_sql import identifier, string_literal, to_sql, value_literal
from .layout import HEALPIX, RELEASE, SKY, CatalogueLayout
from .reader import CONE_DISTANCE, Catalogue, Cone, Query, RunFiles, projected_names

HIVE_TYPES = f"{{{string_literal(RELEASE)}: VARCHAR, {string_literal(SKY)}: INTEGER}}"
_DATABASE_SETTINGS = (
    "SET TimeZone = 'UTC'",  # timestamps come back as stored (UTC), not in the machine's zone
    "SET python_enable_replacements = false",  # only the named sources, never Python variables
    "SET autoload_known_extensions = false",
    "SET autoinstall_known_extensions = false",
)
_lock = threading.Lock()


def read_parquet(files: Sequence[str], *, hive: bool) -> str:
    options = f"hive_partitioning = true, hive_types = {HIVE_TYPES}" if hive else "hive_partitioning = false"
    return f"read_parquet([{', '.join(string_literal(f) for f in files)}], {options})"


def labels_source(
    catalogue: Catalogue, runs: Sequence[RunFiles], register: Callable[[object], str], schema: pa.Schema
) -> str:
    """A FROM item over the rows of ``runs`` with the ``release`` and ``sky`` partition columns.

    ``register(arrow_object)`` registers an Arrow dataset with DuckDB and returns its name (used
    on object stores, and for no files at all: an empty source of ``schema``, the runs' columns).
    """
    parts = [read_parquet(run.files, hive=True) for run in runs if run.files]
    if parts and catalogue.dataset.local:
        return "(" + " UNION ALL BY NAME ".join(f"(SELECT * FROM {p})" for p in parts) + ")"
    return register(catalogue.dataset_of_runs(runs, schema))


def cone_runs(catalogue: Catalogue, runs: Sequence[RunFiles], cone: Cone) -> list[RunFiles]:
    """``runs`` with only the files of the sky cells that meet ``cone``."""
    layout = catalogue.layout
    cells = {int(c) for c in layout.cone_cells(cone.ra, cone.dec, cone.radius, layout.sky_order)}
    return [replace(run, files=tuple(f for f in run.files if _sky_of(f) in cells)) for run in runs]


def _sky_of(path: str) -> int:
    return int(path.rsplit(f"/{SKY}=", 1)[1].split("/", 1)[0])


def cone_sql(layout: CatalogueLayout, cone: Cone) -> tuple[str, str]:
    """(condition, distance in degrees) of a cone, in the arithmetic of :mod:`.layout`'s Arrow
    expressions so both select the same rows at the edge."""
    order = layout.range_order(cone.radius)
    ranges = layout.fine_ranges(layout.cone_cells(cone.ra, cone.dec, cone.radius, order), order)
    column = identifier(HEALPIX)
    in_ranges = " OR ".join(f"{column} BETWEEN {lo} AND {hi}" for lo, hi in ranges)
    d2r = np.pi / 180.0
    ra, dec = identifier("ra"), identifier("dec")

    def number(value) -> str:
        return value_literal(float(value), pa.float64())

    half_ddec = f"sin(({dec} - {number(cone.dec)}) * {number(d2r / 2)})"
    half_dra = f"sin(({ra} - {number(cone.ra)}) * {number(d2r / 2)})"
    cos_dec = f"(cos({dec} * {number(d2r)}) * {number(np.cos(cone.dec * d2r))})"
    hav = f"({half_ddec} * {half_ddec} + {cos_dec} * {half_dra} * {half_dra})"
    within = f"{hav} <= {number(np.sin(np.radians(cone.radius) / 2) ** 2)}"
    distance = f"(asin(sqrt(least({hav}, {number(1.0)}))) * {number(2 * 180.0 / np.pi)})"
    return f"({in_ranges}) AND {within}", distance


def select_sql(query: Query, schema: pa.Schema, layout: CatalogueLayout, source: str, *, count=False) -> str:
    """The SELECT of ``query`` over ``source`` (a FROM item with ``schema``'s columns)."""
    conditions = []
    if query.where:
        conditions.append(to_sql(parse(query.where, schema)))
    distance = None
    if query.cone is not None:
        within, distance = cone_sql(layout, query.cone)
        conditions.append(within)
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    if query.aggregated:
        text = f"{_aggregate_select(query, schema, distance)} FROM {source}{where}"
        if query.group_by:
            groups = ", ".join(identifier(n) for n in query.group_by)
            text += f" GROUP BY {groups} ORDER BY {groups}"
        if count:
            return f"SELECT count(*) AS n FROM ({text})"
    elif count:
        return f"SELECT count(*) AS n FROM {source}{where}"
    else:
        names = projected_names(query, schema)
        items = ", ".join(
            f"{distance} AS {identifier(n)}" if n == CONE_DISTANCE else identifier(n) for n in names
        )
        text = f"SELECT {items} FROM {source}{where}"
    if query.limit is not None:
        text += f" LIMIT {int(query.limit)}"
    return text


def _aggregate_select(query: Query, schema: pa.Schema, distance: str | None) -> str:
    """``SELECT`` and the group-by columns and aggregates of an aggregate query, checked against
    ``schema`` (``cone_distance`` may be aggregated in a cone search)."""
    group_by, aggregates = list(dict.fromkeys(query.group_by or ())), query.parsed_aggregates()
    computed = {CONE_DISTANCE: distance} if distance is not None else {}
    check_aggregates(group_by, aggregates, schema, extra=list(computed))
    return "SELECT " + ", ".join(aggregate_items(group_by, aggregates, schema, computed))


class QueryEngine:
    """The DuckDB database of one catalogue; :meth:`table`, :meth:`count`, :meth:`stream`."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self._database = None

    def _cursor(self):
        with _lock:
            if self._database is None:
                import duckdb

                database = duckdb.connect(":memory:")
                for statement in _DATABASE_SETTINGS:
                    database.execute(statement)
                self._database = database
        return self._database.cursor()

    def _prepare(self, query: Query, *, count: bool = False):
        """(cursor, SQL) of ``query``; the caller closes the cursor."""
        cat = self.catalogue
        runs = cat.runs(query.releases, query.model_id)
        schema = cat.schema_of_runs(runs)
        if query.cone is not None:
            runs = cone_runs(cat, runs, query.cone)
        cursor = self._cursor()
        names = []

        def register(arrow) -> str:
            names.append(f"_source_{len(names)}")
            cursor.register(names[-1], arrow)
            return names[-1]

        try:
            source = labels_source(cat, runs, register, schema)
            text = select_sql(query, schema, cat.layout, source, count=count)
        except BaseException:
            cursor.close()
            raise
        return cursor, text

    def table(self, query: Query) -> pa.Table:
        cursor, text = self._prepare(query)
        try:
            return _run(lambda: cursor.sql(text).to_arrow_table())
        finally:
            cursor.close()

    def count(self, query: Query) -> int:
        cursor, text = self._prepare(query, count=True)
        try:
            return int(_run(lambda: cursor.sql(text).fetchall()[0][0]))
        finally:
            cursor.close()

    def schema(self, query: Query) -> pa.Schema:
        return self.table(replace(query, limit=0)).schema

    def stream(self, query: Query, batch_rows: int) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """The result's schema and its batches (close the iterator to stop the query early)."""
        cursor, text = self._prepare(query)
        try:
            reader = _run(lambda: cursor.sql(text).to_arrow_reader(batch_rows))
        except BaseException:
            cursor.close()
            raise
        return reader.schema, _batches(reader, cursor)


def _batches(reader, cursor) -> Iterator[pa.RecordBatch]:
    try:
        while (batch := _run(lambda: next(reader, None))) is not None:
            yield batch
    finally:
        reader.close()
        cursor.close()


def _run(fn):
    """``fn()``, with an integer overflow in the query's arithmetic (or in an integer ``sum``, which
    does not fit the 64-bit result) as a query error."""
    import duckdb

    try:
        return fn()
    except (duckdb.OutOfRangeException, duckdb.ConversionException) as exc:
        raise QueryError(f"the query's arithmetic overflows: {str(exc).strip()}") from None
