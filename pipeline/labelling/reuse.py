"""Whether a label run has work to do, and what it may keep: fingerprints, up-to-date checks, the
rows of the live run it may carry, the release it labels and the spectra whose full maps it keeps.

A release's index entry records ``model_id``, ``input_fingerprint`` and ``options_fingerprint`` of the
run that labelled it (:func:`label_fingerprints`); all three equal -> the release is up to date. Equal
model and options only -> the live run's rows of unchanged spectra may be carried (:func:`reusable_run`,
``LabelOptions.reuse_unchanged``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from speclabel.core.errors import SpeclabelError, UsageError
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.layout import check_release_name
from speclabel.model.splits import hash_uniform

from ..publish import Dataset
from .options import LabelOptions

SAMPLE_SALT = "speclabel-saliency-sample-v1"


def decide_release(override: str | None, found: list[str]) -> str:
    if override is not None:
        return check_release_name(override)
    if len(found) == 1:
        return check_release_name(found[0])
    if not found:
        raise UsageError(
            "the input has no release column or release=<R> folder: name the release with --release"
        )
    raise UsageError(
        f"the input holds several releases {found}: a run labels one release (--release NAME labels all "
        "rows as NAME; or give each release's files separately)"
    )


def selected_map_ids(options: LabelOptions, source) -> frozenset[str] | None:
    """The spectrum_ids whose full saliency maps are kept (``--saliency full``), else None.

    ``--saliency-ids FILE``: ids one per line (``#`` comments), or a Parquet / CSV file with a
    ``spectrum_id`` column. ``--saliency-sample N``: the N input ids with the smallest
    sha256-based hash u(id) = :func:`speclabel.model.splits.hash_uniform` (salt
    ``speclabel-saliency-sample-v1``): a uniform random sample that is the same in every run and
    does not depend on file order. Both: their union.
    """
    if options.saliency != "full":
        return None
    chosen: set[str] = set()
    if options.saliency_ids is not None:
        chosen |= read_id_file(options.saliency_ids)
    if options.saliency_sample:
        ids = source.all_ids()
        if len(ids) > options.saliency_sample:
            u = hash_uniform(ids, SAMPLE_SALT)
            ids = [ids[i] for i in np.argsort(u, kind="stable")[: options.saliency_sample]]
        chosen |= set(ids)
    return frozenset(chosen)


def read_id_file(path: str) -> set[str]:
    file = Path(path)
    if file.suffix.lower() in (".parquet", ".csv"):
        table = pq.read_table(file) if file.suffix.lower() == ".parquet" else pacsv.read_csv(file)
        if "spectrum_id" not in table.column_names:
            raise UsageError(f"--saliency-ids file {path} has no spectrum_id column ({table.column_names})")
        return {i for i in table.column("spectrum_id").cast(pa.string()).to_pylist() if i}
    lines = (line.strip() for line in file.read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def options_fingerprint(options: LabelOptions) -> str:
    """sha256 of the options that change what a run writes (not of how the work is spread)."""
    record = json.dumps(options_record(options), sort_keys=True).encode()
    return hashlib.sha256(record).hexdigest()[:32]


def options_record(options: LabelOptions, map_ids: frozenset[str] | None = None) -> dict:
    ids_file = None
    if options.saliency_ids is not None:
        if not Path(options.saliency_ids).is_file():
            raise UsageError(f"--saliency-ids file {options.saliency_ids} does not exist")
        ids_file = hashlib.sha256(Path(options.saliency_ids).read_bytes()).hexdigest()[:32]
    return {
        "saliency": options.saliency,
        "saliency_ids_file_sha256": ids_file,
        "saliency_sample": options.saliency_sample,
        **({"saliency_maps": len(map_ids)} if map_ids is not None else {}),
        "members": options.members,
        "precision": options.precision,
        "thresholds": options.thresholds.to_dict(),
        # Only when off: the fingerprints of runs made before the option existed stay the same.
        **({"refine": False} if not options.refine else {}),
    }


def label_fingerprints(model_id: str, source, options: LabelOptions) -> dict:
    """What a release's index entry records of the run that labelled it; equal -> up to date."""
    return {
        "model_id": model_id,
        "input_fingerprint": source.fingerprint,
        "options_fingerprint": options_fingerprint(options),
    }


def check_label_set(dataset: Dataset, release: str, label_names: tuple[str, ...], model_id: str) -> None:
    """A release keeps one label set (its index entry's ``labels``; entries from before label sets
    were recorded hold the paper's five): labelling it with a model of another set is refused, since
    its live rows, carried rows and queries would otherwise mix schemas. ``--force`` replaces it."""
    entry = dataset.release_entry(release)
    if entry is None:
        return
    held = tuple(entry.get("labels", LABEL_NAMES))
    if held != tuple(label_names):
        raise SpeclabelError(
            f"release {release!r} of {dataset.location} holds the labels {', '.join(held)} (model "
            f"{entry.get('model_id')}); model {model_id} has the labels {', '.join(label_names)}. A release "
            "keeps one label set: label into another release (--release), or add --force to replace "
            "its rows with this model's"
        )


def up_to_date(dataset: Dataset, release: str, fingerprints: dict) -> bool:
    entry = dataset.release_entry(release)
    return entry is not None and all(entry.get(k) == v for k, v in fingerprints.items())


def reusable_run(dataset: Dataset, release: str, fingerprints: dict) -> str | None:
    """The release's live run when its rows may be carried into a new run: same model and options."""
    entry = dataset.release_entry(release)
    same = entry is not None and all(
        entry.get(k) == fingerprints[k] for k in ("model_id", "options_fingerprint")
    )
    return entry["run_id"] if same else None


def live_checksums(dataset: Dataset, release: str) -> dict[str, str]:
    """spectrum_id -> input_sha256 of the release's live catalogue rows."""
    checksums: dict[str, str] = {}
    for path in dataset.live_files(release):
        with dataset.fs.open_input_file(path) as fh:
            rows = pq.read_table(fh, columns=["spectrum_id", "input_sha256"])
        checksums.update(
            zip(rows.column(0).cast(pa.string()).to_pylist(), rows.column(1).to_pylist(), strict=True)
        )
    return checksums
