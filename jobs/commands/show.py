"""Draw one star of a label catalogue against its model: what to open first when a label looks wrong.

  speclabel show CATALOGUE SPECTRUM_ID [--spectra STORE_OR_PARQUET] [--model DIR] [--out PNG]

One block of panels per arm, the setup's line windows shaded: the observed spectrum with the model
spectrum at the row's labels (the model directory's forward model), the residual (observed - model,
in units of sigma where ivar is known) and the row's saliency maps (where the label run stored them,
--saliency full). The title gives the labels with their ensemble std (and calibrated errors where
the catalogue has them), chi2 per arm and in total, and the flags by name. The model directory and
the spectra are the ones the row's run manifest records; --model and --spectra (a spectra store from
`speclabel ingest` or contract Parquet files) override them. A model without a forward model is
drawn without the model spectrum, and the title says so.
"""

from __future__ import annotations

import argparse

HELP = "draw a star's spectrum, model spectrum, residual and saliency (PNG)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("catalogue", metavar="CATALOGUE", help="catalogue folder or URI (s3://, gs://)")
    parser.add_argument("spectrum_id", metavar="SPECTRUM_ID")
    parser.add_argument(
        "--spectra",
        metavar="STORE_OR_PARQUET",
        help="where the spectrum is (default: the input the row's label run records)",
    )
    parser.add_argument(
        "--model", metavar="DIR", help="model directory (default: the one the row's label run records)"
    )
    parser.add_argument("--release", help="the release, when the spectrum is labelled in several")
    parser.add_argument("--model-id", help="the row labelled by this model (default: the live row)")
    parser.add_argument("--out", metavar="PNG", help="the figure (default: show-SPECTRUM_ID.png here)")


def run(args: argparse.Namespace) -> int:
    import re
    from pathlib import Path

    from speclabel.core.errors import UsageError
    from speclabel.core.storage import filesystem_and_path, write_bytes_atomic
    from speclabel.pipeline.evaluation.show import show_png, star_view

    out = args.out or f"show-{re.sub(r'[^A-Za-z0-9._-]', '_', args.spectrum_id)}.png"
    if "://" not in out and not Path(out).resolve().parent.is_dir():
        raise UsageError(f"--out {out}: the folder {Path(out).parent} does not exist")
    view = star_view(
        args.catalogue,
        args.spectrum_id,
        spectra=args.spectra,
        model=args.model,
        release=args.release,
        model_id=args.model_id,
    )
    write_bytes_atomic(*filesystem_and_path(out), show_png(view))
    for note in view.notes:
        print(f"note: {note}")
    print(f"wrote {out}")
    return 0
