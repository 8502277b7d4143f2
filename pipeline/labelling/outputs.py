"""The driver's end of a label run: split the output stream, stage every output, count every row.

:class:`RunOutputs` receives the actors' output batches (:mod:`.batch`) and stages, under
``_staging/<run>/``:

* catalogue rows, through :class:`~speclabel.pipeline.catalogue.CatalogueWriter`
  (``release=<R>/sky=<k>/part-<run>-*.parquet``);
* quarantine rows (``spectrum_id, reason, detail, source``) in ``_quarantine/``;
* full saliency maps of the selected spectra (``spectrum_id, saliency_<label>``: list<float32> over
  the model's grid) in ``_saliency/``;
* the population-averaged saliency maps of the run, merged exactly from the per-batch float64 sums
  of every actor, in ``_population_saliency/``.

:meth:`RunOutputs.carry` copies the live rows (and full saliency maps) of unchanged spectra from the
release's live run into the new run, when the job reuses them instead of relabelling.

It counts labelled, carried and quarantined rows per input file, so that the job can check that every input
row is accounted for before it publishes. :meth:`RunOutputs.publish_side_outputs` moves the side
outputs to their run-keyed homes (``_quarantine/release=<R>/run=<run>/`` and so on) just before the
catalogue rows are published; readers find them through the index, so they are invisible until then.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speclabel.core.contract import QUARANTINE_SCHEMA
from speclabel.core.errors import InputError, IntegrityError
from speclabel.core.layout import POPULATION_SALIENCY as POPULATION
from speclabel.core.layout import QUARANTINE, SALIENCY
from speclabel.core.layout import RUN_SIDE_OUTPUTS as SIDE_OUTPUTS
from speclabel.core.storage import exists, join
from speclabel.model.saliency import SaliencyAccumulator

from ..catalogue import CatalogueLayout, CatalogueWriter, WriteOptions
from ..publish import Dataset
from .batch import (
    ACTOR,
    BATCH_ROWS,
    KIND,
    LABELLED,
    QUARANTINED,
    SOURCE,
    OutputSpec,
    split_output,
    summary_accumulator,
)


class RunOutputs:
    def __init__(
        self,
        dataset: Dataset,
        release: str,
        run_id: str,
        spec: OutputSpec,
        wave: np.ndarray,
        *,
        layout: CatalogueLayout | None = None,
        options: WriteOptions | None = None,
    ) -> None:
        self.dataset = dataset
        self.release = release
        self.run_id = run_id
        self.spec = spec
        self.wave = wave
        self.writer = CatalogueWriter(dataset, release, run_id, layout, options)
        self.population = (
            SaliencyAccumulator.empty(len(spec.label_names), spec.n_pixels)
            if spec.saliency is not None
            else None
        )
        self.labelled: Counter[str] = Counter()  # per source
        self.carried: Counter[str] = Counter()  # per source: live rows kept from the previous run
        self.quarantined: Counter[str] = Counter()  # per source
        self.reasons: Counter[str] = Counter()
        self.actors: dict[str, dict] = {}
        self.rows_to_actors = 0
        self.maps_written = 0
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._streams: dict[str, object] = {}
        self._files: dict[str, list[str]] = {kind: [] for kind in SIDE_OUTPUTS}

    # -- receiving ----------------------------------------------------------------------------------

    def add(self, batch: pa.Table) -> None:
        """One output batch of the actors (see :func:`.batch.output_schema`)."""
        kind = batch.column(KIND)
        for wanted, counter in ((LABELLED, self.labelled), (QUARANTINED, self.quarantined)):
            sources = batch.column(SOURCE).filter(pc.equal(kind, wanted))
            for entry in pc.value_counts(sources).to_pylist():
                counter[entry["values"]] += entry["counts"]
        catalogue, quarantine, maps, summaries = split_output(batch, self.spec)
        self.writer.write(catalogue)
        self._append(QUARANTINE, quarantine)
        if maps is not None and maps.num_rows:
            self._append(SALIENCY, maps)
            self.maps_written += maps.num_rows
        self._reasons(quarantine)
        if summaries.num_rows:
            self.rows_to_actors += int(pc.sum(summaries.column(BATCH_ROWS)).as_py() or 0)
            for info in summaries.column(ACTOR).to_pylist():
                actor = json.loads(info)
                seen = self.actors.setdefault(actor["actor"], {**actor, "batches": 0})
                seen.update(actor)
                seen["batches"] += 1
            if self.population is not None:
                self.population = self.population.merge(
                    summary_accumulator(summaries, len(self.spec.label_names), self.spec.n_pixels)
                )

    def carry(self, live_run: str, ids: set[str], by_source: dict[str, int]) -> None:
        """Keep the live catalogue rows of ``ids``, and their full saliency maps, from the
        release's live run ``live_run`` as they are (their ``run_id`` and ``processed_at`` still say
        when they were labelled). ``by_source``: how many of them each input file holds."""
        if not ids:
            return
        wanted = pa.array(sorted(ids), pa.string())
        fs = self.dataset.fs
        found = 0
        for path in self.dataset.live_files(self.release):
            with fs.open_input_file(path) as fh:
                rows = pq.read_table(fh)
            rows = rows.filter(pc.is_in(rows.column("spectrum_id"), value_set=wanted))
            self.writer.write(rows)
            found += rows.num_rows
        if found != len(ids):
            raise IntegrityError(
                f"check 'carried rows': {len(ids)} unchanged spectra were to keep their rows of run "
                f"{live_run}, but release {self.release}'s live files hold {found} of them"
            )
        maps_dir = self.dataset.saliency_dir(self.release, live_run)
        for path in self.dataset.files_under(maps_dir):
            with fs.open_input_file(path) as fh:
                maps = pq.read_table(fh)
            maps = maps.filter(pc.is_in(maps.column("spectrum_id"), value_set=wanted))
            if maps.num_rows:
                self._append(SALIENCY, maps)
                self.maps_written += maps.num_rows
        self.carried.update(by_source)

    def quarantine(self, table: pa.Table) -> None:
        """Quarantine rows made by the driver (refused files), in ``QUARANTINE_SCHEMA``."""
        self._append(QUARANTINE, table)
        self._reasons(table)
        for entry in pc.value_counts(table.column("source")).to_pylist():
            self.quarantined[entry["values"]] += entry["counts"]

    def _reasons(self, quarantine: pa.Table) -> None:
        for entry in pc.value_counts(quarantine.column("reason")).to_pylist():
            self.reasons[entry["values"]] += entry["counts"]

    def _append(self, kind: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if kind not in self._writers:
            path = join(self.dataset.staging_dir(self.run_id), kind, f"part-{self.run_id}-00000.parquet")
            self.dataset.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            stream = self.dataset.fs.open_output_stream(path)
            schema = QUARANTINE_SCHEMA if kind == QUARANTINE else table.schema
            self._streams[kind] = stream
            self._writers[kind] = pq.ParquetWriter(stream, schema, compression="zstd")
            self._files[kind].append(path)
        self._writers[kind].write_table(table)

    # -- finishing ----------------------------------------------------------------------------------

    @property
    def labelled_rows(self) -> int:
        return sum(self.labelled.values())

    @property
    def carried_rows(self) -> int:
        return sum(self.carried.values())

    @property
    def quarantined_rows(self) -> int:
        return sum(self.quarantined.values())

    def close(self) -> dict:
        """Finish every staged file; returns what was written (for the manifest)."""
        result = self.writer.close()
        for kind in list(self._writers):
            self._writers.pop(kind).close()
            self._streams.pop(kind).close()
        if self.population is not None and self.population.count:
            path = join(
                self.dataset.staging_dir(self.run_id), POPULATION, f"population-{self.run_id}.parquet"
            )
            self.dataset.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.dataset.fs.open_output_stream(path) as out:
                pq.write_table(population_table(self.population, self.spec.label_names, self.wave), out)
            self._files[POPULATION].append(path)
        return {
            "catalogue": result.summary(),
            "quarantine_rows": self.quarantined_rows,
            "saliency_maps": self.maps_written,
            "population_saliency_spectra": self.population.count if self.population is not None else 0,
        }

    def publish_side_outputs(self) -> dict[str, list[str]]:
        """Move the staged side outputs to their run-keyed folders; returns their paths (relative)."""
        moved: dict[str, list[str]] = {}
        fs = self.dataset.fs
        for kind in SIDE_OUTPUTS:
            if not self._files[kind]:
                continue
            target = self.dataset.side_dir(kind, self.release, self.run_id)
            staged = join(self.dataset.staging_dir(self.run_id), kind)
            if isinstance(fs, pafs.LocalFileSystem):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.rename(staged, target)
            else:  # object stores cannot rename: copy (each object appears whole), staging goes later
                for path in self._files[kind]:
                    fs.copy_file(path, join(target, path.rsplit("/", 1)[1]))
            moved[kind] = [
                join(target, p.rsplit("/", 1)[1])[len(self.dataset.root) + 1 :] for p in self._files[kind]
            ]
        return moved

    def abort(self) -> None:
        """Remove everything this run staged or moved; the live catalogue is untouched."""
        for kind in list(self._writers):
            with contextlib.suppress(Exception):
                self._writers.pop(kind).close()
            with contextlib.suppress(Exception):
                self._streams.pop(kind).close()
        self.writer.abort()
        entry = self.dataset.release_entry(self.release)
        published = entry is not None and entry.get("run_id") == self.run_id
        fs = self.dataset.fs
        folders = [self.dataset.staging_dir(self.run_id)]
        if not published:
            folders += [self.dataset.side_dir(kind, self.release, self.run_id) for kind in SIDE_OUTPUTS]
        for folder in folders:
            if exists(fs, folder):
                with contextlib.suppress(OSError, FileNotFoundError):
                    fs.delete_dir(folder)


def population_table(
    accumulator: SaliencyAccumulator, label_names: tuple[str, ...], wave: np.ndarray
) -> pa.Table:
    """One row per label: the population-averaged saliency map (``mean``: signed, ``mean_abs``) over
    the model's grid ``wave``, and the exact float64 sums and count it came from."""
    n = len(label_names)

    def lists(matrix: np.ndarray, dtype) -> pa.ListArray:
        values = np.ascontiguousarray(matrix, dtype=dtype)
        return pa.ListArray.from_arrays(
            pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)), pa.array(values.ravel())
        )

    return pa.table(
        {
            "label": pa.array(list(label_names), pa.string()),
            "count": pa.array([accumulator.count] * n, pa.int64()),
            "wave": lists(np.broadcast_to(wave, (n, wave.size)), np.float64),
            "mean": lists(accumulator.mean, np.float32),
            "mean_abs": lists(accumulator.mean_abs, np.float32),
            "sum": lists(accumulator.sum, np.float64),
            "sum_abs": lists(accumulator.sum_abs, np.float64),
        }
    )


def read_population_saliency(location: str, release: str, run_id: str | None = None) -> pa.Table:
    """The population saliency table of a release's live run (or of ``run_id``)."""
    dataset = Dataset.open(location)
    if run_id is None:
        entry = dataset.release_entry(release)
        if entry is None:
            raise InputError(f"{location} has no release {release!r}")
        run_id = entry["run_id"]
    folder = dataset.population_saliency_dir(release, run_id)
    files = [p for p in dataset.files_under(folder) if p.endswith(".parquet")]
    if not files:
        raise InputError(f"run {run_id} of release {release} wrote no population saliency (--saliency none?)")
    with dataset.fs.open_input_file(files[0]) as fh:
        return pq.read_table(fh)
