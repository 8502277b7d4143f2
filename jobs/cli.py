"""The ``speclabel`` command line: one subcommand per job, each a thin module in ``jobs/commands``.

Exit codes, for every subcommand (schedulers rely on them): 0 = the job did its work, also when
some rows or files were quarantined; 1 = the job failed, including an input or model refused by an
integrity check; 2 = usage error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from speclabel.core.errors import SpeclabelError

# Subcommands in the order `speclabel --help` lists them. Each module defines HELP, add_arguments()
# and run(args) -> int, and imports its heavy dependencies (torch, ray) inside run() so that
# `speclabel --help` stays instant.
COMMANDS = (
    "demo",
    "simulate",
    "ingest",
    "screen",
    "train",
    "export",
    "label",
    "reprocess",
    "query",
    "sql",
    "stats",
    "suggest",
    "serve",
    "submit",
    "jobs",
    "evaluate",
    "show",
    "setups",
)


def _load(name: str):
    return importlib.import_module(f"{__package__}.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(
        prog="speclabel",
        description="Stellar labels from GIRAFFE spectra with a CNN ensemble, at survey scale on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"speclabel {version('speclabel')}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = _load(name)
        cmd = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # --quiet (of the commands that have it): the summary and warnings only.
    quiet = getattr(args, "quiet", False) and not args.verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args._module.run(args) or 0)
    except SpeclabelError as exc:
        print(f"speclabel {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"speclabel {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # an unexpected failure is still a failed job (exit 1), with the traceback
        traceback.print_exc()
        print(f"speclabel {args.command}: failed with an unexpected error (traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
