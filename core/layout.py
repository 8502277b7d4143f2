"""Names on disk shared by the spectra store and the label catalogue: one place to spell them.

Both are partitioned datasets published by ``pipeline.publish.Dataset`` (which turns these names into
paths); every side folder starts with ``_`` so that Arrow, DuckDB, dask and Spark skip it during
dataset discovery and see live rows only.
"""

from __future__ import annotations

import re

from .errors import UsageError

INDEX = "_index.json"  # which run is live for each release: the commit record
LOCK = "_lock"
RELEASE = "release"  # the hive partition key of every dataset: release=<R>/
STAGING = "_staging"  # work in progress, never read
MANIFESTS = "_manifests"  # what each run read, wrote and counted
QUARANTINE = "_quarantine"  # rows a run refused, with reasons
VERSIONS = "_versions"  # live files that a later run superseded
SALIENCY = "_saliency"  # full saliency maps of selected spectra (label runs)
POPULATION_SALIENCY = "_population_saliency"  # mergeable saliency sums of a label run
INPUTS_TABLE_SUFFIX = ".inputs.parquet"  # beside a run's manifest: every input file and its outcome

# Per-run side outputs of a label run, each under <kind>/release=<R>/run=<run>/.
RUN_SIDE_OUTPUTS = (QUARANTINE, SALIENCY, POPULATION_SALIENCY)

RELEASE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def check_release_name(release: str) -> str:
    if not isinstance(release, str) or not RELEASE_PATTERN.fullmatch(release):
        raise UsageError(
            f"release name {release!r} is not allowed: use 1-64 letters, digits and . _ + - "
            "(starting with a letter or digit), e.g. DR5 or iDR6.1"
        )
    return release
