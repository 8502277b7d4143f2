"""Summarise a label catalogue: rows per release and model, label distributions, flag counts.

Percentiles (1, 16, 50, 84, 99) of each label and its ensemble std, per release, from one streaming
pass over the catalogue. --json prints the same numbers as JSON for scripts.
"""

from __future__ import annotations

import argparse

from .query import add_query_arguments

HELP = "summarise a label catalogue (rows per release and model, label distributions, flags)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_query_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    import json

    from speclabel.pipeline.catalogue import Catalogue
    from speclabel.pipeline.catalogue.stats import catalogue_stats, format_stats

    cat = Catalogue.open(args.catalogue)
    stats = catalogue_stats(cat, args.releases, args.model_id)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0
