"""Read survey spectrum files into the spectra store, on the setup's wavelength grid.

INPUT is a file, a directory (searched recursively) or a glob of FITS files (.fits, .fit, .fts, also
gzipped) and/or Parquet files in the spectra contract. FITS layouts: Gaia-ESO-like 1-D images with a
wavelength WCS and an error/variance/ivar extension, and ESO Phase 3 binary tables (WAVE, FLUX, ERR).
The per-setup files of one star (same CNAME, else OBJECT, else file name) become one row; each arm is
converted to Angstrom and the setup's medium, shifted to the rest frame by the header's radial
velocity, resampled conserving flux, and continuum-normalised when needed.

Bad files (corrupt, truncated, no wavelength solution, wrong units, another instrument, no overlap),
duplicates (a lower-S/N file of the same star and setup) and incomplete stars go to the quarantine
table with a reason; the run still exits 0 and prints the counts. Output: Parquet under
STORE/release=NAME/, published atomically, with STORE/_manifests/ and STORE/_quarantine/.
Re-running on unchanged inputs does nothing unless --force.

The input and the store are checked before Ray starts (a missing path fails at once, exit 1). A
progress line (spectra/s, ETA) goes to stderr every 10 s and at the end of each pass; --quiet
drops it, Ray Data's progress bars and Ray's INFO lines. Runs on the Ray cluster in --address or
RAY_ADDRESS, or starts a local Ray instance. SPECLABEL_FAULT=ingest.publish fails just before publishing.
"""

from __future__ import annotations

import argparse
import contextlib

from ._types import add_lock_timeout, add_ray_address, positive_int

HELP = "read FITS / Parquet survey spectra into the spectra store (setup grid, quarantine, manifest)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT_DIR_OR_GLOB", help="input file, directory or glob (or URI)")
    parser.add_argument("--out", required=True, metavar="SPECTRA_STORE", help="spectra store folder or URI")
    parser.add_argument("--release", required=True, help="release to write, e.g. iDR6")
    parser.add_argument("--setup", default="giraffe-hr10-hr21", help="instrument setup name or TOML file")
    parser.add_argument(
        "--normalised",
        choices=("auto", "yes", "no"),
        default="auto",
        help="is the input flux continuum-normalised? auto (default): yes when the flux unit is empty "
        "or says normalised and the upper envelope is near 1; otherwise a continuum is fitted",
    )
    parser.add_argument(
        "--vacuum",
        action="store_true",
        help="wavelengths whose file does not declare air or vacuum are vacuum (default: air, as in "
        "GIRAFFE products)",
    )
    parser.add_argument(
        "--missing-arm",
        choices=("quarantine", "mask"),
        default="quarantine",
        help="a star without a usable file for some arm: quarantine its files (default) or store it "
        "with that arm masked (ivar 0)",
    )
    parser.add_argument(
        "--no-rv-shift",
        action="store_true",
        help="do not shift to the rest frame by the header's radial velocity (inputs already at rest)",
    )
    parser.add_argument("--force", action="store_true", help="re-ingest even if the inputs are unchanged")
    parser.add_argument(
        "--stars-per-task",
        type=positive_int,
        default=256,
        help="stars per Ray task and part file (default 256)",
    )
    add_ray_address(parser)
    add_lock_timeout(parser)
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines, progress bars or Ray worker output"
    )


def run(args: argparse.Namespace) -> int:
    from speclabel.core.reporting import Reporter, silent, to_stderr, to_stdout
    from speclabel.core.setups import get_setup
    from speclabel.pipeline.ingest import IngestOptions, check_locations, run_ingest
    from speclabel.pipeline.ray_session import no_data_progress_bars, ray_session

    setup = get_setup(args.setup)
    options = IngestOptions(
        release=args.release,
        normalised=args.normalised,
        default_medium="vacuum" if args.vacuum else "air",
        missing_arm=args.missing_arm,
        rv_shift=not args.no_rv_shift,
        stars_per_task=args.stars_per_task,
    )
    listing = check_locations(args.input, args.out)  # before Ray's start-up of seconds
    reporter = Reporter(to_stdout, progress_echo=silent if args.quiet else to_stderr)
    bars = no_data_progress_bars() if args.quiet else contextlib.nullcontext()
    with ray_session(args.address, quiet=args.quiet), bars:
        report = run_ingest(
            args.input,
            args.out,
            setup,
            options,
            force=args.force,
            reporter=reporter,
            listing=listing,
            lock_timeout_s=args.lock_timeout,
        )
    if report.skipped:
        reporter.line(
            f"ingest: release {report.release} of {report.store} already holds these inputs "
            f"(run {report.run_id}); nothing to do (--force re-ingests)"
        )
        return 0
    c = report.counts
    reporter.line(
        f"ingest: {c['files_in']} files ({c['fits_files']} FITS, {c['parquet_files']} Parquet) -> "
        f"release {report.release} of {report.store} (run {report.run_id})"
    )
    stored, refused = c["spectra_stored"], c["spectra_quarantined"]
    reporter.line(f"  spectra: {c['spectra_in']} in = {stored} stored + {refused} quarantined")
    reporter.line(
        f"  files:   {c['files_in']} in = {c['files_used']} used + {c['files_quarantined']} quarantined"
    )
    if report.quarantine_by_reason:
        reasons = ", ".join(f"{reason} {n}" for reason, n in report.quarantine_by_reason.items())
        reporter.line(f"  quarantine: {c['quarantine_rows']} rows ({reasons}) in {report.quarantine_dir}")
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items())
    reporter.line(f"  time: {timings}")
    return 0
