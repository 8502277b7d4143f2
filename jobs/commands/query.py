"""Query a label catalogue: filter, cone search, choose columns; print the rows or write a file.

Examples:
  speclabel query labels/ --where "feh < -1 and mgfe_std < 0.05" --columns spectrum_id,feh,mgfe
  speclabel query labels/ --cone 83.82 -5.39 0.5 --out orion.fits
  speclabel query s3://survey/labels --release DR6 --where "has_flag(high_std)" --out flagged.parquet
  speclabel query labels/ --where "snr > 20" --group-by release --aggregate count,mean(feh),q95(feh_std)

--where takes a small filter language: comparisons (< <= > >= = !=), and / or / not, parentheses,
numbers, 'quoted strings', `col in ('a', 'b')`, `col between 1 and 2`, `col is [not] null`,
+ - * /, abs(x) and has_flag(low_snr, high_std, extrapolated, heavily_masked). It is parsed, never
evaluated as code. --cone takes RA DEC RADIUS in degrees (ICRS) and adds a cone_distance column.
--group-by and --aggregate return one row per group (sorted by the group-by columns; one row in
all without --group-by) of the rows the other options select: count, count(COL) (non-null values),
mean, median, std (sample), min, max, sum or a quantile qNN (q05 = 5 %) of a column, named count,
mean_feh, q05_feh, ...; --limit then limits the groups.
Rows are the live rows of each release unless --model-id names a model. Without --out, the first
rows are printed (20 unless --limit says otherwise); --out writes .parquet, .csv or .fits (a binary
table with units for TOPCAT).
"""

from __future__ import annotations

import argparse

from ._types import non_negative_int

HELP = "query a label catalogue (filters, cone search, aggregates) and print or write the rows"
PRINT_ROWS = 20


def comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give a comma-separated list of names")
    return items


def add_release_argument(parser: argparse.ArgumentParser) -> None:
    """``--release``, as every command that reads a catalogue selects releases."""
    parser.add_argument(
        "--release",
        type=comma_list,
        action="extend",
        dest="releases",
        metavar="NAME[,NAME]",
        help="only these releases (repeatable; default: all)",
    )


def add_query_arguments(
    parser: argparse.ArgumentParser, catalogue_help: str = "catalogue folder or URI (s3://, gs://)"
) -> None:
    """The catalogue and run-selection options shared by `query`, `sql` and `stats`."""
    parser.add_argument("catalogue", metavar="CATALOGUE", help=catalogue_help)
    add_release_argument(parser)
    parser.add_argument("--model-id", help="rows labelled by this model (default: the live rows)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_query_arguments(parser)
    parser.add_argument("--where", metavar="EXPR", help='filter, e.g. "feh < -1 and mgfe_std < 0.05"')
    parser.add_argument(
        "--cone",
        type=float,
        nargs=3,
        metavar=("RA", "DEC", "RADIUS"),
        help="rows within RADIUS degrees of (RA, DEC), ICRS degrees",
    )
    parser.add_argument(
        "--columns", type=comma_list, metavar="A,B,...", help="columns to return (default: all)"
    )
    parser.add_argument(
        "--group-by",
        type=comma_list,
        action="extend",
        metavar="COL[,COL]",
        help="aggregate per group of these columns (repeatable; without --aggregate, count the rows)",
    )
    parser.add_argument(
        "--aggregate",
        type=comma_list,
        action="extend",
        dest="aggregates",
        metavar="SPEC[,SPEC]",
        help="aggregates of the selected rows, computed in DuckDB, e.g. count,mean(feh),q05(feh) "
        "(listed above; repeatable)",
    )
    parser.add_argument("--limit", type=non_negative_int, metavar="N", help="at most N rows")
    parser.add_argument("--out", metavar="FILE", help="write the rows to FILE.parquet, .csv or .fits")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from speclabel.pipeline.catalogue import Catalogue, Cone, Query
    from speclabel.pipeline.catalogue.export import format_table, output_format, write_table

    if args.out:
        output_format(args.out)  # a bad suffix is a usage error before any work
    cat = Catalogue.open(args.catalogue)
    query = Query(
        where=args.where,
        columns=tuple(args.columns) if args.columns else None,
        releases=tuple(args.releases) if args.releases else None,
        cone=Cone(*args.cone) if args.cone else None,
        model_id=args.model_id,
        limit=args.limit,
        group_by=tuple(args.group_by) if args.group_by else None,
        aggregates=tuple(args.aggregates) if args.aggregates else None,
    )
    if args.out:
        table = cat.run(query)
        fmt = write_table(table, args.out, overwrite=args.overwrite)
        print(f"query: wrote {table.num_rows} rows, {table.num_columns} columns to {args.out} ({fmt})")
        return 0
    if query.columns is None and not query.aggregated:
        query = replace(
            query, columns=tuple(_print_columns(cat.schema(query.releases, query.model_id).names))
        )
    if query.limit is not None:
        print(format_table(cat.run(query)))
        return 0
    shown = cat.run(replace(query, limit=PRINT_ROWS))
    total = cat.count(query) if shown.num_rows == PRINT_ROWS else shown.num_rows
    print(format_table(shown, total=total))
    return 0


def _print_columns(names: list[str]) -> list[str]:
    """A terminal-wide selection: identity, position and the labels with their precision."""
    from speclabel.pipeline.catalogue.layout import label_columns

    wanted = ["spectrum_id", "release", "ra", "dec", "snr"]
    for label in label_columns(names):
        wanted += [label, f"{label}_std"]
    return [name for name in [*wanted, "flags"] if name in names]
