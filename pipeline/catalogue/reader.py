"""Read a label catalogue: run selection from the index, queries (on DuckDB), Arrow datasets, joins.

:class:`Catalogue` takes the files of each release's selected run from the catalogue's index and
run manifests, never by listing folders, so on an object store a reader switches from one
published run to the next atomically and never sees half-copied files. By default the live rows of
each release are read; ``model_id`` selects, per release, the latest published run made with that
model (live, or superseded under ``_versions/``). No Ray anywhere.

:meth:`Catalogue.query`, :meth:`~Catalogue.aggregate`, :meth:`~Catalogue.run`, :meth:`~Catalogue.count`
and :meth:`~Catalogue.stream` (``speclabel query``, the Flight service) run on DuckDB
(:mod:`.query_sql`; aggregates :mod:`.aggregate`), which reads these files faster than a pyarrow scan.
The same files are also a ``pyarrow.dataset`` (:meth:`~Catalogue.arrow_dataset`) whose fragments
know their partition (``release``, ``sky``); :meth:`~Catalogue.to_dask` uses it, one partition per
file a query's filter keeps, read in the dask workers with the Arrow form of the same filter
(:meth:`~Catalogue.filter`).

A cone search prunes three times: sky partitions that overlap the cone (HEALPix cells at the
partition order), row groups whose fine ``healpix`` range cannot overlap it (cells at an order chosen
from the radius), and then rows, with an exact great-circle distance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speclabel.core.errors import InputError
from speclabel.core.layout import QUARANTINE, SALIENCY
from speclabel.core.storage import exists, read_json

from ..publish import Dataset
from .aggregate import COUNT, Aggregate, parse_aggregate
from .expr import QueryError, parse_where, unknown_column
from .layout import (
    COLUMN_TYPES,
    HEALPIX,
    PARTITIONING_SCHEMA,
    RELEASE,
    SETTINGS_FILE,
    SKY,
    CatalogueLayout,
    cone_distance,
    cone_expression,
    read_layout,
)

CONE_DISTANCE = "cone_distance"  # degrees; added to the results of a cone search


@dataclass(frozen=True)
class Cone:
    """All rows within ``radius`` degrees of (``ra``, ``dec``), ICRS degrees."""

    ra: float
    dec: float
    radius: float

    def __post_init__(self) -> None:
        values = (self.ra, self.dec, self.radius)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise QueryError(f"cone needs finite numbers RA DEC RADIUS, got {values}")
        if not -90.0 <= self.dec <= 90.0:
            raise QueryError(f"cone centre dec must be within [-90, 90] degrees, got {self.dec}")
        if not 0.0 < self.radius <= 180.0:
            raise QueryError(f"cone radius must be in (0, 180] degrees, got {self.radius}")


@dataclass(frozen=True)
class Query:
    """One catalogue query: the same object drives the library, the CLI and the Flight service."""

    where: str | None = None
    columns: tuple[str, ...] | None = None
    releases: tuple[str, ...] | None = None
    cone: Cone | None = None
    model_id: str | None = None
    limit: int | None = None
    # An aggregate query (see :mod:`.aggregate`): one row per group of these columns (one row in
    # all without them), with these aggregates (``count``, ``mean(feh)``, ...; default ``count``).
    group_by: tuple[str, ...] | None = None
    aggregates: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 0):
            raise QueryError(f"limit must be a non-negative integer, got {self.limit!r}")
        for name in ("columns", "releases", "group_by", "aggregates"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, str) or not all(isinstance(v, str) and v for v in value)
            ):
                raise QueryError(f"{name} must be a list of names, got {value!r}")
        if self.aggregated and self.columns is not None:
            raise QueryError(
                "columns do not go with group_by / aggregates: an aggregate query returns its "
                "group-by columns and its aggregates"
            )
        self.parsed_aggregates()  # a spec that is not one fails here, before any file is read

    @property
    def aggregated(self) -> bool:
        return self.group_by is not None or self.aggregates is not None

    def parsed_aggregates(self) -> list[Aggregate]:
        """The aggregates of an aggregate query, each once (``count`` when only groups are given)."""
        specs = self.aggregates or (COUNT,)
        return list(dict.fromkeys(parse_aggregate(spec) for spec in specs))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Query:
        """A query from plain data (a Flight ticket); unknown keys and wrong shapes are refused."""
        if not isinstance(data, dict):
            raise QueryError("a query must be a JSON object")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise QueryError(f"unknown query field(s) {sorted(unknown)}")
        cone = data.get("cone")
        if cone is not None:
            if isinstance(cone, dict) and set(cone) == {"ra", "dec", "radius"}:
                cone = Cone(**cone)
            elif isinstance(cone, list | tuple) and len(cone) == 3:
                cone = Cone(*cone)
            else:
                raise QueryError(f"cone must be {{ra, dec, radius}} or [ra, dec, radius], got {cone!r}")
        for name in ("where", "model_id"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise QueryError(f"{name} must be a string, got {data[name]!r}")
        lists = {
            name: tuple(data[name]) if isinstance(data.get(name), list) else data.get(name)
            for name in ("columns", "releases", "group_by", "aggregates")
        }
        where, model_id, limit = data.get("where"), data.get("model_id"), data.get("limit")
        return cls(where=where, cone=cone, model_id=model_id, limit=limit, **lists)


@dataclass(frozen=True)
class RunFiles:
    """The data files of the run selected for one release."""

    release: str
    run_id: str
    model_id: str | None
    files: tuple[str, ...]  # full paths in the catalogue's filesystem
    live: bool


@dataclass
class Catalogue:
    dataset: Dataset
    layout: CatalogueLayout
    _schemas: dict[tuple[str, str], pa.Schema] = field(default_factory=dict, repr=False)
    _engine: object = field(default=None, repr=False, compare=False)  # query_sql.QueryEngine

    @classmethod
    def open(cls, location: str | Dataset) -> Catalogue:
        """A catalogue at a local path or URI (``s3://``, ``gs://``, ``file://``)."""
        dataset = location if isinstance(location, Dataset) else Dataset.open(location)
        layout = read_layout(dataset)
        if layout is None and dataset.fs.get_file_info(dataset.root).type == pafs.FileType.NotFound:
            raise InputError(f"catalogue {dataset.location} does not exist (nothing at {dataset.root})")
        if layout is None:
            raise InputError(
                f"{dataset.location} is not a speclabel catalogue (no {SETTINGS_FILE}); "
                "catalogues are written by `speclabel label`"
            )
        return cls(dataset, layout)

    # -- what is there ----------------------------------------------------------------------------

    def index(self) -> dict:
        return self.dataset.index()

    def releases(self) -> list[str]:
        return sorted(self.index()["releases"])

    def runs(self, releases: Iterable[str] | None = None, model_id: str | None = None) -> list[RunFiles]:
        """The run to read for each release: the live one, or the latest published with ``model_id``."""
        index = self.index()["releases"]
        wanted = sorted(index) if releases is None else list(dict.fromkeys(releases))
        missing = [r for r in wanted if r not in index]
        if missing:
            raise QueryError(f"unknown release(s) {missing}; the catalogue has {sorted(index) or 'none'}")
        runs, lacking = [], []
        for release in wanted:
            entry = index[release]
            if model_id is None or entry.get("model_id") == model_id:
                manifest = self.dataset.manifest(release, entry["run_id"])
                files = tuple(self.dataset.path(f) for f in manifest["files"])
                runs.append(RunFiles(release, entry["run_id"], entry.get("model_id"), files, True))
                continue
            found = self._superseded_run(release, model_id)
            if found is None:
                lacking.append(release)
            else:
                runs.append(found)
        if model_id is not None and (not runs or (releases is not None and lacking)):
            models = {r: self._models_of(r) for r in (lacking or wanted)}
            raise QueryError(
                f"no published run with model_id {model_id!r} for release(s) {lacking}; models: {models}"
            )
        return runs

    def _manifests(self, release: str) -> list[dict]:
        folder = self.dataset.manifests_dir(release)
        return [
            read_json(self.dataset.fs, p) for p in self.dataset.files_under(folder) if p.endswith(".json")
        ]

    def _models_of(self, release: str) -> list[str]:
        return sorted({str(m.get("index", {}).get("model_id")) for m in self._manifests(release)})

    def _superseded_run(self, release: str, model_id: str) -> RunFiles | None:
        prefix = f"release={release}/"
        candidates = [m for m in self._manifests(release) if m.get("index", {}).get("model_id") == model_id]
        for manifest in sorted(candidates, key=lambda m: m["run_id"], reverse=True):
            base = self.dataset.version_dir(release, manifest["run_id"])
            files = tuple(f"{base}/{f[len(prefix) :]}" for f in manifest["files"] if f.startswith(prefix))
            # A manifest alone does not prove publication (a crash may precede the swap): the
            # superseded files must be there.
            if len(files) == len(manifest["files"]) and all(exists(self.dataset.fs, f) for f in files):
                return RunFiles(release, manifest["run_id"], model_id, files, False)
        return None

    # -- the Arrow dataset ------------------------------------------------------------------------

    def arrow_dataset(
        self, releases: Iterable[str] | None = None, model_id: str | None = None
    ) -> pads.Dataset:
        """A ``pyarrow.dataset`` of the selected runs' files with ``release`` and ``sky`` partitions."""
        return self.dataset_of_runs(self.runs(releases, model_id))

    def dataset_of_runs(self, runs: Sequence[RunFiles], schema: pa.Schema | None = None) -> pads.Dataset:
        """The runs' files as one dataset (of ``schema``, default the runs' own columns)."""
        fmt = pads.ParquetFileFormat()
        fragments = []
        for run in runs:
            for path in run.files:
                cell = int(path.rsplit(f"/{SKY}=", 1)[1].split("/", 1)[0])
                partition = (pc.field(RELEASE) == run.release) & (
                    pc.field(SKY) == pa.scalar(cell, pa.int32())
                )
                fragments.append(fmt.make_fragment(path, self.dataset.fs, partition_expression=partition))
        schema = self.schema_of_runs(runs) if schema is None else schema
        return pads.FileSystemDataset(fragments, schema, fmt, self.dataset.fs)

    def schema_of_runs(self, runs: Sequence[RunFiles]) -> pa.Schema:
        """The union of the runs' file schemas (one footer read per run: a run writes one schema)."""
        schemas = []
        for run in runs:
            if not run.files:
                continue
            key = (run.release, run.run_id)
            if key not in self._schemas:
                with self.dataset.fs.open_input_file(run.files[0]) as fh:
                    self._schemas[key] = pq.read_schema(fh).remove_metadata()
            schemas.append(self._schemas[key])
        if not schemas:  # no rows at all: the documented columns, so queries still validate
            schemas = [pa.schema([(n, t) for n, t in COLUMN_TYPES.items() if not n.endswith("_members")])]
        return pa.unify_schemas([*schemas, PARTITIONING_SCHEMA])

    def schema(self, releases: Iterable[str] | None = None, model_id: str | None = None) -> pa.Schema:
        return self.schema_of_runs(self.runs(releases, model_id))

    # -- queries ----------------------------------------------------------------------------------

    def filter(self, query: Query, schema: pa.Schema) -> pc.Expression | None:
        """The Arrow form of ``query``'s rows (where and cone), for pyarrow reads (:meth:`to_dask`)."""
        parts = []
        if query.where:
            parts.append(parse_where(query.where, schema))
        if query.cone is not None:
            parts.append(self.cone_filter(query.cone))
        if not parts:
            return None
        expression = parts[0]
        for part in parts[1:]:
            expression = expression & part
        return expression

    def cone_filter(self, cone: Cone) -> pc.Expression:
        """Sky partitions, then fine HEALPix ranges (row-group pruning), then the exact distance."""
        layout = self.layout
        sky_cells = layout.cone_cells(cone.ra, cone.dec, cone.radius, layout.sky_order)
        in_sky = pc.field(SKY).isin(pa.array(sky_cells, pa.int32()))
        order = layout.range_order(cone.radius)
        ranges = layout.fine_ranges(layout.cone_cells(cone.ra, cone.dec, cone.radius, order), order)
        in_ranges = None
        for lo, hi in ranges:
            part = (pc.field(HEALPIX) >= lo) & (pc.field(HEALPIX) <= hi)
            in_ranges = part if in_ranges is None else in_ranges | part
        return in_sky & in_ranges & cone_expression(cone.ra, cone.dec, cone.radius)

    def _projection(self, query: Query, schema: pa.Schema) -> dict[str, pc.Expression]:
        return {
            name: cone_distance(query.cone.ra, query.cone.dec) if name == CONE_DISTANCE else pc.field(name)
            for name in projected_names(query, schema)
        }

    def query(
        self,
        where: str | None = None,
        *,
        columns: Sequence[str] | None = None,
        releases: Sequence[str] | None = None,
        cone: Cone | tuple[float, float, float] | None = None,
        model_id: str | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """Rows matching the query as an Arrow table, e.g. ``cat.query("feh < -1 and mgfe_std < 0.05",
        columns=["spectrum_id", "feh"], cone=(83.8, -5.4, 1.0))``; cone = (ra, dec, radius), degrees."""
        return self.run(build_query(where, columns, releases, cone, model_id, limit))

    def aggregate(
        self,
        aggregates: Sequence[str] = (COUNT,),
        *,
        group_by: Sequence[str] | None = None,
        where: str | None = None,
        releases: Sequence[str] | None = None,
        cone: Cone | tuple[float, float, float] | None = None,
        model_id: str | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """Aggregates of the rows a query selects, computed in DuckDB, one row per group (sorted by
        the group-by columns), e.g. ``cat.aggregate(["count", "mean(feh)", "q95(feh_std)"],
        group_by=["release"], where="snr > 20")``; the specs are listed in :mod:`.aggregate`."""
        return self.run(aggregate_query(aggregates, group_by, where, releases, cone, model_id, limit))

    def run(self, query: Query) -> pa.Table:
        """The result of ``query``: its rows, or for an aggregate query (``group_by`` /
        ``aggregates``) its groups."""
        return self._queries().table(query)

    def stream(self, query: Query, batch_rows: int = 64 * 1024) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """The result's schema and its record batches, read as they are consumed (close the
        iterator to stop early)."""
        return self._queries().stream(query, batch_rows)

    def result_schema(self, query: Query) -> pa.Schema:
        """The schema of ``query``'s result, without reading rows."""
        return self._queries().schema(query)

    def _queries(self):
        """The DuckDB engine of :meth:`run`, :meth:`count` and :meth:`stream` (:mod:`.query_sql`)."""
        if self._engine is None:
            from .query_sql import QueryEngine

            self._engine = QueryEngine(self)
        return self._engine

    def sql(
        self, text: str, *, releases: Sequence[str] | None = None, model_id: str | None = None
    ) -> pa.Table:
        """One SQL ``SELECT`` over the views ``labels``, ``quarantine`` and ``saliency`` (DuckDB,
        sandboxed; see :mod:`.sql`), e.g. ``cat.sql("SELECT release, avg(feh) FROM labels GROUP BY 1")``."""
        from .sql import sql

        return sql(self, text, releases=releases, model_id=model_id)

    def count(self, query: Query) -> int:
        return self._queries().count(query)

    def to_pandas(self, where: str | None = None, **kwargs):
        return self.query(where, **kwargs).to_pandas()

    def to_dask(
        self,
        where: str | None = None,
        *,
        columns: Sequence[str] | None = None,
        releases: Sequence[str] | None = None,
        cone: Cone | tuple[float, float, float] | None = None,
        model_id: str | None = None,
    ):
        """A lazy dask DataFrame, one partition per file that the query's pruning keeps."""
        import dask.dataframe as dd

        query = build_query(where, columns, releases, cone, model_id, None)
        dataset = self.arrow_dataset(query.releases, query.model_id)
        expression = self.filter(query, dataset.schema)
        projection = self._projection(query, dataset.schema)
        fragments = [
            (f.path, f.partition_expression)
            for f in dataset.get_fragments(filter=pc.scalar(True) if expression is None else expression)
        ]
        meta = dataset.scanner(columns=projection).projected_schema.empty_table().to_pandas()
        if not fragments:
            return dd.from_pandas(meta, npartitions=1)
        return dd.from_map(
            _read_fragment,
            fragments,
            location=self.dataset.location,
            schema=dataset.schema,
            projection=projection,
            expression=expression,
            meta=meta,
            enforce_metadata=False,
        )

    # -- joins ------------------------------------------------------------------------------------

    def quarantine(self, releases: Sequence[str] | None = None, model_id: str | None = None) -> pa.Table:
        """The rows the selected runs refused: ``spectrum_id, reason, detail, source, release, run_id``."""
        tables = []
        for run in self.runs(releases, model_id):
            table = self._side_table(QUARANTINE, run)
            if table is not None:
                tables.append(table)
        if not tables:
            from speclabel.core.contract import QUARANTINE_SCHEMA

            return _with_run(QUARANTINE_SCHEMA.empty_table(), "", "")
        return pa.concat_tables(tables, promote_options="default")

    def saliency(self, release: str, model_id: str | None = None) -> pa.Table | None:
        """The full saliency maps the selected run of ``release`` wrote (``--saliency full``), if any."""
        (run,) = self.runs([release], model_id)
        return self._side_table(SALIENCY, run)

    def _side_table(self, kind: str, run: RunFiles, filter: pc.Expression | None = None) -> pa.Table | None:
        folder = self.dataset.side_dir(kind, run.release, run.run_id)
        files = [p for p in self.dataset.files_under(folder) if p.endswith(".parquet")]
        if not files:
            return None
        table = pads.dataset(files, format="parquet", filesystem=self.dataset.fs).to_table(filter=filter)
        return _with_run(table, run.release, run.run_id)

    def join_saliency(self, table: pa.Table, model_id: str | None = None) -> pa.Table:
        """``table`` (catalogue rows with ``spectrum_id`` and ``release``) with the saliency map
        columns of each row appended; rows without a stored map get nulls."""
        for name in ("spectrum_id", RELEASE):
            if name not in table.column_names:
                raise QueryError(f"join_saliency needs a {name!r} column in the table")
        pieces = []
        for release in pc.unique(table.column(RELEASE)).to_pylist():
            rows = table.filter(pc.field(RELEASE) == release)
            (run,) = self.runs([release], model_id)
            ids = rows.column("spectrum_id")
            maps = self._side_table(SALIENCY, run, pc.field("spectrum_id").isin(pc.unique(ids)))
            if maps is None:
                pieces.append(rows)
                continue
            maps = maps.drop_columns([c for c in (RELEASE, "run_id") if c in maps.column_names])
            pieces.append(left_join_by_id(rows, maps, suffix="_saliency"))
        return pa.concat_tables(pieces, promote_options="default") if pieces else table

    def lookup(
        self,
        spectrum_ids: Sequence[str],
        *,
        columns: Sequence[str] | None = None,
        releases: Sequence[str] | None = None,
        model_id: str | None = None,
    ) -> pa.Table:
        """What became of each spectrum: one row per (id, release) where it was labelled
        (``status = labelled`` and its label columns) or quarantined (``status = quarantined``,
        ``reason``, ``detail``), and ``status = absent`` for ids found in no selected release."""
        ids = pa.array(list(dict.fromkeys(spectrum_ids)), pa.string())
        wanted = pc.field("spectrum_id").isin(ids)
        dataset = self.arrow_dataset(releases, model_id)
        query = Query(columns=tuple(columns) if columns else None)
        labelled = dataset.to_table(columns=self._projection(query, dataset.schema), filter=wanted)
        labelled = labelled.append_column("status", pa.array(["labelled"] * labelled.num_rows, pa.string()))
        quarantined = self.quarantine(releases, model_id).filter(wanted)
        quarantined = quarantined.append_column(
            "status", pa.array(["quarantined"] * quarantined.num_rows, pa.string())
        )
        found = set(labelled.column("spectrum_id").to_pylist()) | set(
            quarantined.column("spectrum_id").to_pylist()
        )
        absent = [i for i in ids.to_pylist() if i not in found]
        missing = pa.table({"spectrum_id": pa.array(absent, pa.string()), "status": ["absent"] * len(absent)})
        return pa.concat_tables([labelled, quarantined, missing], promote_options="default")


def projected_names(query: Query, schema: pa.Schema) -> list[str]:
    """The columns of ``query``'s result (checked against ``schema``), ``cone_distance`` last for a
    cone search unless placed."""
    names = list(query.columns) if query.columns else list(schema.names)
    for name in names:
        if name not in schema.names and not (name == CONE_DISTANCE and query.cone is not None):
            raise QueryError(unknown_column(name, schema.names, where=" in the column list"))
    if query.cone is not None and CONE_DISTANCE not in names:
        names.append(CONE_DISTANCE)
    return list(dict.fromkeys(names))


def left_join_by_id(left: pa.Table, right: pa.Table, *, key: str = "spectrum_id", suffix: str) -> pa.Table:
    """``left`` with ``right``'s columns for the matching key (first match; nulls where none).

    Arrow's hash join does not carry list columns (saliency maps are lists), so this aligns rows
    with ``index_in`` and ``take`` instead.
    """
    positions = pc.index_in(left.column(key), value_set=right.column(key))
    for name in right.column_names:
        if name == key:
            continue
        target = name if name not in left.column_names else f"{name}{suffix}"
        left = left.append_column(target, right.column(name).take(positions))
    return left


def _with_run(table: pa.Table, release: str, run_id: str) -> pa.Table:
    n = table.num_rows
    table = table.append_column(RELEASE, pa.array([release] * n, pa.string()))
    return table.append_column("run_id", pa.array([run_id] * n, pa.string()))


def build_query(where=None, columns=None, releases=None, cone=None, model_id=None, limit=None) -> Query:
    """A :class:`Query` from the keyword arguments of :meth:`Catalogue.query` (cone as a 3-tuple)."""
    if cone is not None and not isinstance(cone, Cone):
        cone = Cone(*(float(v) for v in cone))
    return Query(
        where=where,
        columns=tuple(columns) if columns is not None else None,
        releases=tuple(releases) if releases is not None else None,
        cone=cone,
        model_id=model_id,
        limit=limit,
    )


def aggregate_query(
    aggregates=(COUNT,), group_by=None, where=None, releases=None, cone=None, model_id=None, limit=None
) -> Query:
    """An aggregate :class:`Query` from the keyword arguments of :meth:`Catalogue.aggregate`."""
    query = build_query(where, None, releases, cone, model_id, limit)
    group_by = tuple(group_by) if group_by is not None else None
    return replace(query, group_by=group_by, aggregates=tuple(aggregates))


def _read_fragment(fragment, *, location, schema, projection, expression):
    """One dask partition: one catalogue file, read with the query's projection and filter."""
    path, partition = fragment
    dataset = Dataset.open(location)
    piece = pads.ParquetFileFormat().make_fragment(path, dataset.fs, partition_expression=partition)
    table = pads.FileSystemDataset([piece], schema, pads.ParquetFileFormat(), dataset.fs).to_table(
        columns=projection, filter=expression
    )
    return table.to_pandas()
