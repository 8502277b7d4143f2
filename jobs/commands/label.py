"""Label spectra with a model ensemble into a partitioned Parquet catalogue, on Ray.

Reads a spectra table (a Parquet file, directory or glob, local or object store, or a published
spectra store), streams it through Ray Data (read -> validate -> prepare -> a pool of actors each
holding every ensemble member) and publishes one release of the catalogue atomically:

  CATALOGUE/release=<R>/sky=<k>/part-*.parquet        live rows (HEALPix sky cells)
  CATALOGUE/_quarantine/release=<R>/run=<run>/        rows refused, with a reason
  CATALOGUE/_saliency/release=<R>/run=<run>/          full saliency maps (--saliency full)
  CATALOGUE/_population_saliency/release=<R>/run=<run>/   population-averaged saliency maps
  CATALOGUE/_manifests/release=<R>/<run>.json         inputs, counts, model, versions, timings

A model trained with --reference-spectra refines its labels after the network (a local fit of each
spectrum against its noise-free reference spectra, with a continuum tilt, velocity and line-spread
term per arm, then [Mg/Fe] and [Al/Fe] from their own line windows): those columns hold the refined
labels and their calibrated _err, and <label>_cnn the network's; --no-refine labels with the
network alone.

Rerunning the same release with the same model, input and options prints "up to date" and does
nothing (--force relabels). A new model replaces the release's live rows in one step; the old ones
are kept under _versions/. Exit codes: 0 done (also with quarantined rows), 1 failed, 2 usage.
Fault injection for tests: SPECLABEL_FAULT=label.batch:batches=N makes every actor fail after N batches.
"""

from __future__ import annotations

import argparse

from ._types import (
    add_lock_timeout,
    add_ray_address,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

HELP = "label spectra with a model ensemble into the partitioned label catalogue (Ray Data)"


def _label_value(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LABEL=VALUE, got {text!r}")
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{name}: the threshold must be positive, got {value}")
    return name.strip(), number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--spectra", required=True, metavar="INPUT", help="spectra table: file, directory, glob or URI"
    )
    io.add_argument(
        "--model", required=True, metavar="MODEL_DIR", help="model directory (model.json + members/)"
    )
    io.add_argument("--out", required=True, metavar="CATALOGUE", help="catalogue folder or URI")
    io.add_argument("--release", help="release name for every row (default: the input's release column)")
    io.add_argument("--force", action="store_true", help="relabel even when the release is up to date")
    io.add_argument(
        "--reuse-unchanged",
        action="store_true",
        help="keep the live rows of spectra whose content (input_sha256) is unchanged when the release "
        "was labelled with the same model and options; label only changed and new spectra",
    )

    out = parser.add_argument_group("what to write")
    out.add_argument(
        "--saliency",
        choices=("summary", "full", "none"),
        default="summary",
        help="summary: per-spectrum line-window shares and peak wavelength, plus population maps "
        "(default); full: also full maps of selected spectra; none: labels only (forward passes only)",
    )
    out.add_argument(
        "--saliency-ids",
        metavar="FILE",
        help="with --saliency full: spectra whose full maps to keep (one id per line, or a "
        "Parquet/CSV file with a spectrum_id column)",
    )
    out.add_argument(
        "--saliency-sample",
        type=positive_int,
        metavar="N",
        help="with --saliency full: keep full maps of N spectra, a reproducible hash sample",
    )
    out.add_argument(
        "--members", action="store_true", help="also store each member's labels (<label>_members)"
    )
    out.add_argument(
        "--no-refine",
        action="store_true",
        help="label with the network alone, also where the model has reference spectra (without it, "
        "such a model refines its labels by a fit of each spectrum and keeps the network's "
        "values as <label>_cnn; 0.69x the spectra per second on 2 CPUs)",
    )
    out.add_argument(
        "--low-snr", type=non_negative_float, default=20.0, help="low_snr flag below this S/N (20)"
    )
    out.add_argument(
        "--high-std",
        type=_label_value,
        action="append",
        metavar="LABEL=STD",
        help="high_std flag threshold of a label (repeatable; default 5x the paper's internal precision: "
        "teff=120 logg=0.15 feh=0.1 mgfe=0.1 alfe=0.15)",
    )
    out.add_argument(
        "--masked-fraction",
        type=non_negative_float,
        default=0.2,
        help="heavily_masked flag above this fraction of masked pixels (0.2)",
    )
    out.add_argument(
        "--sky-order", type=non_negative_int, help="HEALPix order of sky partitions (new catalogue: 3)"
    )
    out.add_argument(
        "--max-rows-per-file", type=positive_int, default=500_000, help="rows per catalogue file"
    )

    run = parser.add_argument_group("how to run")
    run.add_argument("--batch-size", type=positive_int, default=128, help="spectra per actor call (128)")
    run.add_argument(
        "--gpus", type=non_negative_int, default=0, help="GPU actors, one per GPU (default 0: CPU)"
    )
    run.add_argument("--actors", type=positive_int, help="CPU actors (default: one per CPU of the cluster)")
    run.add_argument(
        "--cpus-per-actor",
        type=positive_float,
        help="CPUs per actor (default: shared so one is left to reading)",
    )
    run.add_argument(
        "--threads-per-actor", type=positive_int, help="torch threads per actor (default: its CPUs)"
    )
    run.add_argument(
        "--precision",
        choices=("float32", "auto", "bf16", "tf32"),
        default="float32",
        help="GPU actors only (CPU actors use float32). auto: the fastest of bf16 / tf32 whose labels "
        "and saliency stay within tolerance of float32 on the first spectra, else float32; bf16, tf32: "
        "that precision, and the run fails (exit 1) if it is out of tolerance",
    )
    add_ray_address(run)
    add_lock_timeout(run)
    run.add_argument(
        "--quiet",
        action="store_true",
        help="the summary and real warnings only: no progress lines or bars, no Ray INFO lines "
        "(without it, where Ray's logs are is logged at the start)",
    )


def run(args: argparse.Namespace) -> int:
    from speclabel.core.faults import planned_fault
    from speclabel.pipeline.catalogue import CatalogueLayout, WriteOptions
    from speclabel.pipeline.labelling import FlagThresholds, LabelOptions, label_spectra
    from speclabel.pipeline.labelling.inputs import check_inputs
    from speclabel.pipeline.ray_session import ray_session

    thresholds = FlagThresholds(low_snr=args.low_snr, masked_fraction=args.masked_fraction)
    if args.high_std:
        thresholds = FlagThresholds(
            low_snr=args.low_snr,
            masked_fraction=args.masked_fraction,
            high_std={**thresholds.high_std, **dict(args.high_std)},
        )
    options = LabelOptions(
        release=args.release,
        saliency=args.saliency,
        saliency_ids=args.saliency_ids,
        saliency_sample=args.saliency_sample,
        members=args.members,
        refine=not args.no_refine,
        batch_size=args.batch_size,
        gpus=args.gpus,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        threads_per_actor=args.threads_per_actor,
        precision=args.precision,
        thresholds=thresholds,
        layout=CatalogueLayout(sky_order=args.sky_order) if args.sky_order is not None else None,
        write=WriteOptions(max_rows_per_file=args.max_rows_per_file),
        force=args.force,
        reuse_unchanged=args.reuse_unchanged,
        fault=planned_fault(),
        lock_timeout_s=args.lock_timeout,
        progress=not args.quiet,
    )
    check_inputs(args.spectra, args.model, args.release)  # before Ray's start-up of seconds
    with ray_session(args.address, quiet=args.quiet):
        result = label_spectra(args.spectra, args.model, args.out, options)
    print(result.summary())
    return 0
