"""``speclabel ingest``: survey spectrum files (FITS, contract Parquet) into the spectra store, on Ray Data.

The job runs in two passes over the input files:

1. **scan** (Ray Data, a map over file names): reads each FITS file's primary header only (its first
   2880-byte blocks) to name the star it belongs to (:func:`.fits_formats.spectrum_id`: CNAME, else
   OBJECT, else the file name), and each Parquet file's schema, row groups and ``spectrum_id`` column.
2. **plan** (driver): the per-setup files of one star are grouped by that id; Parquet rows whose id was
   seen before are marked as duplicates; the stars and row groups are packed into tasks.
3. **ingest** (Ray Data, a map over tasks, streaming): each task reads its files, decodes them
   (:mod:`.fits_formats`), puts every arm on the setup's grid (:mod:`.resample`, :mod:`.normalise`),
   keeps the highest-S/N file per star and arm, writes one part file of store rows into the run's
   staging folder and one quarantine file, and returns one summary row per input file.
4. **publish** (driver): every input is checked to be accounted for (files in = files used + files
   quarantined; spectra in = stored + quarantined; rows on disk = rows reported), the manifest and
   its table of input files (size, mtime, sha256, outcome) are written, and the release is published
   through :class:`.publish.Dataset`.

Why this plan rather than decoding every file and then ``groupby(spectrum_id)``: grouping needs only
header metadata, so the shuffle moves a few hundred bytes per file instead of the decoded arrays
(~100 KB per arm), and the ingest pass is a plain streaming map whose memory does not grow with the
survey. All files of a star land in the same task, so duplicates and missing arms are decided there.

The stages live in one module each: :mod:`.options` (:class:`IngestOptions`), :mod:`.scan` (pass 1
and the input listing), :mod:`.plan`, :mod:`.prepare` (the per-file science, plain functions),
:mod:`.task` (pass 2) and :mod:`.job` (the driver: :func:`run_ingest`, accounting, publish)::

    import ray
    from speclabel.core.setups import get_setup
    from speclabel.pipeline.ingest import IngestOptions, run_ingest
    ray.init()
    report = run_ingest("survey/", "spectra-store/", get_setup(), IngestOptions(release="DR1"))
    print(report.counts)

Re-ingesting the same files (same paths, sizes and modification times) with the same setup, options
and speclabel version into the same release is a no-op unless forced: the input fingerprint is
stored in the release's index entry.
"""

from speclabel.core.lazy import lazy_exports

# Exports load on first use (PEP 562), as in ``pipeline.labelling``: a Ray worker that unpickles
# ``scan.scan_block`` or ``task.ingest_block`` imports only the modules that pass needs.
_EXPORTS = {
    "IngestOptions": "options",
    "MISSING_ARM_MODES": "options",
    "PreparedArm": "prepare",
    "StarResult": "prepare",
    "assemble_star": "prepare",
    "choose_arm": "prepare",
    "measured_snr": "prepare",
    "pass_through": "prepare",
    "prepare_file": "prepare",
    "split_invalid": "prepare",
    "star_table": "prepare",
    "INPUT_EXTENSIONS": "scan",
    "PARQUET_EXTENSIONS": "scan",
    "SCAN_SCHEMA": "scan",
    "InputFile": "scan",
    "file_sha256": "scan",
    "input_fingerprint": "scan",
    "list_inputs": "scan",
    "scan_block": "scan",
    "TASK_SCHEMA": "plan",
    "Plan": "plan",
    "make_plan": "plan",
    "QUARANTINED": "task",
    "SUMMARY_SCHEMA": "task",
    "USED": "task",
    "TaskContext": "task",
    "TaskOutput": "task",
    "ingest_block": "task",
    "ingest_task": "task",
    "part_name": "task",
    "IngestReport": "job",
    "check_locations": "job",
    "run_ingest": "job",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
