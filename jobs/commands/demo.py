"""Run the whole product end to end on a built-in synthetic survey, on a local Ray instance.

Steps, each a speclabel subcommand printed before it runs: simulate a labelled training survey and a
delivered release of FITS files (one of them deliberately corrupted), ingest the release into a spectra
store, train an ensemble, label the release into the catalogue, query it, and evaluate the catalogue
against the release's true labels. Everything lands under --out (a rerun clears an earlier demo's
folder); the run needs no data, no cluster and no network, and takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse

from ._types import positive_int

HELP = "simulate -> ingest -> train -> label -> query -> evaluate on a built-in survey (no data or cluster)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    parser.add_argument(
        "--n",
        type=positive_int,
        default=600,
        help="spectra in the training survey (default 600; the release has n/3)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--members", type=positive_int, default=8, help="ensemble members (default 8, as in the paper)"
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=15, help="training epochs per member (default 15)"
    )


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args.out, n=args.n, seed=args.seed, members=args.members, epochs=args.epochs)
