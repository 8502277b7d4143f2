"""Refining the CNN's labels with a local data-driven spectral fit, cross-validated (SELECTION numbers).

    .venv/bin/python bench/cv_refine.py --records out/cv_accuracy.jsonl [--variant default] [--limit N]

``bench/information_bound.py`` finds the spectra hold 3-5x more information on Teff, log g and
[Fe/H] than the network extracts (Cramér-Rao bounds of ~8 K, 0.019 and 0.006 dex at the twins' S/N
against the CNN's ~30 K, 0.065, 0.031) and the abundances within 1.4-1.7x of it. This tests whether
a spectral fit started from the CNN recovers that: each held-out spectrum of ``cv_accuracy``'s
records (one member per fold, trained on the other folds) is refined by ``model.refine`` from the
CNN's labels, with the ``--neighbours`` nearest pool stars of the training folds (never the
held-out fold) and their noise-free twins as the reference library, the CNN's labels as the prior
(widths ``--prior-width``), and with ``--nuisance`` a continuum tilt per arm and a velocity shift,
with ``--broadening`` a change of the line-spread width per arm fitted alongside.

The held-out sets are rebuilt with the records' own seeds (``cv_accuracy.held_out_sets``), so (a)
observed, (b) twins and (c) perturbed twins are the very spectra the CNN was scored on; tables as
``cv_accuracy`` (the CNN against ``<variant>+refine[+nuisance][+broadening]``, paired), and a third
record that takes only the ``--combine`` labels from the refinement and the rest from the CNN
(``...[teff,logg,feh]``): the fit moves all five labels, but the abundances it returns can be worse
than the CNN's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
from accuracy_shared import load_shared
from cv_accuracy import cv_folds, held_out_sets, print_tables

from speclabel.core.labels import LABEL_NAMES
from speclabel.model.fit import EnsembleConfig
from speclabel.model.refine import ReferenceLibrary, RefineConfig, refine_labels

# The CNN's one-member out-of-fold scatter on the twins (BENCHMARKS.md, cv_accuracy): the prior widths.
PRIOR_WIDTH = (33.5, 0.072, 0.034, 0.021, 0.063)


def remember(labels_and_err, errs: list) -> np.ndarray:
    labels, err = labels_and_err
    errs.append(err)
    return labels


def combined(cnn: dict, refined: dict, take: list[int]) -> dict:
    """A record with the ``take`` labels of ``refined`` and the others of ``cnn``, spectrum by spectrum."""
    record = {**cnn, "variant": f"{refined['variant']}[{','.join(LABEL_NAMES[i] for i in take)}]"}
    for key in ("observed", "twins", "perturbed"):
        values = np.array(cnn[key], dtype=np.float64)
        values[..., take] = np.asarray(refined[key])[..., take]
        record[key] = values.tolist()
    return record


def print_calibration(records: list[dict]) -> None:
    """How well the refinement's posterior std follows its actual error on the observed spectra,
    per S/N third: rms(err)/rms(error) (issue 14's target 0.8-1.25) | fraction within 1 err (0.60-0.76)."""
    truth = np.concatenate([r["truth"] for r in records])
    error = np.concatenate([r["observed"] for r in records]) - truth
    err = np.concatenate([r["observed_err"] for r in records])
    snr = np.concatenate([r["snr"] for r in records])
    edges = np.quantile(snr, [0, 1 / 3, 2 / 3, 1])
    print("\nrefined labels' posterior std against their error, observed spectra: ratio | within 1 err")
    print(f"{'S/N':<20} {'n':>5} " + " ".join(f"{n:>14}" for n in LABEL_NAMES))
    thirds = [(f"{lo:.0f}-{hi:.0f}", (snr >= lo) & (snr <= hi)) for lo, hi in itertools.pairwise(edges)]
    for name, rows in [("all", np.ones(len(snr), bool)), *thirds]:
        ratio = np.sqrt(np.nanmean(err[rows] ** 2, 0) / np.mean(error[rows] ** 2, 0))
        within = np.mean(np.abs(error[rows]) < err[rows], 0)
        cells = " ".join(f"{f'{r:.2f}|{w:.2f}':>14}" for r, w in zip(ratio, within, strict=True))
        print(f"{name:<20} {int(rows.sum()):>5} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", required=True, help="cv_accuracy.py --out file (JSON lines)")
    parser.add_argument("--variant", default="default")
    parser.add_argument("--neighbours", type=int, default=80)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--prior-width", type=float, nargs=5, default=PRIOR_WIDTH)
    parser.add_argument("--nuisance", action="store_true", help="fit a tilt per arm and a velocity shift too")
    parser.add_argument(
        "--broadening", action="store_true", help="fit a line-spread width change per arm too"
    )
    parser.add_argument(
        "--own-lines",
        nargs="*",
        default=[],
        choices=LABEL_NAMES,
        help="labels fitted once more from their own line windows only, after the joint fit",
    )
    parser.add_argument("--own-lines-iterations", type=int, default=RefineConfig.own_lines_iterations)
    parser.add_argument(
        "--free", nargs="*", default=list(LABEL_NAMES), choices=LABEL_NAMES, help="labels to fit"
    )
    parser.add_argument(
        "--combine",
        nargs="*",
        default=["teff", "logg", "feh"],
        choices=LABEL_NAMES,
        help="labels the combined record takes from the refinement (the rest from the CNN)",
    )
    parser.add_argument("--max-draws", type=int, default=None, help="refine the first N twin draws only")
    parser.add_argument("--limit", type=int, default=None, help="the first N held-out stars per fold only")
    parser.add_argument("--out", default=None, help="write the refined records here (JSON lines)")
    args = parser.parse_args()
    arrays, setup = load_shared()
    ids = arrays["spectrum_id"]
    records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
    records = [r for r in records if r["variant"] == args.variant]
    if not records:
        parser.error(f"no records of variant {args.variant!r} in {args.records}")
    split = EnsembleConfig().split
    config = RefineConfig(
        prior_width=tuple(args.prior_width),
        neighbours=args.neighbours,
        iterations=args.iterations,
        fitted=tuple(args.free),
        tilt_width=RefineConfig.tilt_width if args.nuisance else None,
        velocity_width_kms=RefineConfig.velocity_width_kms if args.nuisance else None,
        broadening_width_px2=RefineConfig.broadening_width_px2 if args.broadening else None,
        own_lines=tuple(args.own_lines),
        own_lines_iterations=args.own_lines_iterations,
    )
    # The refined records' variant names the fit's nuisance terms: runs of several settings table together.
    terms = [term for term, on in (("nuisance", args.nuisance), ("broadening", args.broadening)) if on]
    if args.own_lines:
        terms.append(f"own{args.own_lines_iterations}:" + ",".join(args.own_lines))
    name = "+".join([args.variant, "refine", *terms])
    out = []
    for record in records:
        began = time.time()
        folds = np.where(split.is_test(ids), -1, cv_folds(ids, record["folds"]))
        held = np.flatnonzero(folds == record["fold"])
        assert [str(s) for s in ids[held]] == record["spectrum_id"], "records are of another file"
        training = (folds >= 0) & (folds != record["fold"]) & np.isfinite(arrays["labels"]).all(1)
        library = ReferenceLibrary(
            arrays["labels"][training], arrays["flux_clean"][training], arrays["mask"][training], setup
        )
        keep = slice(None) if args.limit is None else slice(0, args.limit)
        held = held[keep]
        # The CNN's labels of the very spectra held_out_sets passes, in its order: per draw (b) then
        # (c), and (a) last.
        draws = record["draws"] if args.max_draws is None else min(args.max_draws, record["draws"])
        twins = np.asarray(record["twins"])[:draws, keep]
        perturbed = np.asarray(record["perturbed"])[:draws, keep]
        observed = np.asarray(record["observed"])[keep]
        starts = iter([*(s for draw in zip(twins, perturbed, strict=True) for s in draw), observed])
        errs: list[np.ndarray] = []
        sets = held_out_sets(
            arrays,
            setup,
            np.isin(np.arange(len(ids)), held),
            lambda flux, mask, ivar, library=library, starts=starts, errs=errs: remember(
                refine_labels(library, config, flux, ivar, mask, next(starts)), errs
            ),
            seed=record["fold"],
            draws=draws,
            rv_sigma=record["rv_sigma"],
            tilt=record["tilt"],
        )
        cnn = {
            **record,
            "spectrum_id": record["spectrum_id"][keep],
            "truth": record["truth"][keep],
            "snr": record["snr"][keep],
            "observed": observed.tolist(),
            "twins": twins.tolist(),
            "perturbed": perturbed.tolist(),
        }
        cnn["draws"] = draws
        refined = {**cnn, **sets, "variant": name, "observed_err": errs[-1].tolist()}
        out += [cnn, refined, combined(cnn, refined, [LABEL_NAMES.index(n) for n in args.combine])]
        print(f"fold {record['fold']}: {len(held)} stars refined in {time.time() - began:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out))
    print_tables(out)
    print_calibration([r for r in out if "observed_err" in r])


if __name__ == "__main__":
    main()
