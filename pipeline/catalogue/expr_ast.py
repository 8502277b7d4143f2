"""The parsed form of a ``--where`` query: typed nodes, checked by the parser, compiled by backends.

:mod:`.expr` parses the text into these nodes (types checked against the table's schema, errors
pointed at the text); :mod:`.expr_arrow` compiles them to ``pyarrow.compute`` expressions and
:mod:`.expr_sql` renders them as DuckDB SQL with the same results. A new kind of node is one class
here, one branch in the parser and one small function in each backend (``functools.singledispatch``
on the node class).

Every node knows its Arrow type (``dtype``): columns from the schema, literals from their Python
value, arithmetic as Arrow computes it; conditions are booleans.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")  # the type of a quoted date compared with a timestamp


def kind_of(dtype: pa.DataType) -> str:
    """The language's kind of an Arrow type: number, string, bool, timestamp or other."""
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        return "number"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_timestamp(dtype):
        return "timestamp"
    return "other"


@dataclass(frozen=True, eq=False)
class Expr:
    """A node; ``pos`` is where it starts in the query text (for error messages)."""

    pos: int = field(kw_only=True)

    @property
    def dtype(self) -> pa.DataType:
        return pa.bool_()  # conditions; value nodes override

    @property
    def kind(self) -> str:
        return kind_of(self.dtype)

    @property
    def floating(self) -> bool:
        """May hold NaN (a float column or float arithmetic; never a literal)."""
        return pa.types.is_floating(self.dtype) and not isinstance(self, Literal)


@dataclass(frozen=True, eq=False)
class Column(Expr):
    name: str
    type: pa.DataType

    @property
    def dtype(self) -> pa.DataType:
        return self.type


@dataclass(frozen=True, eq=False)
class Literal(Expr):
    value: int | float | str | bool | dt.datetime
    type: pa.DataType  # the narrowest int or float holding a number exactly; string, bool or TIMESTAMP

    @property
    def dtype(self) -> pa.DataType:
        return self.type


@dataclass(frozen=True, eq=False)
class Compare(Expr):
    op: str  # < <= > >= = !=
    left: Expr
    right: Expr


@dataclass(frozen=True, eq=False)
class Logical(Expr):
    op: str  # and, or (three-valued: null and false = false, null or true = true)
    left: Expr
    right: Expr


@dataclass(frozen=True, eq=False)
class Not(Expr):
    operand: Expr


@dataclass(frozen=True, eq=False)
class IsNull(Expr):
    operand: Expr  # NaN is not null


@dataclass(frozen=True, eq=False)
class In(Expr):
    """``operand`` is one of ``values`` (already of the operand's type); false, never null, for a
    null operand, so ``not in`` keeps null rows, as Arrow's ``is_in`` does."""

    operand: Expr
    values: pa.Array


@dataclass(frozen=True, eq=False)
class Cast(Expr):
    operand: Expr
    type: pa.DataType

    @property
    def dtype(self) -> pa.DataType:
        return self.type


@dataclass(frozen=True, eq=False)
class Arithmetic(Expr):
    """``+ - *`` checked for integer overflow; ``/`` in float64 (1 / 0 is inf, 0 / 0 NaN)."""

    op: str  # + - * /
    left: Expr
    right: Expr
    type: pa.DataType

    @property
    def dtype(self) -> pa.DataType:
        return self.type


@dataclass(frozen=True, eq=False)
class Negate(Expr):
    operand: Expr

    @property
    def dtype(self) -> pa.DataType:
        return self.operand.dtype


@dataclass(frozen=True, eq=False)
class Abs(Expr):
    operand: Expr

    @property
    def dtype(self) -> pa.DataType:
        return self.operand.dtype


@dataclass(frozen=True, eq=False)
class HasFlag(Expr):
    """Any of ``bits`` set in the int32 ``flags`` column."""

    bits: int
