"""Catalogue query speed against DuckDB over the same files, on a multi-million-row catalogue.

Writes a catalogue of synthetic label rows (two releases, 4MOST-like fields, 1 % without a
position, 8 ensemble members) with the catalogue writer, then times, in one run:

- a partition-pruned filter: release DR2 and a label cut,
- a cone search (1 degree around a field centre),
- a full-scan aggregate (rows and mean [Fe/H] per release),

with `speclabel query` (`Catalogue.run`: the index read on every call, the --where text parsed and
rendered to SQL, run on the catalogue's DuckDB database, opened once as DuckDB's connection is; the
aggregate is `--group-by release --aggregate count(feh),mean(feh)`), with `speclabel sql` (the same
SQL over the sandboxed `labels` view of the index's files; one sandbox, set up once) and with raw
DuckDB's read_parquet over the same files and the same predicates, each the median of --repeat runs,
the three interleaved in turns, as wall time and as this process's CPU time (which a loaded machine
disturbs far less), and checks all three return the same rows and aggregates.

    python bench/query.py                         # 2 million rows (~2 minutes to write)
    python bench/query.py --rows 200000 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speclabel.core.setups import get_setup
from speclabel.pipeline.catalogue import Catalogue, Cone, Query, write_release
from speclabel.pipeline.catalogue.sql import CatalogueSql, SqlLimits
from speclabel.pipeline.simulate import survey_fields
from speclabel.pipeline.simulate.catalogue import SyntheticCatalogue, iter_synthetic

FIELDS = dict(n_fields=2000, field_radius_deg=1.2, positionless_fraction=0.01, n_members=8)
COLUMNS = ["spectrum_id", "ra", "dec", "feh", "mgfe", "mgfe_std"]
WHERE = "feh < -1 and mgfe_std < 0.05"


def write(root: str, rows: int) -> tuple[float, int, int]:
    setup = get_setup()
    start = time.perf_counter()
    for i, release in enumerate(("DR1", "DR2")):
        config = SyntheticCatalogue(release=release, model_id="bench", run_id="bench", seed=i, **FIELDS)
        write_release(root, release, iter_synthetic(setup, config, rows // 2, 200_000), model_id="bench")
    elapsed = time.perf_counter() - start
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".parquet")]
    return elapsed, len(files), sum(os.path.getsize(f) for f in files)


def timed(fns, repeat: int) -> list[tuple[float, float, object]]:
    """(median wall s, median process CPU s, result) of each of ``fns``, their repeats interleaved
    and their order rotated so that a change in the machine's load meets all of them alike."""
    walls, cpus, results = [[] for _ in fns], [[] for _ in fns], [None] * len(fns)
    for r in range(repeat):
        for i in (np.arange(len(fns)) + r) % len(fns):
            start, cpu = time.perf_counter(), time.process_time()
            results[i] = fns[i]()
            walls[i].append(time.perf_counter() - start)
            cpus[i].append(time.process_time() - cpu)
    return [
        (statistics.median(w), statistics.median(c), r) for w, c, r in zip(walls, cpus, results, strict=True)
    ]


def duckdb_cone_sql(cat: Catalogue, cone: Cone) -> str:
    """The same three-stage predicate the reader builds: sky cells, fine ranges, haversine."""
    layout = cat.layout
    cells = layout.cone_cells(cone.ra, cone.dec, cone.radius, layout.sky_order)
    order = layout.range_order(cone.radius)
    ranges = layout.fine_ranges(layout.cone_cells(cone.ra, cone.dec, cone.radius, order), order)
    in_ranges = " OR ".join(f"healpix BETWEEN {lo} AND {hi}" for lo, hi in ranges)
    hav = (
        f"pow(sin(radians(dec - {cone.dec}) / 2), 2) + cos(radians(dec)) * cos(radians({cone.dec})) "
        f"* pow(sin(radians(ra - {cone.ra}) / 2), 2)"
    )
    return (
        f"SELECT {', '.join(COLUMNS)}, degrees(2 * asin(sqrt(least({hav}, 1.0)))) AS cone_distance "
        "FROM {table} "
        f"WHERE sky IN ({', '.join(str(c) for c in cells)}) AND ({in_ranges}) "
        f"AND {hav} <= {float(np.sin(np.radians(cone.radius) / 2) ** 2)!r}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tmp", default=None, help="folder for the catalogue (removed afterwards)")
    parser.add_argument("--keep", metavar="DIR", help="write the catalogue to DIR and keep it")
    args = parser.parse_args()
    import duckdb

    threads = os.cpu_count() or 1
    print(f"# {platform.node()} {threads} CPUs, {time.strftime('%Y-%m-%d')}, {args.rows} rows")
    workdir = args.keep or tempfile.mkdtemp(dir=args.tmp)
    root = os.path.join(workdir, "catalogue")
    try:
        if not os.path.exists(root):
            seconds, n_files, size = write(root, args.rows)
            rate = args.rows / seconds
            mb = size / 1e6
            print(
                f"write: {seconds:.1f} s ({rate:,.0f} rows/s incl. generation), {n_files} files, {mb:.0f} MB"
            )
        cat = Catalogue.open(root)
        con = duckdb.connect()
        con.execute(f"SET threads = {threads}")
        con.execute(
            f"CREATE VIEW cat AS SELECT * FROM read_parquet('{root}/release=*/sky=*/*.parquet', "
            "hive_partitioning = true, hive_types = {'release': VARCHAR, 'sky': INTEGER})"
        )
        ra0, dec0 = (float(v[7]) for v in survey_fields(0, FIELDS["n_fields"]))
        cone = Cone(ra0, dec0, 1.0)

        cat.run(Query(limit=0))  # opens the catalogue's DuckDB database, as `con` above is open

        cases = [
            (
                "filter (release DR2, labels)",
                lambda: cat.run(Query(where=WHERE, columns=tuple(COLUMNS), releases=("DR2",))),
                f"SELECT {', '.join(COLUMNS)} FROM {{table}} "
                "WHERE release = 'DR2' AND feh < -1 AND mgfe_std < 0.05",
            ),
            (
                "cone search (1 deg)",
                lambda: cat.run(Query(columns=tuple(COLUMNS), cone=cone)),
                duckdb_cone_sql(cat, cone),
            ),
            (
                "full-scan aggregate",
                lambda: cat.run(Query(group_by=("release",), aggregates=("count(feh)", "mean(feh)"))),
                "SELECT release, count(feh), avg(feh) FROM {table} GROUP BY release",
            ),
        ]
        start = time.perf_counter()
        sandbox = CatalogueSql(cat, limits=SqlLimits(threads=threads))
        print(f"speclabel sql: sandbox over the index's files set up in {time.perf_counter() - start:.3f} s")
        print(
            f"{'query':<30} {'rows':>8} {'query s':>8} {'sql s':>7} {'duckdb s':>9} "
            f"{'query/duckdb':>12} {'sql/duckdb':>10} {'CPU: query/duckdb':>17} {'sql/duckdb':>10}"
        )
        for name, ours, sql in cases:
            (ours_s, ours_cpu, ours_table), (sql_s, sql_cpu, sql_table), (duck_s, duck_cpu, duck_table) = (
                timed(
                    [
                        ours,
                        lambda sql=sql: sandbox.table(sql.format(table="labels")),
                        lambda sql=sql: con.sql(sql.format(table="cat")).to_arrow_table(),
                    ],
                    args.repeat,
                )
            )
            _check_same(name, ours_table, duck_table)
            _check_same(name, sql_table, duck_table)
            print(
                f"{name:<30} {ours_table.num_rows:>8} {ours_s:>8.3f} {sql_s:>7.3f} {duck_s:>9.3f} "
                f"{ours_s / duck_s:>12.2f} {sql_s / duck_s:>10.2f} "
                f"{ours_cpu / duck_cpu:>17.2f} {sql_cpu / duck_cpu:>10.2f}"
            )
        sandbox.close()
        ((stats_s, _, _),) = timed([lambda: _stats(cat)], max(1, args.repeat // 2))
        print(f"{'speclabel stats (all columns)':<30} {'':>8} {stats_s:>12.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _stats(cat: Catalogue) -> dict:
    from speclabel.pipeline.catalogue.stats import catalogue_stats

    return catalogue_stats(cat)


def _check_same(name: str, ours: pa.Table, theirs: pa.Table) -> None:
    if ours.num_rows != theirs.num_rows:
        raise SystemExit(f"{name}: speclabel returned {ours.num_rows} rows, DuckDB {theirs.num_rows}")
    if "spectrum_id" in ours.column_names:
        a = pc.sort_indices(ours.column("spectrum_id"))
        b = pc.sort_indices(theirs.column("spectrum_id"))
        if ours.column("spectrum_id").take(a) != theirs.column("spectrum_id").take(b):
            raise SystemExit(f"{name}: speclabel and DuckDB returned different rows")
        return
    # Aggregates: the same values per group (columns in the same order, named differently).
    a, b = (t.take(pc.sort_indices(t.column(0))) for t in (ours, theirs))
    for x, y in zip(a.columns, b.columns, strict=True):
        same = x == y if pa.types.is_string(x.type) else np.allclose(x.to_numpy(), y.to_numpy(), rtol=1e-9)
        if not same:
            raise SystemExit(f"{name}: speclabel and DuckDB returned different aggregates")


if __name__ == "__main__":
    main()
