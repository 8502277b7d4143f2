"""List training spectra that should not teach the model, for inspection and `speclabel train --exclude`.

  speclabel screen --data train.parquet --out suspects.parquet
  speclabel train --data train.parquet --exclude suspects.parquet --out model/

Fits the forward model (flux as a quadratic in the labels, with iterative clipping of outlier
spectra) on the valid rows of --data and lists each row that fails a test:

  chi2            its reduced chi^2 at its given labels (total: leave-one-out; per arm) beyond the
                  model's anomaly threshold: a binary, emission, cosmic rays, a bad continuum
  label_residual  a label the forward model fits to the spectrum differs from the given label by
                  more than 6 robust standard deviations (in units of the label's Cramér-Rao bound)

The reason column names each test failed with its value and threshold. Columns: spectrum_id,
reason, chi2, chi2_<arm>, <label>_residual (in those standard deviations), <label> (given) and
<label>_fit. Rows that `speclabel train` would quarantine are counted, not screened.
"""

from __future__ import annotations

import argparse

HELP = "list training spectra with extreme chi2 or label residuals against the forward model"
SHOWN = ("spectrum_id", "chi2", "reason")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="labelled spectra, as train --data takes them")
    parser.add_argument("--setup", help="instrument setup name or TOML (default: as the input declares)")
    parser.add_argument("--out", metavar="FILE", help="write the listed rows to FILE.parquet or .csv")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from speclabel.core.errors import UsageError
    from speclabel.pipeline.catalogue.export import format_table, output_format, write_table
    from speclabel.pipeline.screen import screen_training_data
    from speclabel.pipeline.training_data import input_setup

    if args.out and output_format(args.out) not in ("parquet", "csv"):
        raise UsageError(f"--out {args.out}: name it .parquet or .csv (what train --exclude reads)")
    result = screen_training_data(args.data, input_setup(args.data, args.setup))
    print(result.summary())
    if args.out:
        write_table(result.listed, args.out, overwrite=args.overwrite)
        print(f"screen: wrote {result.listed.num_rows} rows to {args.out}")
    else:
        print(format_table(result.listed.select(list(SHOWN))))
    return 0
