"""Suggest which labelled catalogue rows to get reference labels for next (a target list).

  speclabel suggest --catalogue labels/ --model models/ges-v1 --n 300 --out targets.fits
  speclabel suggest --catalogue labels/ --model models/ges-v1 --n 100 --where "snr > 30" \\
      --exclude observed.csv --out next.parquet

Ranks the rows by how much a reference label for them would teach the model:
  score = score_uncertainty * (1 + score_novelty)
  score_uncertainty = rms over labels of (<label>_err, or <label>_std where err is null) / the
                      training labels' standard deviation (labels in comparable units)
  score_novelty     = ood_score / 100 (distance to the training set in the members' embedding space)
and picks --n diverse rows (greedy k-center, or with --diversity k-median greedy k-median, in
predicted-label space, weighted by the score), so the picks are not N twins of one odd star. A
model with reference spectra (train --reference-spectra) has its reference stars count as picks
already made, so the picks fill the gaps they leave (--ignore-reference-stars: cover afresh). Rows
flagged anomalous_spectrum, heavily_masked or low_snr, rows of --exclude (a .parquet or .csv with a
spectrum_id column) and rows outside --where are never suggested. Runs on Ray: one streaming
scoring task per catalogue file; at most --max-per-partition candidates are held per sky
partition. --out (.parquet, .csv, .fits) gets spectrum_id, ra, dec, snr, release, the predicted
labels, score, score_uncertainty, score_novelty and rank (1 = first).
"""

from __future__ import annotations

import argparse

from ._types import add_ray_address, positive_int
from .query import add_release_argument

HELP = "suggest which catalogue rows to get reference labels for next (uncertain, novel, diverse)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalogue", required=True, help="label catalogue folder or URI")
    parser.add_argument("--model", required=True, metavar="MODEL_DIR", help="the model that labelled it")
    parser.add_argument("--n", type=positive_int, required=True, help="how many rows to suggest")
    parser.add_argument("--where", metavar="EXPR", help="only rows matching this filter (as query --where)")
    add_release_argument(parser)
    parser.add_argument("--exclude", metavar="IDS_FILE", help="never suggest these ids (.parquet/.csv)")
    parser.add_argument(
        "--max-per-partition",
        type=positive_int,
        default=None,
        metavar="M",
        help="candidate rows held per sky partition, the memory bound, at least --n "
        "(default: the larger of 10000 and --n)",
    )
    parser.add_argument(
        "--unweighted", action="store_true", help="unweighted selection: the score only orders the candidates"
    )
    parser.add_argument(
        "--diversity",
        metavar="METHOD",
        help="how the picks are spread: k-center (the default) covers the candidates' label space, "
        "edges first; k-median places picks where the score-weighted candidates lie",
    )
    parser.add_argument(
        "--ignore-reference-stars",
        action="store_true",
        help="spread the picks over the candidates alone, not away from the model's reference stars",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="FILE.parquet, .csv or .fits")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_ray_address(parser)


def run(args: argparse.Namespace) -> int:
    from speclabel.model.calibration import prior_widths
    from speclabel.model.io import load_model
    from speclabel.pipeline.catalogue import Catalogue
    from speclabel.pipeline.catalogue.export import output_format, write_table
    from speclabel.pipeline.ray_session import ray_session
    from speclabel.pipeline.suggest import covered_points
    from speclabel.pipeline.suggest_job import SuggestOptions, suggest
    from speclabel.pipeline.training_data import IdList

    output_format(args.out)  # a bad suffix is a usage error before any work
    ensemble = load_model(args.model)
    options = SuggestOptions(
        n=args.n,
        where=args.where,
        releases=tuple(args.releases) if args.releases else None,
        exclude=IdList.read(args.exclude).ids if args.exclude else frozenset(),
        per_partition=args.max_per_partition or max(10_000, args.n),
        weighted=not args.unweighted,
        **({"diversity": args.diversity} if args.diversity else {}),
    )
    widths = prior_widths(ensemble)
    covered = None
    if ensemble.refinement is not None and not args.ignore_reference_stars:
        library = ensemble.refinement.library
        covered = covered_points(library.labels, library.label_names, ensemble.label_names, widths)
    catalogue = Catalogue.open(args.catalogue)
    with ray_session(args.address, quiet=True):
        result = suggest(
            catalogue, ensemble.label_names, widths, options, model_id=ensemble.model_id, covered=covered
        )
    fmt = write_table(result.table, args.out, overwrite=args.overwrite)
    print(result.summary())
    print(f"suggest: wrote {result.table.num_rows} rows to {args.out} ({fmt})")
    return 0
