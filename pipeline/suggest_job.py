"""``speclabel suggest`` over a catalogue: a Ray Data scoring pass, then a bounded selection.

The scoring pass streams: one Ray task per ``files_per_task`` live files of the selected releases
(the catalogue's index, as ``speclabel query`` reads it) reads each file in record batches with the
query's ``--where`` filter (``Catalogue.filter``), drops the rows that may not be suggested (a
disqualifying flag, an ``--exclude`` id), scores the rest (``pipeline.suggest.score_parts``) and
returns only each file's ``per_partition`` best-scored rows (a file lies in one sky partition). The
driver keeps at most ``per_partition`` rows per sky partition as the tasks' results arrive
(``CandidatePools``), then picks the N with k-center (or k-median) within partitions and a merge
(``pipeline.suggest.select``), away from the model's reference stars where it has them.
Rows held anywhere: ``per_partition`` per task and per partition, whatever the catalogue's size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speclabel.core.errors import InputError

from .catalogue import Catalogue, Query
from .catalogue.layout import RELEASE, SKY
from .catalogue.reader import RunFiles
from .suggest import (
    DEFAULT_DIVERSITY,
    DISQUALIFYING,
    SCORE_COLUMNS,
    CandidatePools,
    diversity_method,
    score_parts,
    select,
    top_rows,
)

log = logging.getLogger(__name__)

IDENTITY = (("spectrum_id", pa.string()), ("ra", pa.float64()), ("dec", pa.float64()), ("snr", pa.float32()))


@dataclass(frozen=True)
class SuggestOptions:
    n: int
    where: str | None = None
    releases: tuple[str, ...] | None = None
    exclude: frozenset[str] = field(default_factory=frozenset)
    per_partition: int = 10_000  # candidate rows held per sky partition (and per scoring task)
    weighted: bool = True  # selection gains weighted by the score
    diversity: str = DEFAULT_DIVERSITY  # "k-center" or "k-median" (pipeline.suggest.DIVERSITY)
    batch_rows: int = 16_384  # rows read at a time in a scoring task
    files_per_task: int = 4  # catalogue files one scoring task reads, one after the other
    num_cpus: float = 0.5  # per scoring task (below 1: leaves room on small machines, stack notes)

    def __post_init__(self) -> None:
        if min(self.n, self.per_partition, self.batch_rows, self.files_per_task) < 1:
            raise InputError("n, per_partition, batch_rows and files_per_task must be >= 1")
        diversity_method(self.diversity)  # an unknown name fails here, before the scoring pass


@dataclass(frozen=True)
class Suggestions:
    table: pa.Table  # the picks, in rank order
    scanned_files: int
    candidates: int  # rows the scoring tasks returned (at most per_partition per file)
    peak_rows: int  # candidate rows the driver held at most
    other_models: dict[str, str]  # release -> model_id of live runs labelled by another model
    covered: int = 0  # reference stars the picks were spread away from

    def summary(self) -> str:
        text = (
            f"suggest: {self.table.num_rows} picks of {self.candidates} candidates from "
            f"{self.scanned_files} files (at most {self.peak_rows} held at once)"
        )
        if self.covered:
            text += f", away from the model's {self.covered} reference stars"
        for release, model_id in sorted(self.other_models.items()):
            text += f"\nwarning: release {release} was labelled by model {model_id}, not by --model"
        return text


def output_schema(label_names: Sequence[str]) -> pa.Schema:
    """The columns of the scored candidates (and, with ``rank``, of the output)."""
    fields = [*IDENTITY, (RELEASE, pa.string()), (SKY, pa.int32())]
    fields += [(name, pa.float64()) for name in label_names]
    return pa.schema(fields + [(name, pa.float64()) for name in SCORE_COLUMNS])


def scored_candidates(
    table: pa.Table, label_names: Sequence[str], widths: np.ndarray, exclude: frozenset[str]
) -> pa.Table:
    """The rows of a catalogue batch that may be suggested, with their score and its parts."""
    flags = table.column("flags").fill_null(0).to_numpy() if "flags" in table.column_names else 0
    keep = (np.asarray(flags) & int(DISQUALIFYING)) == 0
    if exclude:
        keep &= ~pc.is_in(table.column("spectrum_id"), pa.array(sorted(exclude), pa.string())).to_numpy(
            zero_copy_only=False
        )
    table = table.filter(pa.array(np.broadcast_to(keep, (table.num_rows,))))

    def matrix(suffix: str) -> np.ndarray | None:
        names = [f"{n}{suffix}" for n in label_names]
        if not any(n in table.column_names for n in names):
            return None
        return np.stack([_floats(table, n) for n in names], axis=1)

    std = matrix("_std")
    std = np.full((table.num_rows, len(label_names)), np.nan) if std is None else std
    ood = _floats(table, "ood_score") if "ood_score" in table.column_names else None
    parts = score_parts(std, matrix("_err"), ood, widths)
    schema = output_schema(label_names)
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.array(parts[f.name])
        if f.name in parts
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _floats(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()


def score_files(
    items: pa.Table,
    *,
    location: str,
    runs: dict[str, RunFiles],
    where: str | None,
    label_names: Sequence[str],
    widths: np.ndarray,
    options: SuggestOptions,
) -> Iterator[pa.Table]:
    """A Ray Data batch of files (``release``, ``path``): each file's ``per_partition`` best rows."""
    catalogue = Catalogue.open(location)
    for release, path in zip(
        items.column("release").to_pylist(), items.column("path").to_pylist(), strict=True
    ):
        run = runs[release]
        one = RunFiles(run.release, run.run_id, run.model_id, (path,), run.live)
        dataset = catalogue.dataset_of_runs([one])
        expression = catalogue.filter(Query(where=where), dataset.schema)
        wanted = {"spectrum_id", "ra", "dec", "snr", "flags", "ood_score", RELEASE, SKY}
        for name in label_names:
            wanted |= {name, f"{name}_std", f"{name}_err"}
        columns = [n for n in dataset.schema.names if n in wanted]
        best = pa.Table.from_pylist([], schema=output_schema(label_names))
        for batch in dataset.to_batches(columns=columns, filter=expression, batch_size=options.batch_rows):
            scored = scored_candidates(pa.Table.from_batches([batch]), label_names, widths, options.exclude)
            best = top_rows(pa.concat_tables([best, scored]), options.per_partition)
        yield best


def suggest(
    catalogue: Catalogue,
    label_names: Sequence[str],
    widths: np.ndarray,
    options: SuggestOptions,
    *,
    model_id: str | None = None,
    covered: np.ndarray | None = None,
) -> Suggestions:
    """The N picks of the live rows of ``catalogue`` (Ray must be running: ``ray_session``).

    ``label_names`` and ``widths``: the model's labels and the training labels' spreads
    (``model.calibration.prior_widths``); ``model_id``: the model's id, to warn about releases whose
    live rows another model labelled (their err and ood_score are not this model's); ``covered``:
    the model's reference stars in the selection's space (``pipeline.suggest.covered_points``),
    so the picks fill the gaps they leave."""
    import ray.data

    runs = catalogue.runs(options.releases)
    schema = catalogue.schema_of_runs(runs)
    missing = [n for n in label_names if n not in schema.names]
    if missing:
        raise InputError(f"the catalogue has no column(s) {missing} for the model's labels")
    catalogue.filter(Query(where=options.where), schema)  # a bad --where fails here
    items = [{"release": run.release, "path": path} for run in runs for path in run.files]
    pools = CandidatePools(options.per_partition)
    if items:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        blocks = -(-len(items) // options.files_per_task)
        dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            score_files,
            fn_kwargs={
                "location": catalogue.dataset.location,
                "runs": {run.release: run for run in runs},
                "where": options.where,
                "label_names": tuple(label_names),
                "widths": np.asarray(widths, dtype=np.float64),
                "options": options,
            },
            batch_size=options.files_per_task,
            batch_format="pyarrow",
            num_cpus=options.num_cpus,
        )
        dataset.context.enable_progress_bars = False
        for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            pools.add(block.cast(output_schema(label_names)))
    picks = select(
        pools,
        options.n,
        label_names,
        widths,
        weighted=options.weighted,
        diversity=options.diversity,
        covered=covered,
    )
    other = {run.release: str(run.model_id) for run in runs if model_id and run.model_id != model_id}
    held = 0 if covered is None else len(covered)
    return Suggestions(picks.drop_columns([SKY]), len(items), pools.seen, pools.peak_rows, other, held)
