"""List the speclabel jobs on a Ray cluster and their status, oldest first.

Shows each job's submission id (see `speclabel submit --help`), status (PENDING, RUNNING,
SUCCEEDED, FAILED, STOPPED), start time in UTC, run time, command line, and the reason for failed
or stopped jobs. The cluster is --address, or $RAY_ADDRESS; token auth as for submit.
"""

from __future__ import annotations

import argparse

HELP = "list the speclabel jobs on a Ray cluster and their status"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="Ray dashboard / Jobs API address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"
    )
    parser.add_argument("--all", action="store_true", help="also list jobs not submitted by speclabel")


def run(args: argparse.Namespace) -> int:
    from ..submit import connect, job_table, list_jobs

    rows = job_table(list_jobs(connect(args.address)), include_all=args.all)
    if not rows:
        print("jobs: no speclabel jobs on this cluster" + ("" if args.all else " (--all lists every job)"))
        return 0
    columns = ("submission_id", "status", "started", "duration", "command")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns[:-1]}
    header = ["SUBMISSION ID", "STATUS", "STARTED (UTC)", "DURATION", "COMMAND"]
    print("  ".join(h.ljust(widths.get(c, 0)) for h, c in zip(header, columns, strict=True)).rstrip())
    for row in rows:
        print("  ".join(row[c].ljust(widths.get(c, 0)) for c in columns).rstrip())
        if row["message"]:
            print(f"    {row['message']}")
    return 0
