"""List the instrument setups: their arms, wavelength ranges, sampling, resolving powers, pixels.

With no argument, every shipped setup (core/setups/*.toml); name setups or setup TOML files to see
only those (a file of your own is checked as --setup would load it). Wavelengths are in Angstrom,
rest frame, in the setup's medium. --json prints the same, plus the line-window groups and the
groups each label is read from, as JSON for scripts.
"""

from __future__ import annotations

import argparse

HELP = "list the instrument setups (arms, wavelength ranges, resolving powers, pixels)"

COLUMNS = ("setup", "arm", "from", "to", "step", "pixels", "R", "medium")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("setups", nargs="*", metavar="SETUP", help="setup names or TOML files (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def setup_summary(setup) -> dict:
    """One setup as plain data: the arms with their end wavelengths, the window groups, label lines."""
    return {
        "name": setup.name,
        "description": setup.description,
        "medium": setup.medium,
        "n_pixels": setup.n_pixels,
        "arms": [
            {
                "name": arm.name,
                "wave_start": arm.wave_start,
                "wave_end": round(arm.wave_end, 6),
                "wave_step": arm.wave_step,
                "n_pixels": arm.n_pixels,
                "resolution": arm.resolution,
            }
            for arm in setup.arms
        ],
        "line_groups": list(setup.line_windows),
        "label_lines": {label: list(groups) for label, groups in setup.label_lines.items()},
    }


def format_setups(summaries: list[dict]) -> str:
    """A fixed-width table, one row per arm and a total row per setup of more than one arm."""
    rows = []
    for s in summaries:
        for arm in s["arms"]:
            rows.append(
                (
                    s["name"],
                    arm["name"],
                    f"{arm['wave_start']:.2f}",
                    f"{arm['wave_end']:.2f}",
                    f"{arm['wave_step']:g}",
                    str(arm["n_pixels"]),
                    f"{arm['resolution']:.0f}",
                    s["medium"],
                )
            )
        if len(s["arms"]) > 1:
            rows.append((s["name"], "(all)", "", "", "", str(s["n_pixels"]), "", s["medium"]))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    numeric = {"from", "to", "step", "pixels", "R"}

    def line(row: tuple[str, ...]) -> str:
        cells = zip(row, widths, COLUMNS, strict=True)
        return "  ".join(v.rjust(w) if c in numeric else v.ljust(w) for v, w, c in cells).rstrip()

    lines = [line(row) for row in [COLUMNS, *rows]]
    notes = [f"{s['name']}: {s['description']}" for s in summaries if s["description"]]
    return "\n".join([*lines, "", "wavelengths in Angstrom, rest frame", *notes])


def run(args: argparse.Namespace) -> int:
    import json

    from speclabel.core.setups import available_setups, get_setup

    summaries = [setup_summary(get_setup(name)) for name in (args.setups or available_setups())]
    print(json.dumps(summaries, indent=2) if args.json else format_setups(summaries))
    return 0
