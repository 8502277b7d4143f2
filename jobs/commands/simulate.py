"""Write a synthetic survey: spectra on the setup's grids with true labels.

The spectra have absorption lines at laboratory wavelengths whose depths follow Teff, log g,
[Fe/H], [Mg/Fe] and [Al/Fe] through excitation, ionisation and a curve of growth, broadened to the
arm's resolving power, with photon noise at a drawn S/N, matching ivar, small radial-velocity
residuals and a few masked pixels. The same --seed gives the same rows in the same order.
--noise-free writes the same stars without any of that (and without ivar): the noise-free
reference spectra `speclabel train --reference-spectra` refines the labels with.

--format parquet (default) writes one Parquet file with spectra and labels. --format fits writes the
Gaia-ESO-like layout that `speclabel ingest` reads: --out is a folder that receives
spectra/<chunk>/<id>_<arm>.fits (one file per star and arm: flux with a linear air-wavelength WCS in
the observed frame of a drawn radial velocity, an ERROR extension, and OBJECT, CNAME, RA, DEC, SETUP,
SNR, VRAD in the header) and labels.parquet, the true labels keyed by CNAME, the id ingest gives.

--label-catalogue FILE (.fits, .fits.gz, .parquet or .csv) also writes what a survey's own pipeline
delivers: a Gaia-ESO-style label catalogue keyed by CNAME (the id the spectra carry in a store: the
CNAME for --format fits, spectrum_id for --format parquet) with TEFF, E_TEFF, LOGG, E_LOGG, FEH,
E_FEH, MG1, E_MG1, AL1, E_AL1 (absolute abundances A(X) = [X/Fe] + [Fe/H] + A(X)_sun, A(Mg)_sun =
7.53, A(Al)_sun = 6.37), SNR and a PECULI flag; values scattered by their errors, a fraction of
each label null, a few rows with large errors and a few flagged peculiar ones.

An existing output is refused unless --overwrite is given; then, for --format fits, the old
spectra/ folder is removed first, so that no star of an earlier survey is left among the new ones.
"""

from __future__ import annotations

import argparse
import time

from ._types import fraction, non_negative_int, positive_float, positive_int

HELP = "write a synthetic survey (spectra + true labels) for demos, tests and benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=non_negative_int, required=True, help="number of spectra")
    parser.add_argument(
        "--out", required=True, help="output file (.parquet) or URI; a folder for --format fits"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--snr-range",
        type=positive_float,
        nargs=2,
        metavar=("A", "B"),
        default=(10.0, 150.0),
        help="continuum S/N drawn log-uniformly in [A, B] (default 10 150)",
    )
    parser.add_argument(
        "--format",
        choices=("parquet", "fits"),
        default="parquet",
        help="parquet: one file (default); fits: one FITS file per star and arm plus labels.parquet",
    )
    parser.add_argument("--setup", default="giraffe-hr10-hr21", help="instrument setup name or TOML file")
    parser.add_argument("--release", default="SIM", help="value of the release column (default SIM)")
    parser.add_argument(
        "--label-prior",
        metavar="TABLE",
        help="CSV/Parquet of label sets (Teff, logg, FeH, MgFe, AlFe) to resample instead of the "
        "built-in Milky Way prior, e.g. ../shared/data/apogee_dr16_label_prior.csv",
    )
    parser.add_argument(
        "--chunk-size", type=positive_int, default=500, help="rows per chunk / Parquet row group"
    )
    parser.add_argument(
        "--label-catalogue",
        metavar="FILE",
        help="also write a Gaia-ESO-style label catalogue (.fits, .fits.gz, .parquet, .csv) keyed by CNAME",
    )
    parser.add_argument(
        "--defects",
        type=fraction,
        default=0.0,
        metavar="FRACTION",
        help="give this fraction of the spectra one defect each (double-lined binary, Ca II emission, "
        "cosmic rays, a bad continuum, an arm from another star; its kind in a 'defect' column of the "
        "true labels): a release to check the anomaly screening on (default 0)",
    )
    parser.add_argument(
        "--noise-free",
        action="store_true",
        help="write the same stars (same --seed: same ids, labels and positions) without noise, velocity "
        "residual, continuum error or masked pixels, and without ivar columns: reference spectra for "
        "`speclabel train --reference-spectra` (--format parquet only)",
    )
    parser.add_argument("--workers", type=positive_int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def check_output(out: str, fmt: str, *, overwrite: bool, label_catalogue: str | None = None) -> None:
    """Refuse an existing output without ``overwrite``; with it, clear an old FITS spectra folder."""
    from speclabel.core.errors import UsageError
    from speclabel.core.storage import exists, filesystem_and_path, join
    from speclabel.pipeline.simulate import FITS_SPECTRA_DIR, FITS_TRUTH_FILE, catalogue_format

    if label_catalogue and catalogue_format(label_catalogue) is None:
        raise UsageError(f"--label-catalogue {label_catalogue}: name it .fits, .fits.gz, .parquet or .csv")
    fs, root = filesystem_and_path(out)
    names = ("",) if fmt == "parquet" else (FITS_TRUTH_FILE, FITS_SPECTRA_DIR)
    existing = [name for name in names if exists(fs, join(root, name) if name else root)]
    if existing and not overwrite:
        shown = join(out, existing[0]) if existing[0] else out
        raise UsageError(f"{shown} exists; choose another --out or pass --overwrite")
    if label_catalogue and not overwrite and exists(*filesystem_and_path(label_catalogue)):
        raise UsageError(f"{label_catalogue} exists; choose another --label-catalogue or pass --overwrite")
    if fmt == "fits" and FITS_SPECTRA_DIR in existing:
        fs.delete_dir(join(root, FITS_SPECTRA_DIR))


def run(args: argparse.Namespace) -> int:
    from speclabel.core.errors import UsageError
    from speclabel.core.setups import get_setup
    from speclabel.pipeline.simulate import SurveyConfig, write_fits, write_parquet

    if args.noise_free and (args.format != "parquet" or args.defects or args.label_catalogue):
        raise UsageError(
            "--noise-free writes reference spectra: --format parquet, no --defects or --label-catalogue"
        )
    check_output(args.out, args.format, overwrite=args.overwrite, label_catalogue=args.label_catalogue)
    setup = get_setup(args.setup)
    config = SurveyConfig(
        n=args.n,
        seed=args.seed,
        snr_range=tuple(args.snr_range),
        release=args.release,
        chunk_size=args.chunk_size,
        label_prior=args.label_prior,
        defect_fraction=args.defects,
        noise_free=args.noise_free,
    )
    start = time.perf_counter()
    writer = write_fits if args.format == "fits" else write_parquet
    rows = writer(args.out, setup, config, workers=args.workers)
    elapsed = time.perf_counter() - start
    print(
        f"simulate: wrote {rows} spectra ({setup.name}, seed {args.seed}, {args.format}) to {args.out} "
        f"in {elapsed:.1f} s ({rows / max(elapsed, 1e-9):.0f} spectra/s)"
    )
    if args.label_catalogue:
        write_catalogue(args.label_catalogue, args.out, args.format, seed=args.seed)
    return 0


def write_catalogue(location: str, out: str, fmt: str, *, seed: int) -> None:
    """The label catalogue of the survey just written, from its true labels (the spectra's ids)."""
    import pyarrow.parquet as pq

    from speclabel.core.storage import filesystem_and_path, join
    from speclabel.pipeline.simulate import (
        FITS_TRUTH_FILE,
        LABEL_COLUMNS,
        TRUTH_COLUMNS,
        LabelCatalogueConfig,
        label_catalogue,
        write_label_catalogue,
    )

    truth_location = join(out, FITS_TRUTH_FILE) if fmt == "fits" else out
    fs, path = filesystem_and_path(truth_location)
    truth = pq.read_table(path, columns=list(TRUTH_COLUMNS), filesystem=fs)
    catalogue = label_catalogue(truth, LabelCatalogueConfig(seed=seed))
    write_label_catalogue(location, catalogue)
    nulls = ", ".join(f"{name} {catalogue.column(name).null_count}" for name in LABEL_COLUMNS)
    print(
        f"simulate: wrote label catalogue {location} ({catalogue.num_rows} rows keyed by CNAME = "
        f"spectrum_id{' (the CNAME)' if fmt == 'fits' else ''}; nulls: {nulls}; "
        f"{sum(catalogue.column('PECULI').to_pylist())} PECULI)"
    )
