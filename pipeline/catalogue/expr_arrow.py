"""Parsed ``--where`` queries (:mod:`.expr_ast`) as ``pyarrow.compute`` expressions.

The reference semantics of the language: Arrow's (IEEE comparisons, so NaN compares false except
with ``!=``; Kleene ``and``/``or``; checked integer arithmetic). :mod:`.expr_sql` renders the same
results in DuckDB.
"""

from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.compute as pc

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

_COMPARE = {"<": pc.less, "<=": pc.less_equal, ">": pc.greater, ">=": pc.greater_equal}
_COMPARE.update({"=": pc.equal, "!=": pc.not_equal})
_ARITHMETIC = {"+": pc.add_checked, "-": pc.subtract_checked, "*": pc.multiply_checked, "/": pc.divide}


@functools.singledispatch
def to_arrow(node: Expr) -> pc.Expression:
    raise TypeError(f"no Arrow expression for {type(node).__name__}")


@to_arrow.register
def _column(node: Column) -> pc.Expression:
    return pc.field(node.name)


@to_arrow.register
def _literal(node: Literal) -> pc.Expression:
    return pc.scalar(pa.scalar(node.value, node.type))


@to_arrow.register
def _compare(node: Compare) -> pc.Expression:
    return _COMPARE[node.op](to_arrow(node.left), to_arrow(node.right))


@to_arrow.register
def _logical(node: Logical) -> pc.Expression:
    left, right = to_arrow(node.left), to_arrow(node.right)
    return left & right if node.op == "and" else left | right


@to_arrow.register
def _not(node: Not) -> pc.Expression:
    return ~to_arrow(node.operand)


@to_arrow.register
def _is_null(node: IsNull) -> pc.Expression:
    return pc.is_null(to_arrow(node.operand))


@to_arrow.register
def _in(node: In) -> pc.Expression:
    return pc.is_in(to_arrow(node.operand), value_set=node.values)


@to_arrow.register
def _cast(node: Cast) -> pc.Expression:
    return to_arrow(node.operand).cast(node.type)


@to_arrow.register
def _arithmetic(node: Arithmetic) -> pc.Expression:
    left, right = to_arrow(node.left), to_arrow(node.right)
    if node.op == "/":  # integer columns would otherwise divide as integers
        left, right = left.cast(pa.float64()), right.cast(pa.float64())
    return _ARITHMETIC[node.op](left, right)


@to_arrow.register
def _negate(node: Negate) -> pc.Expression:
    return pc.negate_checked(to_arrow(node.operand))


@to_arrow.register
def _abs(node: Abs) -> pc.Expression:
    return pc.abs_checked(to_arrow(node.operand))


@to_arrow.register
def _has_flag(node: HasFlag) -> pc.Expression:
    return pc.bit_wise_and(pc.field("flags"), pc.scalar(pa.scalar(node.bits, pa.int32()))) != 0


def arithmetic_type(op: str, left: pa.DataType, right: pa.DataType) -> pa.DataType:
    """The type Arrow gives ``left op right`` (the language's type rule for arithmetic)."""
    if op == "/":
        return pa.float64()
    return _ARITHMETIC[op](pa.array([], left), pa.array([], right)).type
