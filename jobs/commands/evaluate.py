"""Write a validation report: accuracy, precision and saliency of a model's labels, with figures.

Two ways to get predicted and true labels of the same spectra:

  speclabel evaluate --model MODEL_DIR [--data DATA] --out REPORT_DIR
      the rows of the model's common test split (held out from every member), from the data
      model.json names (or DATA: labelled spectra, Parquet file, folder or URI), labelled now

  speclabel evaluate --catalogue CATALOGUE --truth LABELS.parquet --out REPORT_DIR
      a label catalogue written by `speclabel label`, joined with true labels on spectrum_id

REPORT_DIR gets metrics.json (every number, full precision; NaN written as null), report.md and
its PNG figures: per label bias, scatter (ddof = 1), robust scatter (1.4826 x MAD), the same per S/N
bin, ensemble std against the actual error, one-to-one plots with residuals, the Kiel diagram
coloured by [Fe/H] and [Mg/Fe], [Al/Fe] against [Fe/H] (predicted next to true), and the population-
averaged saliency per label along both arms with the Mg I, Al I, Fe I, Ca II and H I windows marked.
An existing report in REPORT_DIR is replaced atomically; any other non-empty folder is refused.
"""

from __future__ import annotations

import argparse

from ._types import positive_float, positive_int

HELP = "validation report of a model (its test split) or a catalogue (against true labels)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="MODEL_DIR", help="model directory (path or URI) to evaluate")
    source.add_argument("--catalogue", metavar="CATALOGUE", help="label catalogue (path or URI) to evaluate")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="report folder (path or URI)")
    parser.add_argument(
        "--data", help="with --model: labelled spectra (default: the training data model.json names)"
    )
    parser.add_argument(
        "--no-saliency", action="store_true", help="with --model: skip the saliency maps (faster)"
    )
    parser.add_argument(
        "--batch-rows", type=positive_int, default=256, help="with --model: spectra per batch (default 256)"
    )
    parser.add_argument(
        "--truth", metavar="LABELS", help="with --catalogue: Parquet with spectrum_id and true label columns"
    )
    parser.add_argument(
        "--release",
        action="append",
        metavar="R",
        help="with --catalogue: release(s) to evaluate (default all)",
    )
    parser.add_argument("--model-id", help="with --catalogue: the run made with this model_id")
    parser.add_argument("--where", help='with --catalogue: row filter, e.g. "flags == 0"')
    parser.add_argument(
        "--setup",
        default="giraffe-hr10-hr21",
        help="with --catalogue: setup the catalogue was labelled with (default giraffe-hr10-hr21)",
    )
    parser.add_argument(
        "--snr-bins",
        type=positive_float,
        nargs="+",
        default=[20.0, 50.0, 100.0],
        metavar="EDGE",
        help="inner S/N bin edges (default 20 50 100: <20, 20-50, 50-100, >=100)",
    )
    parser.add_argument(
        "--snr-cut", type=positive_float, nargs="*", default=[50.0], help="S/N cuts (default 50: S/N >= 50)"
    )


def run(args: argparse.Namespace) -> int:
    from speclabel.core.errors import UsageError
    from speclabel.core.setups import get_setup
    from speclabel.pipeline.evaluation import ReportOptions, from_catalogue, from_model, write_report

    if sorted(args.snr_bins) != list(args.snr_bins) or len(set(args.snr_bins)) != len(args.snr_bins):
        raise UsageError(f"--snr-bins must increase, got {args.snr_bins}")
    if args.model:
        misplaced = [o for o, v in (("--truth", args.truth), ("--release", args.release)) if v]
        misplaced += [o for o, v in (("--model-id", args.model_id), ("--where", args.where)) if v]
        if misplaced:
            raise UsageError(f"{', '.join(misplaced)} go with --catalogue, not --model")
        evaluation = from_model(
            args.model, args.data, batch_rows=args.batch_rows, saliency=not args.no_saliency
        )
    else:
        if not args.truth:
            raise UsageError("--catalogue needs --truth LABELS.parquet (true labels with spectrum_id)")
        if args.data:
            raise UsageError("--data goes with --model; a catalogue is compared with --truth")
        evaluation = from_catalogue(
            args.catalogue,
            args.truth,
            setup=get_setup(args.setup),
            releases=args.release,
            model_id=args.model_id,
            where=args.where,
        )
    options = ReportOptions(snr_cuts=tuple(args.snr_cut), snr_edges=tuple(args.snr_bins))
    document = write_report(evaluation, args.out, options)
    print(summary(document, args.out))
    return 0


def summary(document: dict, out: str) -> str:
    rows = document["rows"]
    lines = [f"evaluate: {rows['evaluated']} spectra evaluated -> {out}/report.md"]
    if "quarantined" in rows:
        lines[0] += (
            f" ({rows['read']} read, {rows['test_split']} in the test split, {rows['quarantined']} refused)"
        )
    else:
        lines[0] += (
            f" ({rows['matched']} matched; {rows['unmatched_catalogue']} catalogue rows without truth, "
            f"{rows['unmatched_truth']} truth rows not in the catalogue)"
        )
    lines.append(f"{'label':<6} {'n':>7} {'bias':>11} {'scatter':>11} {'robust':>11}")
    for name in document["labels"]:
        m = document["metrics"]["all"][name]
        cells = " ".join(f"{_g(m[k]):>11}" for k in ("bias", "scatter", "robust_scatter"))
        lines.append(f"{name:<6} {m['n']:>7} {cells}")
    return "\n".join(lines)


def _g(value) -> str:
    return "-" if value is None else f"{value:.4g}"
