"""What the spectra can say about each label: Cramér-Rao bounds by region of label space and S/N.

    .venv/bin/python bench/information_bound.py [--neighbours 40] [--json out/information_bound.json]

Issue 20's scatter targets are only reachable where the spectra hold the information. This measures
how much they hold, from the shared file's training pool alone (the common test split is not read).
For each pool star, a local linear model of the noise-free flux in the five labels is fitted by least
squares on the noise-free twins of its ``--neighbours`` nearest pool stars in standardised label space
(the star included). Its slopes ``J`` [L, P] and the star's own noise pattern at continuum S/N ``s``
(``accuracy_shared.twin_ivar``) give the Fisher matrix ``F = J diag(w) J^T`` and the marginal bound
``sqrt(diag(F^-1))`` per label: the smallest scatter any unbiased method could reach from that
spectrum with the other four labels unknown. Two weightings:

* ``noise``: ``w = ivar``, photon noise only: the information the lines carry.
* ``noise+unexplained``: ``w = 1 / (1/ivar + r^2)``, ``r`` the local fit's residual per pixel: also
  what five labels do not explain in a pixel (the synthesis' other parameters, and curvature the
  local plane misses), which no five-label method can use either.

Per region (``cv_accuracy.REGIONS``) the table gives the rms of the stars' bounds at the twins' S/N
(log-uniform 50-150, as ``cv_accuracy``'s set (b)), with a bootstrap uncertainty over stars, to set
beside the scatter the model reaches there (BENCHMARKS.md). Which way the estimate errs: slopes fitted
on few neighbours carry noise that looks like information (a bound too small), and a plane fitted over
neighbours that spread far (the sparse corners) takes the slope of stars with stronger lines (too
small again). So a bound that is still above a target says the target cannot be met from these
spectra; one far below it says only that the information may be there. The ``null`` column repeats
the ``noise`` bound with each label shuffled among the neighbours: the bound that the fit's own noise
would give, which must be much larger than the real one for the table to mean anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from accuracy_shared import load_shared, twin_ivar
from cv_accuracy import REGIONS

from speclabel.core.labels import LABEL_NAMES
from speclabel.model.fit import EnsembleConfig

TWIN_SNR = (50.0, 150.0)
SNR_STEPS = 9  # S/N levels, log-spaced over TWIN_SNR, that the twins' rms bound averages over
FIXED_SNR = (20.0, 50.0, 100.0)


def local_slopes(labels, clean, mask, neighbours, shrink_sigma: float):
    """A plane through the neighbours' noise-free fluxes: slopes [L, P] per physical label unit, each
    shrunk towards zero by its standard error (``shrink_sigma``; 0: as fitted), and the rms residual
    per pixel [P] (inf where a neighbour lacks the pixel)."""
    x = labels[neighbours] - labels[neighbours].mean(0)
    design = np.column_stack([np.ones(len(x)), x])
    good = mask[neighbours]
    flux = np.where(good, clean[neighbours], 0.0)
    # Pixels masked in some neighbours: fitted by the same plane on the rows that have them would need
    # one solve per pattern; the mask is the same for nearly every row, so such pixels get no weight.
    complete = good.all(0)
    coefficients, *_ = np.linalg.lstsq(design, flux, rcond=None)
    residual = flux - design @ coefficients
    dof = len(x) - design.shape[1]
    rms = np.sqrt((residual**2).sum(0) / dof)
    slopes = coefficients[1:]
    if shrink_sigma > 0:
        # As model.forward.ForwardModel.bound_coefficients: summed over ~16 000 pixels, slopes that
        # are only the fit's noise add up to a bound as small as the real one for the abundances;
        # a slope within a few standard errors of zero counts as none.
        error = rms * np.sqrt(np.diag(np.linalg.pinv(design.T @ design)))[1:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (shrink_sigma * error / slopes) ** 2
        slopes = slopes * np.where(np.isfinite(ratio), np.maximum(0.0, 1.0 - ratio), 0.0)
    return slopes, np.where(complete, rms, np.inf)


def marginal_bound(fisher: np.ndarray) -> np.ndarray:
    """sqrt(diag(F^-1)) per matrix of ``fisher`` [..., L, L]; inf where F is singular."""
    out = np.full(fisher.shape[:-1], np.inf)
    flat, bound = fisher.reshape(-1, *fisher.shape[-2:]), out.reshape(-1, fisher.shape[-1])
    for i, matrix in enumerate(flat):
        try:
            bound[i] = np.sqrt(np.diag(np.linalg.inv(matrix)))
        except np.linalg.LinAlgError:
            continue
    return np.where(np.isfinite(out), out, np.inf)


def star_fisher(arrays, star: int, slopes, rms, snr_levels) -> dict[str, np.ndarray]:
    """The star's Fisher matrices [S/N levels, L, L] under both weightings."""
    rows = np.full(len(snr_levels), star)
    ivar = twin_ivar(arrays, rows, np.asarray(snr_levels)).astype(np.float64)
    ivar = np.where(np.isfinite(rms), ivar, 0.0)
    with np.errstate(divide="ignore"):
        unexplained = np.where(ivar > 0, 1.0 / (1.0 / ivar + rms**2), 0.0)
    return {
        "noise": np.einsum("kp,sp,lp->skl", slopes, ivar, slopes),
        "noise+unexplained": np.einsum("kp,sp,lp->skl", slopes, unexplained, slopes),
    }


def bootstrap_rms(values: np.ndarray, n_boot: int = 300, seed: int = 0) -> tuple[float, float]:
    if not np.isfinite(values).all():
        return float("inf"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), (n_boot, len(values)))
    boot = np.sqrt(np.mean(values[picks] ** 2, axis=1))
    return float(np.sqrt(np.mean(values**2))), float(boot.std())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--neighbours", type=int, default=40, help="pool stars per local fit (>= 8)")
    parser.add_argument("--json", default=None, help="write the per-region numbers here")
    parser.add_argument("--seed", type=int, default=0, help="the null column's shuffles")
    parser.add_argument(
        "--shrink-sigma", type=float, default=2.0, help="slopes within this many standard errors count as 0"
    )
    args = parser.parse_args()
    if args.neighbours < len(LABEL_NAMES) + 3:
        parser.error(f"--neighbours must be at least {len(LABEL_NAMES) + 3}")
    started = time.time()
    arrays, _ = load_shared()
    pool = np.flatnonzero(~EnsembleConfig().split.is_test(arrays["spectrum_id"]))
    labels = arrays["labels"][pool]
    complete = np.isfinite(labels).all(1)
    pool, labels = pool[complete], labels[complete]
    clean, mask = arrays["flux_clean"][pool].astype(np.float64), arrays["mask"][pool]
    standard = (labels - labels.mean(0)) / labels.std(0)
    distance = ((standard[:, None, :] - standard[None, :, :]) ** 2).sum(-1)
    nearest = np.argsort(distance, axis=1)[:, : args.neighbours]
    twin_levels = np.exp(np.linspace(*np.log(TWIN_SNR), SNR_STEPS))
    levels = np.concatenate([twin_levels, FIXED_SNR])
    rng = np.random.default_rng(args.seed)
    fisher = {"noise": [], "noise+unexplained": [], "null": []}
    for i, neighbours in enumerate(nearest):
        slopes, rms = local_slopes(labels, clean, mask, neighbours, args.shrink_sigma)
        for key, value in star_fisher(arrays, pool[i], slopes, rms, levels).items():
            fisher[key].append(value)
        shuffled = np.column_stack([labels[rng.permutation(neighbours), k] for k in range(labels.shape[1])])
        null_labels = labels.copy()
        null_labels[neighbours] = shuffled
        null_slopes, null_rms = local_slopes(null_labels, clean, mask, neighbours, args.shrink_sigma)
        fisher["null"].append(star_fisher(arrays, pool[i], null_slopes, null_rms, levels)["noise"])
    fisher = {key: np.array(value) for key, value in fisher.items()}  # [stars, levels, L, L]

    regions = {"all": np.ones(len(labels), bool)} | {
        name: rule(labels) for name, (_, rule) in REGIONS.items()
    }
    results = {}
    print(
        f"Cramér-Rao bounds, {len(pool)} pool stars, {args.neighbours} neighbours per local fit, slopes "
        f"shrunk at {args.shrink_sigma:g} sigma; rms over stars at the twins' S/N {TWIN_SNR[0]:g}-"
        f"{TWIN_SNR[1]:g} (± bootstrap over stars). 'spread': the region's own label scatter (what "
        "predicting its mean gives); '+prior': the noise+unexplained bound with that spread as a prior"
    )
    print(f"{'region':24s} {'n':>4s} {'':18s} " + " ".join(f"{n:>14s}" for n in LABEL_NAMES))
    for name, rows in regions.items():
        if rows.sum() < 5:
            continue
        spread = labels[rows].std(0)
        with_prior = fisher["noise+unexplained"][rows] + np.diag(1.0 / spread**2)
        bounds = {key: marginal_bound(fisher[key][rows]) for key in ("noise", "noise+unexplained", "null")}
        bounds["+prior"] = marginal_bound(with_prior)  # [stars, levels, L]
        results[name] = {"n": int(rows.sum()), "spread": dict(zip(LABEL_NAMES, spread.tolist(), strict=True))}
        print(
            f"{name:24s} {int(rows.sum()):4d} {'spread':18s} " + " ".join(f"{v:8.3g}      " for v in spread)
        )
        for key, bound in bounds.items():
            per_star = np.sqrt(np.mean(bound[:, :SNR_STEPS] ** 2, axis=1))  # the twins' S/N, per star
            cells = [bootstrap_rms(per_star[:, k]) for k in range(len(LABEL_NAMES))]
            results[name][key] = {n: c for n, c in zip(LABEL_NAMES, cells, strict=True)}
            results[name][key]["at_snr"] = {
                f"{snr:g}": dict(
                    zip(LABEL_NAMES, np.sqrt(np.mean(bound[:, SNR_STEPS + j] ** 2, 0)).tolist(), strict=True)
                )
                for j, snr in enumerate(FIXED_SNR)
            }
            text = " ".join(f"{v:8.3g} ±{e:<5.2g}" for v, e in cells)
            print(f"{name:24s} {int(rows.sum()):4d} {key:18s} {text}")
    print(f"({time.time() - started:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {
            "neighbours": args.neighbours,
            "shrink_sigma": args.shrink_sigma,
            "pool_stars": len(pool),
            "machine": platform.node(),
            "date": time.strftime("%Y-%m-%d"),
            "regions": results,
        }
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
