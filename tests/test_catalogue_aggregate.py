"""Aggregate specs (`speclabel query --aggregate`): parsing, checks against a schema, the Query fields."""

import pyarrow as pa
import pytest

from speclabel.pipeline.catalogue import Query, QueryError
from speclabel.pipeline.catalogue.aggregate import (
    Aggregate,
    aggregate_items,
    check_aggregates,
    parse_aggregate,
)
from speclabel.pipeline.catalogue.query_sql import _run

SCHEMA = pa.schema(
    [
        ("spectrum_id", pa.string()),
        ("feh", pa.float32()),
        ("flags", pa.int32()),
        ("feh_members", pa.list_(pa.float32())),
        ("processed_at", pa.timestamp("us", tz="UTC")),
        ("mean_feh", pa.float32()),
    ]
)


def test_specs_parse_to_a_function_a_column_and_a_result_name():
    assert parse_aggregate("count") == parse_aggregate(" COUNT( * ) ") == Aggregate("count")
    assert parse_aggregate("Mean( feh )") == Aggregate("mean", "feh")
    assert [parse_aggregate(s).name for s in ("count", "count(feh)", "q05(feh)", "std(flags)")] == [
        "count",
        "count_feh",
        "q05_feh",
        "std_flags",
    ]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("avg(feh)", "unknown aggregate function 'avg'"),
        ("q5(feh)", "unknown aggregate function 'q5'"),
        ("mean", r"needs a column, e.g. mean\(feh\)"),
        ("mean(feh", "cannot read the aggregate"),
        ("mean(feh) + 1", "cannot read the aggregate"),
        ("1; DROP TABLE labels", "cannot read the aggregate"),
    ],
)
def test_unreadable_specs_are_refused_with_the_list_of_aggregates(spec, message):
    with pytest.raises(QueryError, match=message) as info:
        parse_aggregate(spec)
    assert "median(COL)" in str(info.value) or "needs a column" in str(info.value)


def test_columns_are_checked_against_the_schema_and_their_use():
    check_aggregates(
        ["spectrum_id", "flags"],
        [parse_aggregate(s) for s in ("count(feh_members)", "min(processed_at)", "sum(flags)", "q95(feh)")],
        SCHEMA,
    )
    refused = [
        ([], "mean(spectrum_id)", "'spectrum_id' is string; mean needs a numeric column"),
        ([], "median(processed_at)", "median needs a numeric column"),
        ([], "max(spectrum_id)", "max needs a numeric or timestamp column"),
        ([], "mean(fe)", "unknown column 'fe' in mean.fe.; did you mean feh"),
        (["feh_members"], "count", "cannot group by 'feh_members': it is a list column"),
        (["release"], "count", "unknown column 'release' in the group-by columns"),
        (["mean_feh"], "mean(feh)", "two columns named 'mean_feh'"),
    ]
    for group_by, spec, message in refused:
        with pytest.raises(QueryError, match=message):
            check_aggregates(group_by, [parse_aggregate(spec)], SCHEMA)
    # Computed columns (a cone search's distance) are float64 values to aggregate.
    check_aggregates([], [parse_aggregate("max(cone_distance)")], SCHEMA, extra=["cone_distance"])


def test_query_carries_aggregates_through_its_json_form():
    query = Query(where="feh < 0", group_by=("release",), aggregates=("count", "mean(feh)"), limit=3)
    assert Query.from_dict({**query.to_dict(), "group_by": ["release"]}) == query
    assert Query(group_by=("release",)).parsed_aggregates() == [Aggregate("count")]
    assert Query(aggregates=("mean(feh)", "Mean(feh)")).parsed_aggregates() == [Aggregate("mean", "feh")]
    with pytest.raises(QueryError, match="columns do not go with group_by / aggregates"):
        Query(columns=("feh",), aggregates=("count",))
    with pytest.raises(QueryError, match="unknown aggregate function 'avg'"):
        Query.from_dict({"aggregates": ["avg(feh)"]})
    with pytest.raises(QueryError, match="group_by must be a list of names"):
        Query(group_by="release")


def test_an_integer_sum_is_int64_and_its_overflow_a_query_error():
    import duckdb

    schema = pa.schema([("healpix", pa.int64())])
    (item,) = aggregate_items([], [parse_aggregate("sum(healpix)")], schema, {})

    def total(*values):
        rows = ", ".join(f"({v})" for v in values)
        return _run(lambda: duckdb.sql(f"SELECT {item} FROM (VALUES {rows}) t(healpix)").to_arrow_table())

    table = total(2**62, 2**61, -5)
    assert table.schema.field("sum_healpix").type == pa.int64()
    assert table.column(0).to_pylist() == [2**62 + 2**61 - 5]
    with pytest.raises(QueryError, match="arithmetic overflows"):
        total(2**62, 2**62)
