"""The --where language rendered as DuckDB SQL: the rows plain Python selects, the values Arrow computes."""

import itertools

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import test_catalogue_expr as language  # the language's test table and cases, evaluated in Python

from speclabel.pipeline.catalogue.expr import parse
from speclabel.pipeline.catalogue.expr_arrow import to_arrow
from speclabel.pipeline.catalogue.expr_sql import to_sql

table = language.table  # the same fixture: nulls, NaN, flags, strings, timestamps


def _duckdb_values(data: pa.Table, text: str, *, condition: bool = True) -> pa.ChunkedArray:
    """The expression's value in each row of ``data``, computed by DuckDB, in row order."""
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("t", data)
        sql = to_sql(parse(text, data.schema, condition=condition))
        return con.sql(f"SELECT {sql} AS value FROM t").to_arrow_table().column("value")
    finally:
        con.close()


def _arrow_values(data: pa.Table, text: str, *, condition: bool = True) -> pa.ChunkedArray:
    expression = to_arrow(parse(text, data.schema, condition=condition))
    return pads.dataset(data).to_table(columns={"value": expression}).column("value")


def _duckdb_select(data: pa.Table, text: str) -> list[str]:
    keep = _duckdb_values(data, text).fill_null(False).to_numpy(zero_copy_only=False)
    return list(np.array(data.column("spectrum_id").to_pylist())[keep])


@pytest.mark.parametrize(("text", "predicate"), language.CASES)
def test_duckdb_selects_what_python_selects(table, text, predicate):
    expected = language._python(table, predicate)
    assert expected, f"test case {text!r} selects nothing"
    assert _duckdb_select(table, text) == expected


@pytest.fixture(scope="module")
def grid():
    """Every pairing of a number, NaN and null in two float32 columns, with nullable ints, flags
    and strings alongside."""
    values = [1.0, 2.0, np.nan, None]
    pairs = list(itertools.product(values, values))
    n = len(pairs)
    return pa.table(
        {
            "spectrum_id": [f"g{i}" for i in range(n)],
            "x": pa.array([a for a, _ in pairs], pa.float32(), from_pandas=False),
            "y": pa.array([b for _, b in pairs], pa.float32(), from_pandas=False),
            "i": pa.array([None if k % 5 == 0 else k - 7 for k in range(n)], pa.int32()),
            "flags": pa.array([None if k % 6 == 0 else k % 8 for k in range(n)], pa.int32()),
            "s": pa.array([None if k % 3 == 0 else "ab"[k % 2] for k in range(n)], pa.string()),
        }
    )


CONDITIONS = [
    *(f"x {op} y" for op in ("<", "<=", ">", ">=", "=", "!=")),
    *(f"x {op} 1.5" for op in ("<", "<=", ">", ">=")),
    *(f"1.5 {op} x" for op in ("<", "<=", ">", ">=")),
    "x = 2",
    "x != 2",
    "2 != x",
    "not (x > y)",
    "not (x != y)",
    "not (x <= 1)",
    "(x > 1.5) is null",
    "(x != y) is not null",
    "x > y or x is null",
    "x > 1 and y < 2",
    "x between 1 and y",
    "x not between y and 2",
    "x in (1, 2)",
    "x not in (2)",
    "i not in (-7, -5)",
    "i in (2.5, 4)",
    "s not in ('a')",
    "x / i > 0",
    "x / 0 > 0",
    "i / 0 < 0",
    "-x < -1.5",
    "abs(x - y) >= 0",
    "x * 2 = y",
    "has_flag(low_snr)",
    "not has_flag(low_snr, high_std)",
    "x is null and y is not null",
]


@pytest.mark.parametrize("text", CONDITIONS)
def test_nan_and_null_answers_match_arrow_row_by_row(grid, text):
    """true / false / null in every row, under not, is null and or, as Arrow answers."""
    expected = _arrow_values(grid, text).to_pylist()
    assert _duckdb_values(grid, text).to_pylist() == expected
    assert {True, False} <= set(expected), f"{text!r} does not tell rows apart"


@pytest.mark.parametrize(
    "text", ["x - y", "x / 0", "i / 2", "i + 1", "i + 3000000000", "-x * 3", "abs(i) - 0.5", "i * 0.1"]
)
def test_arithmetic_values_and_types_match_arrow(grid, text):
    expected = _arrow_values(grid, text, condition=False)
    got = _duckdb_values(grid, text, condition=False)
    assert got.type == expected.type
    a = got.to_numpy(zero_copy_only=False).astype(float)
    b = expected.to_numpy(zero_copy_only=False).astype(float)
    np.testing.assert_array_equal(a, b)  # NaN where NaN, inf where inf, nulls as NaN on both sides


def test_float32_columns_compare_in_double_as_arrow_does():
    # 1.1 as float32 is 1.10000002: greater than the double 1.1, equal to no double literal 1.1.
    data = pa.table({"spectrum_id": ["a", "b"], "x": pa.array([1.1, 1.0], pa.float32())})
    for text in ("x > 1.1", "x = 1.1", "x in (1.1)", "x <= 1.1"):
        assert _duckdb_values(data, text).to_pylist() == _arrow_values(data, text).to_pylist(), text


def test_names_and_strings_are_quoted_not_spliced():
    name = 'odd "name"; drop'
    data = pa.table({"spectrum_id": ["a", "b", "c"], name: ["it's", "x'); select 1; --", 'a"b']})
    for value in ("it's", "x'); select 1; --", 'a"b'):
        quoted = "'" + value.replace("'", "''") + "'"
        text = f"`{name}` = {quoted}"
        assert _duckdb_select(data, text) == [r["spectrum_id"] for r in data.to_pylist() if r[name] == value]


def test_integer_overflow_fails_in_both_engines(grid):
    # 2147483647 is an int32 literal, so i + 2147483647 is int32 arithmetic and overflows for i > 0.
    # (In a comparison DuckDB moves the constant across, i > -2147483647, and answers instead.)
    with pytest.raises(pa.ArrowInvalid, match="overflow"):
        _arrow_values(grid, "i + 2147483647", condition=False)
    with pytest.raises(duckdb.OutOfRangeException):
        _duckdb_values(grid, "i + 2147483647", condition=False)
    wider = "i + 2147483648"  # an int64 literal: int64 arithmetic, no overflow
    assert _duckdb_values(grid, wider, condition=False) == _arrow_values(grid, wider, condition=False)
