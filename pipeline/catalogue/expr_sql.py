"""Parsed ``--where`` queries (:mod:`.expr_ast`) as DuckDB SQL, with the results of :mod:`.expr_arrow`.

Where DuckDB's rules differ from Arrow's, the SQL says what Arrow does:

- NaN: Arrow compares as IEEE 754 (every comparison with NaN is false, except ``!=``); DuckDB orders
  NaN above every number and equal to itself. A comparison where a side may be NaN and DuckDB would
  answer otherwise gets a guard (``x > 1`` becomes ``(x > 1 AND NOT isnan(x))``; ``x < 1`` needs
  none). Guards are extra conjuncts, so DuckDB still pushes ``x > 1`` into the Parquet scan.
- ``in``: Arrow's ``is_in`` is false for a null value (so ``not in`` keeps null rows); SQL's ``IN``
  is null. Rendered as ``(x IS NOT NULL AND x IN (...))``.
- Literals carry the types the parser gave them (as Arrow binds literals: the narrowest type that
  holds the number exactly): a float FLOAT or DOUBLE from a quoted, exactly parsed text (SQL's
  ``0.05`` would be a DECIMAL), an integer plain (DuckDB's integer literal takes the narrowest type
  too, so ``sky + 1`` is INTEGER, and overflows, as in Arrow), the value list of ``in`` the column's
  own type. DuckDB then promotes as Arrow does (INTEGER with FLOAT is FLOAT). Division is in
  DOUBLE as in Arrow (1 / 0 is inf with DuckDB's default IEEE floating-point operations).
- Identifiers are double-quoted and strings single-quoted with quotes doubled, so no query text
  reaches the SQL unquoted.

A new node class is one ``@to_sql.register`` function here.
"""

from __future__ import annotations

import functools

import pyarrow as pa

from .expr_ast import (
    Abs,
    Arithmetic,
    Cast,
    Column,
    Compare,
    Expr,
    HasFlag,
    In,
    IsNull,
    Literal,
    Logical,
    Negate,
    Not,
)

# A side that is NaN (the other side not) gives DuckDB's answer for these operators, IEEE's for the rest.
_NAN_SAFE_ON_LEFT = {"<", "<=", "=", "!="}
_NAN_SAFE_ON_RIGHT = {">", ">=", "=", "!="}


@functools.singledispatch
def to_sql(node: Expr) -> str:
    raise TypeError(f"no SQL rendering for {type(node).__name__}")


def identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def string_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def value_literal(value, dtype: pa.DataType) -> str:
    """``value`` (a Python value of Arrow type ``dtype``) as a DuckDB constant of the same type."""
    if pa.types.is_boolean(dtype):
        return "TRUE" if value else "FALSE"
    if pa.types.is_integer(dtype):
        return str(int(value))
    if pa.types.is_floating(dtype):
        text = f"CAST({string_literal(repr(float(value)))} AS DOUBLE)"  # repr round-trips, inf too
        return f"CAST({text} AS FLOAT)" if dtype.bit_width == 32 else text
    if pa.types.is_timestamp(dtype):
        kind = "TIMESTAMPTZ" if dtype.tz else "TIMESTAMP"
        return f"CAST({string_literal(value.isoformat())} AS {kind})"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return string_literal(value)
    raise TypeError(f"no SQL literal for Arrow type {dtype}")


@to_sql.register
def _column(node: Column) -> str:
    return identifier(node.name)


@to_sql.register
def _literal(node: Literal) -> str:
    return value_literal(node.value, node.type)


@to_sql.register
def _compare(node: Compare) -> str:
    left, right = to_sql(node.left), to_sql(node.right)
    text = f"{left} {node.op} {right}"
    # The sides whose NaN DuckDB would answer otherwise: (side's SQL, other side, other's SQL).
    guarded = []
    if node.left.floating and (node.right.floating or node.op not in _NAN_SAFE_ON_LEFT):
        guarded.append((left, node.right, right))
    if node.right.floating and (node.left.floating or node.op not in _NAN_SAFE_ON_RIGHT):
        guarded.append((right, node.left, left))
    if not guarded:
        return f"({text})"
    # A null on the other side keeps the answer null (not false or true), as in Arrow.
    if node.op == "!=":  # NaN != anything is true
        terms = [f"(isnan({side}) AND {_not_null(sql, other)})" for side, other, sql in guarded]
        return f"({text} OR {' OR '.join(terms)})"
    terms = [f"(NOT isnan({side}){_or_null(sql, other)})" for side, other, sql in guarded]
    return f"({text} AND {' AND '.join(terms)})"


def _not_null(sql: str, node: Expr) -> str:
    return "TRUE" if isinstance(node, Literal) else f"{sql} IS NOT NULL"


def _or_null(sql: str, node: Expr) -> str:
    return "" if isinstance(node, Literal) else f" OR {sql} IS NULL"


@to_sql.register
def _logical(node: Logical) -> str:
    return f"({to_sql(node.left)} {node.op.upper()} {to_sql(node.right)})"


@to_sql.register
def _not(node: Not) -> str:
    return f"(NOT {to_sql(node.operand)})"


@to_sql.register
def _is_null(node: IsNull) -> str:
    return f"({to_sql(node.operand)} IS NULL)"


@to_sql.register
def _in(node: In) -> str:
    operand = to_sql(node.operand)
    values = ", ".join(value_literal(v, node.values.type) for v in node.values.to_pylist())
    return f"({operand} IS NOT NULL AND {operand} IN ({values}))"


@to_sql.register
def _cast(node: Cast) -> str:
    return f"CAST({to_sql(node.operand)} AS {_sql_type(node.type)})"


@to_sql.register
def _arithmetic(node: Arithmetic) -> str:
    left, right = to_sql(node.left), to_sql(node.right)
    if node.op == "/":
        left, right = f"CAST({left} AS DOUBLE)", f"CAST({right} AS DOUBLE)"
    return f"({left} {node.op} {right})"


@to_sql.register
def _negate(node: Negate) -> str:
    return f"(- {to_sql(node.operand)})"


@to_sql.register
def _abs(node: Abs) -> str:
    return f"abs({to_sql(node.operand)})"


@to_sql.register
def _has_flag(node: HasFlag) -> str:
    return f"(({identifier('flags')} & {int(node.bits)}) != 0)"


def _sql_type(dtype: pa.DataType) -> str:
    if pa.types.is_float64(dtype):
        return "DOUBLE"
    raise TypeError(f"no SQL cast to Arrow type {dtype}")
