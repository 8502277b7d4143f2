"""Aggregates of a catalogue query (``speclabel query --group-by --aggregate``), checked and rendered to SQL.

An aggregate is a short spec, never SQL text: ``count`` (rows), ``count(COL)`` (non-null values),
``mean``, ``median``, ``std`` (sample, ddof = 1), ``min``, ``max``, ``sum`` of a column, or a quantile
``qNN(COL)`` (``q05`` is the 5 % quantile; median and quantiles interpolate linearly between the two
nearest values, as numpy's default). Each becomes one result column named ``count`` or
``FUNCTION_COLUMN`` (``mean_feh``, ``q05_feh``). Specs are parsed here, checked against the schema
of the runs (known column; numeric for everything but ``count``, which takes any column, and ``min``
/ ``max``, which also take timestamps; no grouping by list columns) and rendered with quoted
identifiers, so user text never reaches the SQL. Nulls are skipped as SQL does; NaN follows
DuckDB (mean, std and sum give NaN; min, max, median and quantiles order NaN above every number).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa

from .expr import QueryError, unknown_column
from .expr_sql import identifier

COUNT = "count"
MEDIAN = "median"
# Function -> its DuckDB aggregate; the median and the quantiles are quantile_cont.
_FUNCTIONS = {"mean": "avg", "std": "stddev_samp", "min": "min", "max": "max", "sum": "sum"}
_SPEC = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)\s*(?:\(\s*([^()]*?)\s*\))?\s*")
_QUANTILE = re.compile(r"q(\d\d)")
HELP = "count, count(COL), mean(COL), median(COL), std(COL), min(COL), max(COL), sum(COL), qNN(COL)"


@dataclass(frozen=True)
class Aggregate:
    """One parsed spec: ``function`` (count, mean, ..., q05) over ``column`` (None: rows)."""

    function: str
    column: str | None = None

    @property
    def name(self) -> str:
        return self.function if self.column is None else f"{self.function}_{self.column}"


def parse_aggregate(text: str) -> Aggregate:
    """``"mean(feh)"`` -> ``Aggregate("mean", "feh")``; refuses what is not a known spec."""
    match = _SPEC.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise QueryError(f"cannot read the aggregate {text!r}; aggregates are {HELP}")
    function, column = match.group(1).lower(), match.group(2)
    if function == COUNT and column in (None, "*"):
        return Aggregate(COUNT)
    if function not in (COUNT, MEDIAN, *_FUNCTIONS) and not _QUANTILE.fullmatch(function):
        raise QueryError(f"unknown aggregate function {match.group(1)!r} in {text!r}; aggregates are {HELP}")
    if not column:
        raise QueryError(f"the aggregate {text!r} needs a column, e.g. {function}(feh)")
    return Aggregate(function, column)


def check_aggregates(
    group_by: Sequence[str], aggregates: Sequence[Aggregate], schema: pa.Schema, extra: Sequence[str] = ()
) -> None:
    """Raises :class:`QueryError` unless every name is a column of ``schema`` (or of ``extra``,
    computed float64 columns such as ``cone_distance``) that its use accepts."""
    types = {**{f.name: f.type for f in schema}, **{name: pa.float64() for name in extra}}
    for name in group_by:
        if name not in schema.names:
            raise QueryError(unknown_column(name, schema.names, where=" in the group-by columns"))
        if pa.types.is_nested(schema.field(name).type):
            raise QueryError(f"cannot group by {name!r}: it is a list column ({schema.field(name).type})")
    for agg in aggregates:
        if agg.column is None:
            continue
        spec = f"{agg.function}({agg.column})"
        if agg.column not in types:
            raise QueryError(unknown_column(agg.column, list(types), where=f" in {spec}"))
        dtype = types[agg.column]
        extreme = agg.function in ("min", "max")
        if agg.function == COUNT or _is_numeric(dtype) or (extreme and pa.types.is_timestamp(dtype)):
            continue
        kinds = "a numeric or timestamp column" if extreme else "a numeric column"
        raise QueryError(f"{spec}: {agg.column!r} is {dtype}; {agg.function} needs {kinds}")
    names = [*group_by, *(a.name for a in aggregates)]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise QueryError(f"the result would have two columns named {', '.join(map(repr, clashes))}")


def aggregate_items(
    group_by: Sequence[str], aggregates: Sequence[Aggregate], schema: pa.Schema, values: Mapping[str, str]
) -> list[str]:
    """The SELECT items: the group-by columns, then each aggregate ``AS`` its name; ``values`` maps a
    computed column (``cone_distance``) to its SQL expression."""
    items = [identifier(name) for name in group_by]
    for agg in aggregates:
        items.append(f"{_aggregate_sql(agg, schema, values)} AS {identifier(agg.name)}")
    return items


def _aggregate_sql(agg: Aggregate, schema: pa.Schema, values: Mapping[str, str]) -> str:
    if agg.column is None:
        return "count(*)"
    value = values.get(agg.column, identifier(agg.column))
    if agg.function == COUNT:
        return f"count({value})"
    quantile = _QUANTILE.fullmatch(agg.function)
    if quantile or agg.function == MEDIAN:
        fraction = int(quantile.group(1)) / 100 if quantile else 0.5
        return f"quantile_cont(CAST({value} AS DOUBLE), {fraction!r})"
    text = f"{_FUNCTIONS[agg.function]}({value})"
    integer = agg.column in schema.names and pa.types.is_integer(schema.field(agg.column).type)
    if agg.function == "sum" and integer:
        return f"CAST({text} AS BIGINT)"  # DuckDB sums integers as HUGEINT, which Arrow has not
    return text


def _is_numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype)
