"""The --where language: results against plain Python evaluation, and its error messages."""

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from speclabel.core.flags import Flag
from speclabel.pipeline.catalogue.expr import QueryError, parse_where

N = 400


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(1)
    feh = rng.uniform(-3, 0.5, N).astype(np.float32)
    object_ = [None if i % 7 == 0 else f"star{i}" for i in range(N)]
    return pa.table(
        {
            "spectrum_id": [f"s{i}" for i in range(N)],
            "release": pa.array(rng.choice(["DR1", "DR2", "DR3"], N)),
            "sky": pa.array(rng.integers(-4, 48, N), pa.int32()),
            "feh": pa.array(feh, mask=rng.random(N) < 0.05),
            "mgfe": rng.uniform(-0.2, 0.5, N).astype(np.float32),
            "mgfe_std": rng.uniform(0, 0.1, N).astype(np.float32),
            # NaN (not null) in some rows: IEEE comparisons, false except !=, as in Python.
            "teff": np.where(rng.random(N) < 0.05, np.nan, rng.uniform(3500, 7000, N)).astype(np.float32),
            "flags": pa.array(rng.integers(0, 64, N), pa.int32()),  # bit 5: out_of_distribution
            "object": pa.array(object_, pa.string()),
            "processed_at": pa.array(
                [dt.datetime(2026, 1, 1 + i % 28, tzinfo=dt.UTC) for i in range(N)],
                pa.timestamp("us", tz="UTC"),
            ),
        }
    )


def _select(table, text):
    return table.filter(parse_where(text, table.schema)).column("spectrum_id").to_pylist()


def _python(table, predicate):
    rows = table.to_pylist()
    return [r["spectrum_id"] for r in rows if predicate(r)]


def _lt(a, b):
    return a is not None and a < b


CASES = [
    ("feh < -1 and mgfe_std < 0.05", lambda r: _lt(r["feh"], -1) and r["mgfe_std"] < 0.05),
    ("feh < -1 or mgfe > 0.3", lambda r: _lt(r["feh"], -1) or r["mgfe"] > 0.3),
    ("not (teff >= 5000)", lambda r: not r["teff"] >= 5000),
    ("teff between 4000 and 5200", lambda r: 4000 <= r["teff"] <= 5200),
    ("teff not between 4000 and 5200", lambda r: not 4000 <= r["teff"] <= 5200),
    ("release in ('DR1', \"DR3\")", lambda r: r["release"] in ("DR1", "DR3")),
    ("release not in ('DR1')", lambda r: r["release"] != "DR1"),
    ("sky in (-1, 3, 7) and release = 'DR2'", lambda r: r["sky"] in (-1, 3, 7) and r["release"] == "DR2"),
    ("object is null", lambda r: r["object"] is None),
    ("object is not null and feh is null", lambda r: r["object"] is not None and r["feh"] is None),
    ("abs(mgfe - 0.1) * 2 < 0.1", lambda r: abs(r["mgfe"] - 0.1) * 2 < 0.1),
    ("-feh > 2", lambda r: r["feh"] is not None and -r["feh"] > 2),
    ("teff / 1000 > 5.5", lambda r: r["teff"] / 1000 > 5.5),
    ("has_flag(low_snr)", lambda r: r["flags"] & Flag.LOW_SNR != 0),
    ("has_flag(out_of_distribution)", lambda r: r["flags"] & 32 != 0),
    (
        "not has_flag(out_of_distribution, extrapolated)",
        lambda r: r["flags"] & (Flag.OUT_OF_DISTRIBUTION | Flag.EXTRAPOLATED) == 0,
    ),
    ("not has_flag(low_snr, 'HIGH_STD')", lambda r: r["flags"] & (Flag.LOW_SNR | Flag.HIGH_STD) == 0),
    ("flags = 0 OR object is null", lambda r: r["flags"] == 0 or r["object"] is None),
    ("processed_at >= '2026-01-20'", lambda r: r["processed_at"] >= dt.datetime(2026, 1, 20, tzinfo=dt.UTC)),
    ("`feh` <= -2.5e0", lambda r: r["feh"] is not None and r["feh"] <= -2.5),
]


@pytest.mark.parametrize(("text", "predicate"), CASES)
def test_queries_select_what_python_selects(table, text, predicate):
    expected = _python(table, predicate)
    assert expected, f"test case {text!r} selects nothing"
    assert _select(table, text) == expected


@pytest.mark.parametrize(
    ("text", "message", "caret"),
    [
        ("fe_h < -1", "unknown column 'fe_h'; did you mean feh", "^^^^ (position 0)"),
        ("feh < -1 and mgfe_sd < 0.05", "did you mean mgfe_std", "^^^^^^^ (position 13)"),
        ("feh < ", "found the end of the query", "^ (position 6)"),
        ("feh < -1 mgfe > 0", "unexpected 'mgfe' (missing 'and' / 'or'?)", "(position 9)"),
        ("release = DR1", "unknown column 'DR1'", "(position 10)"),
        ("release = DR1", "quote it: 'DR1'", "(position 10)"),
        ("feh < 'low'", "cannot compare a number with a string", "(position 6)"),
        ("feh", "must be a condition", "(position 0)"),
        ("feh = null", "compare with null using 'is null'", "(position 6)"),
        ("has_flag(bright)", "unknown flag 'bright'; flags are: extrapolated, low_snr", "(position 9)"),
        ("__import__('os') = 0", "unknown function '__import__'", "(position 0)"),
        ("__import__('os').system('x')", "unexpected character '.'", "(position 16)"),
        ("feh < 1; drop", "unexpected character ';'", "(position 7)"),
        ("(feh < 1", "expected ')'", "(position 8)"),
        ("feh + 'a' > 1", "'+' needs numbers, not a string", "(position 6)"),
        ("processed_at > 'yesterday'", "not an ISO date", "(position 15)"),
        ("release in (DR1)", "quote it: 'DR1'", "(position 12)"),
        ("release in (feh)", "takes literal values", "(position 12)"),
        ("feh < 1 and teff", "'and' joins conditions, not a number", "(position 12)"),
        ("", "the query is empty", None),
    ],
)
def test_errors_name_the_problem_and_point_at_it(table, text, message, caret):
    with pytest.raises(QueryError) as info:
        parse_where(text, table.schema)
    assert message in str(info.value)
    if caret is not None:
        assert caret in str(info.value)
        assert text in str(info.value)


def test_integer_membership_is_not_truncated(table):
    # 2.5 matches no integer sky cell; a cast to int32 would have made it 2.
    assert _select(table, "sky in (2.5)") == []
    assert _select(table, "sky in (2)") == _python(table, lambda r: r["sky"] == 2)


def test_very_long_queries_are_refused(table):
    with pytest.raises(QueryError, match="limit"):
        parse_where(" or ".join(["feh < 1"] * 3000), table.schema)
