"""Does the per-S/N-third calibration target need more calibration stars? (issue 14, section 1)

    python bench/cv_calibration.py --records cv.jsonl rep100.jsonl rep200.jsonl ... --variant default

``bench/trust_calibration.py`` fits and scores ``<label>_err`` on the common test split: 113 stars,
~38 per S/N third. This script asks what several hundred would do, on the out-of-fold predictions
of ``bench/cv_accuracy.py``: a variant run with several ``--seed-offset`` replicates gives, for every
pool star, an ensemble of members none of which trained on it (one per replicate, trained on the
other folds), so its mean, std and residual on the star's observed spectrum are what a calibration
sees on unseen rows. Per form (``std``: a*std + floor; ``std+snr``: with a b/snr term, as the
benchmark's ``cv-snr``; the members here have no forward model, variance head or embedding
reference stored, so the model's own form is not available), fitted with
``model.calibration.fit_error_calibration``:

* ``pool``: every pool star scored by a calibration fitted on the other 4/5 of the pool (~680 stars);
* ``small``: ``--draws`` random sets of ``--small`` stars (default 113, the test split's size), each
  fitted on its set and scored on every other pool star;

and, per label and S/N third of the pool's observed spectra, whether rms(err)/rms(error) and the
1-sigma coverage meet the targets (``trust_calibration.meets_targets``), with the sampling limit of
an exactly right err on the same rows. The members trained on 2/3 of the pool, so their errors are
larger than a landed model's: this measures the calibration method, not the model. SELECTION-side
numbers: the common test split is never read.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from trust_calibration import FOLD_SALT, meets_targets, sampling_limit, thirds

from speclabel.core.labels import LABEL_NAMES
from speclabel.model.calibration import fit_error_calibration
from speclabel.model.metrics import calibration
from speclabel.model.splits import hash_uniform

FORMS = ("std", "std+snr")


def out_of_fold_ensemble(records: list[dict], variant: str) -> dict[str, np.ndarray]:
    """Mean, std (ddof 1, as ``Ensemble.predict``) and residual of the observed spectra of every pool
    star over the variant's replicates that ran its fold; the folds where fewer ran are left out."""
    by_fold: dict[int, list[dict]] = {}
    for r in records:
        if r["variant"].split("@")[0] == variant and r["fold"] >= 0:
            by_fold.setdefault(r["fold"], []).append(r)
    if not by_fold:
        raise SystemExit(f"no records of {variant!r}")
    n = max(len(runs) for runs in by_fold.values())
    if n < 2:
        raise SystemExit(f"{variant!r} has one replicate per fold: an ensemble needs --seed-offset runs")
    parts = []
    for fold, runs in sorted(by_fold.items()):
        if len(runs) < n:
            print(f"fold {fold}: {len(runs)} of {n} replicates, left out")
            continue
        assert all(r["spectrum_id"] == runs[0]["spectrum_id"] for r in runs), "replicates hold other stars"
        members = np.stack([np.asarray(r["observed"]) for r in runs])
        parts.append(
            {
                "spectrum_id": np.asarray(runs[0]["spectrum_id"]),
                "truth": np.asarray(runs[0]["truth"]),
                "snr": np.asarray(runs[0]["snr"]),
                "mean": members.mean(axis=0),
                "std": members.std(axis=0, ddof=1),
            }
        )
    data = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    data["residual"] = data["mean"] - data["truth"]
    data["members"] = n
    return data


def fit(data: dict, rows: np.ndarray, form: str):
    bound = np.repeat(1.0 / data["snr"][rows, None], len(LABEL_NAMES), axis=1) if form == "std+snr" else None
    return fit_error_calibration(
        data["residual"][rows], data["std"][rows], bound, LABEL_NAMES, np.full(len(LABEL_NAMES), np.inf)
    )


def total_error(model, data: dict, rows: np.ndarray, form: str) -> np.ndarray:
    bound = np.repeat(1.0 / data["snr"][rows, None], len(LABEL_NAMES), axis=1) if form == "std+snr" else None
    return model.total_error(data["std"][rows], bound)


def third_cells(residual: np.ndarray, err: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """[3, L]: does each (S/N third, label) cell meet both targets."""
    return np.array(
        [
            [meets_targets(residual[rows, k], err[rows, k]) for k in range(residual.shape[1])]
            for _, rows in thirds(snr)
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", nargs="+", required=True, help="bench/cv_accuracy.py --out files")
    parser.add_argument("--variant", default="default")
    parser.add_argument("--folds", type=int, default=5, help="cross-fitting folds over the pool")
    parser.add_argument("--small", type=int, default=113, help="stars in each small calibration set")
    parser.add_argument("--draws", type=int, default=50, help="small calibration sets drawn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()

    records = [json.loads(line) for path in args.records for line in open(path) if line.strip()]
    data = out_of_fold_ensemble(records, args.variant)
    n = len(data["truth"])
    fold = np.minimum((hash_uniform(data["spectrum_id"], FOLD_SALT) * args.folds).astype(int), args.folds - 1)
    print(
        f"{args.variant}: {data['members']} members per star (out of fold), {n} pool stars; S/N thirds "
        + ", ".join(name for name, _ in thirds(data["snr"]))
    )
    rng = np.random.default_rng(args.seed)
    report: dict = {"variant": args.variant, "members": data["members"], "n": n, "forms": {}}
    for form in FORMS:
        err = np.full(data["residual"].shape, np.nan)
        for f in range(args.folds):
            err[fold == f] = total_error(fit(data, fold != f, form), data, fold == f, form)
        pool_cells = third_cells(data["residual"], err, data["snr"])
        limit = sampling_limit(
            data["residual"], err, data["snr"], np.arange(n), list(LABEL_NAMES), seed=args.seed
        )
        small_met = []
        for _ in range(args.draws):
            chosen = np.zeros(n, bool)
            chosen[rng.choice(n, args.small, replace=False)] = True
            small_err = total_error(fit(data, chosen, form), data, ~chosen, form)
            small_met.append(
                int(third_cells(data["residual"][~chosen], small_err, data["snr"][~chosen]).sum())
            )
        print(f"\n{form}: rms(err)/rms(error) | within 1 err, pool stars cross-fitted ({args.folds} folds)")
        print(f"  {'selection':<22} {'n':>4} " + " ".join(f"{name:>12}" for name in LABEL_NAMES))
        for selection, rows in [("all", np.ones(n, bool)), *thirds(data["snr"])]:
            cells = []
            for k in range(len(LABEL_NAMES)):
                m = calibration(data["residual"][rows, k], err[rows, k], "err")
                cells.append(f"{m['err_ratio']:.2f}|{m['frac_within_err']:.2f}")
            print(f"  {selection:<22} {int(rows.sum()):>4} " + " ".join(f"{c:>12}" for c in cells))
        lo, hi = np.quantile(small_met, [0.05, 0.95])
        print(
            f"  S/N-third cells met: pool-fitted {int(pool_cells.sum())} of {pool_cells.size} "
            f"(an exactly right err: {limit['thirds_met_mean']:.1f}); fitted on {args.small} stars: "
            f"{np.mean(small_met):.1f} on average over {args.draws} sets (5-95 %: {lo:.0f}-{hi:.0f})"
        )
        report["forms"][form] = {
            "pool_third_cells_met": int(pool_cells.sum()),
            "pool_third_cells": pool_cells.tolist(),
            "sampling_limit": limit,
            "small_third_cells_met": small_met,
        }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
