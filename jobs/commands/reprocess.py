"""Bring the spectra store and the label catalogue up to date with the delivered data releases and
the current model, doing only what is missing. Safe to run from cron every hour.

ROOT holds one folder per release (ROOT/<release>/, FITS or Parquet files as delivered). For each:

  new release folder                 -> ingest it into the store, then label it into the catalogue
  delivered files changed            -> re-ingest; relabel only spectra whose checksum changed (or
                                        that are new), keep the live rows of the others, drop the
                                        spectra no longer delivered
  new model (or new label options)   -> relabel the release
  everything current                 -> print "up to date" and exit 0 (Ray is not started)

Every step publishes atomically; a crash leaves the store and the catalogue as they were or as the
last completed step left them, and the next run does the rest. One run at a time: the lock
CATALOGUE/_reprocess/_lock is taken over once its run has not renewed it for --lock-timeout seconds.
Each run that did something writes CATALOGUE/_reprocess/<run>.json (plan and outcome per release).

Exit codes: 0 done or up to date (also with quarantined rows), 1 a release failed or another run
holds the lock, 2 usage. Fault injection for tests:
SPECLABEL_FAULT=reprocess.after-ingest|reprocess.after-label[:release=R] crashes the run at that
point.
"""

from __future__ import annotations

import argparse
import contextlib

from ._types import add_lock_timeout, add_ray_address, non_negative_int, positive_int

HELP = "ingest and label new or changed data releases, or relabel with a new model (cron-safe)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("where")
    where.add_argument(
        "--releases", required=True, metavar="ROOT", help="folder or URI holding one folder per release"
    )
    where.add_argument("--store", required=True, metavar="SPECTRA_STORE", help="spectra store folder or URI")
    where.add_argument(
        "--catalogue", required=True, metavar="CATALOGUE", help="label catalogue folder or URI"
    )
    where.add_argument(
        "--model", required=True, metavar="MODEL_DIR", help="model directory of the current model"
    )

    what = parser.add_argument_group("what")
    what.add_argument("--release", metavar="NAME", help="only this release folder")
    what.add_argument("--dry-run", action="store_true", help="print the plan and do nothing")
    add_lock_timeout(what)

    label = parser.add_argument_group("labelling")
    label.add_argument(
        "--saliency",
        choices=("summary", "none"),
        default="summary",
        help="summary: per-spectrum line-window shares and population maps (default); none: labels only",
    )
    label.add_argument(
        "--no-refine",
        action="store_true",
        help="label with the network alone where the model has reference spectra (as label --no-refine)",
    )
    label.add_argument("--batch-size", type=positive_int, default=128, help="spectra per actor call (128)")
    label.add_argument(
        "--gpus", type=non_negative_int, default=0, help="GPU actors, one per GPU (default 0: CPU)"
    )
    label.add_argument("--actors", type=positive_int, help="CPU actors (default: one per CPU of the cluster)")
    add_ray_address(label)
    label.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")


def run(args: argparse.Namespace) -> int:
    from speclabel.pipeline.labelling import LabelOptions
    from speclabel.pipeline.ray_session import ray_session

    from ..reprocess import ReprocessOptions, make_plan, run_reprocess

    options = ReprocessOptions(
        releases=args.releases,
        store=args.store,
        catalogue=args.catalogue,
        model=args.model,
        only=(args.release,) if args.release else (),
        lock_timeout_s=args.lock_timeout,
        label=LabelOptions(
            saliency=args.saliency,
            refine=not args.no_refine,
            batch_size=args.batch_size,
            gpus=args.gpus,
            actors=args.actors,
            progress=not args.quiet,
        ),
    )
    if args.dry_run:
        plan = make_plan(options)
        print(f"reprocess plan (model {plan.model_id}, dry run: nothing done):\n{plan.describe()}")
        return 0

    with contextlib.ExitStack() as stack:
        # Ray starts only when there is work: an up-to-date run never pays its start-up.
        outcome = run_reprocess(
            options, ensure_ray=lambda: stack.enter_context(ray_session(args.address, quiet=args.quiet))
        )
    print(outcome.summary())
    return 0
