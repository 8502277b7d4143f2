"""Run the whole product end to end on the built-in synthetic survey, on a local Ray instance.

Steps: simulate a small survey, check it against the data contract, plot example spectra with the
Mg I, Al I, Fe I, Ca II and Paschen line windows marked, and print a summary. Everything lands under
--out; the run needs no data, no cluster and no network.
"""

from __future__ import annotations

import argparse

from ._types import positive_int

HELP = "run simulate -> ... end to end on a small built-in survey (no data or cluster needed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    parser.add_argument(
        "--n", type=positive_int, default=600, help="spectra in the demo survey (default 600)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args.out, n=args.n, seed=args.seed)
