"""Refining the CNN's labels with a local data-driven spectral fit, cross-validated (SELECTION numbers).

    .venv/bin/python bench/cv_refine.py --records out/cv_accuracy.jsonl [--variant default] [--limit N]

``bench/information_bound.py`` finds the spectra hold 3-5x more information on Teff, log g and
[Fe/H] than the network extracts (Cramér-Rao bounds of ~8 K, 0.019 and 0.006 dex at the twins' S/N
against the CNN's ~30 K, 0.065, 0.031) and the abundances within 1.4-1.7x of it. This tests whether
a spectral fit started from the CNN recovers that: for each held-out spectrum of ``cv_accuracy``'s
records (one member per fold, trained on the other folds), starting from the CNN's labels,

1. take the ``--neighbours`` pool stars of the training folds nearest in standardised labels;
2. fit their noise-free twins with a quadratic in the labels centred on the current labels
   (tricube weights by distance), whose linear part is the slope of the flux there;
3. solve for the labels (and, with ``--nuisance``, a continuum tilt per arm and a velocity shift;
   with ``--broadening``, a change of the line-spread width per arm, the flux's second derivative)
   by weighted least squares against the spectrum (weights ``1 / (1/ivar + r^2)``, ``r`` the local
   fit's residual), with the CNN's labels as a Gaussian prior of widths ``--prior-width``;
4. repeat from the new labels (``--iterations``).

The held-out sets are rebuilt with the records' own seeds (``cv_accuracy.held_out_sets``), so (a)
observed, (b) twins and (c) perturbed twins are the very spectra the CNN was scored on; tables as
``cv_accuracy`` (the CNN against ``<variant>+refine[+nuisance][+broadening]``, paired), and a third
record that takes only the ``--combine`` labels from the refinement and the rest from the CNN
(``...[teff,logg,feh]``): the fit moves all five labels, but the abundances it returns can be worse
than the CNN's. Neighbours come from the training folds only, never the held-out fold.
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

SPEED_OF_LIGHT_KMS = 299_792.458
# The CNN's one-member out-of-fold scatter on the twins (BENCHMARKS.md, cv_accuracy): the prior widths.
PRIOR_WIDTH = (33.5, 0.072, 0.034, 0.021, 0.063)
NUISANCE_WIDTH = (0.02, 0.02, 5.0)  # tilt per arm (fraction), velocity (km/s)
BROADENING_WIDTH = 1.0  # extra Gaussian line-spread variance per arm, pixels^2


class LocalRefiner:
    """The training folds' labels and noise-free twins, and the fit of steps 1-4 above."""

    def __init__(
        self,
        labels,
        clean,
        mask,
        setup,
        *,
        neighbours,
        iterations,
        prior_width,
        nuisance,
        free,
        broadening=False,
    ):
        self.labels, self.clean, self.mask = labels, clean.astype(np.float64), mask
        self.free = np.asarray(free)  # the labels fitted; the others stay at the CNN's
        self.scale = labels.std(0)
        self.neighbours, self.iterations = neighbours, iterations
        self.nuisance, self.broadening = nuisance, broadening
        widths = [*prior_width, *(NUISANCE_WIDTH if nuisance else ())]
        widths += [BROADENING_WIDTH] * (len(setup.arms) if broadening else 0)
        self.prior = np.diag(1.0 / np.asarray(widths) ** 2)
        self.arm_x, self.log_wave = [], []
        for arm, part in zip(setup.arms, setup.arm_slices.values(), strict=True):
            x = np.zeros(clean.shape[1])
            x[part] = 2 * (arm.wave - arm.wave_start) / (arm.wave_end - arm.wave_start) - 1
            self.arm_x.append((part, x))
            self.log_wave.append((part, np.log(arm.wave)))

    def local_model(self, centre):
        """Flux at ``centre`` [P], its slopes [L, P], the residual variance [P] and the good pixels [P]."""
        z = (self.labels - centre) / self.scale
        distance = np.sqrt((z**2).sum(1))
        nearest = np.argsort(distance)[: self.neighbours]
        u = distance[nearest] / (distance[nearest].max() * 1.0001)
        weight = np.sqrt((1 - u**3) ** 3)[:, None]
        zn = z[nearest]
        quadratic = [zn[:, j] * zn[:, k] for j in range(zn.shape[1]) for k in range(j, zn.shape[1])]
        design = np.column_stack([np.ones(len(zn)), self.labels[nearest] - centre, *quadratic])
        flux = self.clean[nearest]
        coefficients, *_ = np.linalg.lstsq(design * weight, flux * weight, rcond=None)
        residual = (flux - design @ coefficients) * weight
        dof = max(1.0, (weight**2).sum() - design.shape[1])
        variance = (residual**2).sum(0) / dof
        return coefficients[0], coefficients[1 : 1 + len(centre)], variance, self.mask[nearest].all(0)

    def refine(self, flux, ivar, mask, start):
        """Refined labels [N, L] of spectra ``flux`` [N, P] from the CNN's ``start`` [N, L], and their
        posterior standard deviations [N, L] (the fit's and the prior's information together; NaN
        for a label kept at the CNN's)."""
        out = np.empty_like(start, dtype=np.float64)
        err = np.full_like(out, np.nan)
        n_labels = start.shape[1]
        for i in range(len(flux)):
            current = start[i].astype(np.float64)
            for _ in range(self.iterations):
                model, slopes, variance, good = self.local_model(current)
                columns = [slopes[self.free]]
                if self.nuisance:
                    tilt = [np.where(x != 0, model * x, 0.0) for _, x in self.arm_x]
                    shift = np.zeros_like(model)
                    for part, log_wave in self.log_wave:
                        shift[part] = -np.gradient(model[part], log_wave) / SPEED_OF_LIGHT_KMS
                    columns.append(np.array([*tilt, shift]))
                if self.broadening:
                    # A line-spread function wider by s^2 pixels^2 changes the flux by s^2/2 f''.
                    for part, _ in self.arm_x:
                        column = np.zeros_like(model)
                        column[part] = 0.5 * np.gradient(np.gradient(model[part]))
                        columns.append(column[None, :])
                design = np.concatenate(columns)
                use = good & mask[i] & (ivar[i] > 0)
                weight = np.where(use, 1.0 / (1.0 / np.where(use, ivar[i], 1.0) + variance), 0.0)
                residual = np.where(use, flux[i] - model, 0.0)
                n_free = len(self.free)
                keep = np.concatenate([self.free, np.arange(n_labels, len(self.prior))])
                prior = self.prior[np.ix_(keep, keep)]
                prior_mean = np.zeros(len(design))
                prior_mean[:n_free] = (start[i] - current)[self.free]
                normal = (design * weight) @ design.T + prior
                step = np.linalg.solve(normal, (design * weight) @ residual + prior @ prior_mean)
                current[self.free] = current[self.free] + step[:n_free]
            out[i] = current
            err[i, self.free] = np.sqrt(np.diag(np.linalg.inv(normal))[:n_free])
        return out, err


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
    # The refined records' variant names the fit's nuisance terms: runs of several settings table together.
    terms = [term for term, on in (("nuisance", args.nuisance), ("broadening", args.broadening)) if on]
    name = "+".join([args.variant, "refine", *terms])
    out = []
    for record in records:
        began = time.time()
        folds = np.where(split.is_test(ids), -1, cv_folds(ids, record["folds"]))
        held = np.flatnonzero(folds == record["fold"])
        assert [str(s) for s in ids[held]] == record["spectrum_id"], "records are of another file"
        training = (folds >= 0) & (folds != record["fold"]) & np.isfinite(arrays["labels"]).all(1)
        refiner = LocalRefiner(
            arrays["labels"][training],
            arrays["flux_clean"][training],
            arrays["mask"][training],
            setup,
            neighbours=args.neighbours,
            iterations=args.iterations,
            prior_width=args.prior_width,
            nuisance=args.nuisance,
            broadening=args.broadening,
            free=[LABEL_NAMES.index(n) for n in args.free],
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
            lambda flux, mask, ivar, refiner=refiner, starts=starts, errs=errs: remember(
                refiner.refine(flux, ivar, mask, next(starts)), errs
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
