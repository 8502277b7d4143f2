"""How well ``<label>_err`` tracks the actual error on spectra the model never saw (issue 14, section 1).

    nice -n 15 .venv/bin/python bench/trust_calibration.py --model /work/runs/model-default-8

A model with reference spectra is scored on its refined labels with the refined labels' stored
calibration, as ``speclabel label`` labels it (``--no-refine``: the network's labels and calibration).

Two samples, both outside every member's training rows:

* ``test``: the model's common test split of the shared file (``--data``), each row scored with a
  K-fold cross-fitted calibration (``--folds``, default 5: the error model refitted on the other
  4/5 of the test rows with ``model.calibration.fit_error_calibration``, as ``speclabel train`` fits
  the stored one on all of them), so no row is scored by a calibration that saw it;
* ``twins``: the same stars' noise-free twins (``--noisefree``) with fresh noise at S/N log-uniform
  in 10-150 (``--draws`` draws per star, each spectrum's own per-pixel noise pattern and arm ratio
  kept, ivar to match), scored with the cross-fitted calibration of the star's fold (``cv``) and with
  the calibration stored in the model (``stored``).

Per label, overall and in each S/N third of the sample: rms(err)/rms(error) (target 0.8-1.25) and
the fraction with |error| < err (target 0.60-0.76) and < 2 err, next to the same numbers of the
ensemble std (before). For [Al/Fe] in hot (Teff > 5800 K) metal-poor ([Fe/H] < -1) stars (true
labels): mean err against that of cool giants (Teff < 5000 K, log g < 3.5; target >= 2x) and
rms(err)/rms(error) (target 0.6-1.6). By region of label space (issue 20's regions): each region's
rms error against the sample's, and rms(sigma)/rms(error) there (issue 20: no region with an error
more than 3x the overall scatter without ``_err`` saying so). Forms compared, each cross-fitted: the
model's own (``cv``), the same without the distance from the training set (``cv-no-distance``, for
a model with an embedding reference) and without it and a variance head's term (``cv-no-var-head``,
for a model with one), std + floor (``cv-std``) and std + b/snr + floor (``cv-snr``). Prints the tables and
PASS/FAIL per target, then the sampling limit (``sampling_limit``): how often each cell would meet
the targets if the cross-fitted err were exactly right, on the same rows; ``--json FILE`` writes
every number.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from cv_accuracy import REGIONS

from speclabel.core.arrays import training_arrays
from speclabel.core.labels import LABEL_NAMES
from speclabel.model.calibration import fit_error_calibration, model_calibration, prior_widths
from speclabel.model.io import load_model
from speclabel.model.metrics import calibration
from speclabel.model.splits import SplitRule, hash_uniform

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RATIO_TARGET = (0.8, 1.25)
COVERAGE_TARGET = (0.60, 0.76)
HOT_METAL_POOR_RATIO_TARGET = (0.6, 1.6)
HOT_OVER_COOL_TARGET = 2.0
FOLD_SALT = "speclabel-trust-bench-fold"


def hot_metal_poor(true: dict) -> np.ndarray:
    return (true["teff"] > 5800) & (true["feh"] < -1)


def cool_giants(true: dict) -> np.ndarray:
    return (true["teff"] < 5000) & (true["logg"] < 3.5)


def predict(ensemble, flux, mask, ivar, refine: bool):
    """Ensemble mean (refined where ``refine``, as ``speclabel label`` labels with a model with
    reference spectra) and std, the forward model's bound at the predicted labels (None without
    one), the members' own predicted error (None without a variance head) and the relative distance
    from the training set (None without an embedding reference)."""
    prediction = ensemble.predict(flux, mask, ood=True)
    if refine:
        prediction = ensemble.refinement.apply(prediction, flux, ivar, mask)
    forward = ensemble.forward
    bound = None if forward is None else forward.label_bound(prediction.mean, ivar, mask)
    return prediction.mean, prediction.std, bound, prediction.aleatoric, prediction.ood_distance


def twin_spectra(arrays, rows, rng, snr_range=(10.0, 150.0)):
    """Fresh noise on the noise-free twins of ``rows`` at a continuum S/N log-uniform in ``snr_range``
    (the first arm's), keeping each spectrum's per-pixel noise pattern; returns flux, mask, ivar, snr."""
    clean, mask = arrays["flux_clean"][rows], arrays["mask"][rows]
    inv_sigma = np.sqrt(arrays["ivar"][rows].astype(np.float64))
    first = slice(0, arrays["first_arm_pixels"])
    own = np.array([np.median(s[first][m[first]]) for s, m in zip(inv_sigma, mask, strict=True)])[:, None]
    level = np.exp(rng.uniform(np.log(snr_range[0]), np.log(snr_range[1]), len(rows)))[:, None]
    new_inv_sigma = np.where(mask, inv_sigma * level / own, 0.0)
    with np.errstate(divide="ignore"):
        sigma = np.where(mask, 1.0 / new_inv_sigma, 0.0)
    flux = np.where(mask, clean + rng.standard_normal(clean.shape) * sigma, 1.0).astype(np.float32)
    return flux, mask, (new_inv_sigma**2).astype(np.float32), level[:, 0]


def mean_nll(residual, sigma) -> list[float]:
    """Per label, the mean Gaussian negative log-likelihood of the residuals under N(0, sigma^2):
    the proper score of an error model (lower is better), which rewards both a right size and a
    right row-to-row variation; rows with a non-finite residual or sigma are left out."""
    out = []
    for r, s in zip(residual.T, sigma.T, strict=True):
        ok = np.isfinite(r) & np.isfinite(s) & (s > 0)
        out.append(float(np.mean(0.5 * np.log(2 * np.pi * s[ok] ** 2) + 0.5 * (r[ok] / s[ok]) ** 2)))
    return out


def scores(residual, sigma, names, key) -> dict:
    """``model.metrics.calibration`` per label, its keys named for ``key`` (std before, err after)."""
    return {name: calibration(residual[:, k], sigma[:, k], key) for k, name in enumerate(names)}


def key_of(kind: str) -> str:
    return "std" if kind == "before" else "err"


def thirds(snr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    edges = np.quantile(snr, [1 / 3, 2 / 3])
    return [
        (f"S/N < {edges[0]:.0f}", snr < edges[0]),
        (f"{edges[0]:.0f} <= S/N < {edges[1]:.0f}", (snr >= edges[0]) & (snr < edges[1])),
        (f"S/N >= {edges[1]:.0f}", snr >= edges[1]),
    ]


def sample_report(residual, std, err_by_kind, snr, true, names) -> dict:
    """Every number of one sample: before (std) and after (each err kind), overall and per S/N third,
    and the [Al/Fe] groups."""
    out = {"n": len(residual), "selections": {}}
    for selection, rows in [("all", np.ones(len(residual), bool)), *thirds(snr)]:
        entry = {"n": int(rows.sum()), "before": scores(residual[rows], std[rows], names, "std"), "nll": {}}
        for kind, err in err_by_kind.items():
            entry[kind] = scores(residual[rows], err[rows], names, "err")
            entry["nll"][kind] = mean_nll(residual[rows], err[rows])
        out["selections"][selection] = entry
    overall = np.sqrt(np.nanmean(residual**2, axis=0))
    out["regions"] = {}
    # The regions are cuts on the paper's labels: a model with other labels gets none.
    has_labels = all(n in true for n in LABEL_NAMES)
    matrix = np.stack([true[n] for n in LABEL_NAMES], axis=1) if has_labels else None
    for region, (_, select) in REGIONS.items() if has_labels else ():
        rows = select(matrix)
        if rows.sum() < 2:
            continue
        entry = {
            "n": int(rows.sum()),
            "rms_error_over_overall": (np.sqrt(np.nanmean(residual[rows] ** 2, axis=0)) / overall).tolist(),
        }
        for kind, err in {"before": std, **err_by_kind}.items():
            entry[kind] = scores(residual[rows], err[rows], names, key_of(kind))
        out["regions"][region] = entry
    if "alfe" in names:
        k = names.index("alfe")
        hot, cool = hot_metal_poor(true), cool_giants(true)
        groups = {"n_hot_metal_poor": int(hot.sum()), "n_cool_giants": int(cool.sum())}
        if hot.any() and cool.any():
            for kind, sigma in {"before": std, **err_by_kind}.items():
                groups[kind] = {
                    "mean_sigma_hot_metal_poor": float(np.nanmean(sigma[hot, k])),
                    "mean_sigma_cool_giants": float(np.nanmean(sigma[cool, k])),
                    "hot_metal_poor": calibration(residual[hot, k], sigma[hot, k], key_of(kind)),
                    "rms_error_hot_metal_poor": float(np.sqrt(np.mean(residual[hot, k] ** 2))),
                }
        out["alfe_groups"] = groups
    return out


def meets_targets(residual: np.ndarray, sigma: np.ndarray) -> bool:
    """One label's cell: rms(sigma)/rms(error) and 1-sigma coverage both within the issue's targets."""
    m = calibration(residual, sigma, "err")
    ratio, within = m["err_ratio"], m["frac_within_err"]
    return RATIO_TARGET[0] <= ratio <= RATIO_TARGET[1] and COVERAGE_TARGET[0] <= within <= COVERAGE_TARGET[1]


def star_correlation(normalised: np.ndarray, star: np.ndarray) -> np.ndarray:
    """Per label, the intraclass correlation of the normalised residuals (residual / err) between the
    draws of one star (one-way ANOVA, equal draws per star, clipped to [0, 1]): how much of a twin's
    error its star fixes, whatever noise it is drawn with. 0 for one row per star."""
    _, index, counts = np.unique(star, return_inverse=True, return_counts=True)
    k = counts[0]
    if k < 2:
        return np.zeros(normalised.shape[1])
    assert (counts == k).all(), "every star needs the same number of draws"
    grouped = np.stack([normalised[index == s] for s in range(len(counts))])  # [stars, k, L]
    between = k * np.nanvar(np.nanmean(grouped, axis=1), axis=0, ddof=1)
    within = np.nanmean(np.nanvar(grouped, axis=1, ddof=1), axis=0)
    return np.clip((between - within) / (between + (k - 1) * within), 0.0, 1.0)


def sampling_limit(residual, err, snr, star, names, n_sim: int = 300, seed: int = 0) -> dict:
    """What an err exactly right would score on this sample, by Monte Carlo: residuals redrawn as
    err x z, z ~ N(0, 1) with the measured correlation between the draws of one star
    (:func:`star_correlation`), on the same rows, err and S/N thirds. Per cell (selection, label)
    the probability that it meets both targets, and the distribution of how many of the S/N-third
    cells do: with ~40 stars per third, the coverage target's width is about one binomial sigma, so
    even a perfect calibration misses some cells, and the measured count is read against this."""
    rng = np.random.default_rng(seed)
    rho = star_correlation(residual / err, star)
    _, index = np.unique(star, return_inverse=True)
    selections = [("all", np.ones(len(residual), bool)), *thirds(snr)]
    passed = np.zeros((n_sim, len(selections), len(names)), bool)
    for i in range(n_sim):
        shared = rng.standard_normal((index.max() + 1, len(names)))[index]
        z = np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.standard_normal(residual.shape)
        simulated = err * z
        for j, (_, rows) in enumerate(selections):
            for k in range(len(names)):
                passed[i, j, k] = meets_targets(simulated[rows, k], err[rows, k])
    thirds_met = passed[:, 1:].sum(axis=(1, 2))
    measured = np.array(
        [
            [meets_targets(residual[rows, k], err[rows, k]) for k in range(len(names))]
            for _, rows in selections
        ]
    )
    return {
        "n_sim": n_sim,
        "star_correlation": rho.tolist(),
        "p_cell": {
            selection: dict(zip(names, passed[:, j].mean(axis=0).tolist(), strict=True))
            for j, (selection, _) in enumerate(selections)
        },
        "thirds_cells": int(passed[0, 1:].size),
        "thirds_met_mean": float(thirds_met.mean()),
        "thirds_met_q05_q95": np.quantile(thirds_met, [0.05, 0.95]).tolist(),
        "thirds_met_measured": int(measured[1:].sum()),
        "all_met_measured": int(measured[0].sum()),
        "p_thirds_at_most_measured": float((thirds_met <= measured[1:].sum()).mean()),
    }


def check_targets(report: dict, names, kinds) -> list[tuple[str, bool, str]]:
    """(what, passed, value) per target of the issue."""
    out = []
    for sample, data in report["samples"].items():
        for kind in kinds[sample]:
            for selection, entry in data["selections"].items():
                for name in names:
                    m = entry[kind][name]
                    ratio, within = m["err_ratio"], m["frac_within_err"]
                    ok = (
                        RATIO_TARGET[0] <= ratio <= RATIO_TARGET[1]
                        and COVERAGE_TARGET[0] <= within <= COVERAGE_TARGET[1]
                    )
                    out.append(
                        (f"{sample}/{kind} {selection} {name}", ok, f"ratio {ratio:.2f} within {within:.2f}")
                    )
            groups = data.get("alfe_groups")
            if groups and kind in groups:
                g = groups[kind]
                factor = g["mean_sigma_hot_metal_poor"] / g["mean_sigma_cool_giants"]
                ratio = g["hot_metal_poor"]["err_ratio"]
                out.append(
                    (
                        f"{sample}/{kind} alfe hot metal-poor err / cool giants",
                        factor >= HOT_OVER_COOL_TARGET,
                        f"{factor:.2f}",
                    )
                )
                lo, hi = HOT_METAL_POOR_RATIO_TARGET
                out.append(
                    (
                        f"{sample}/{kind} alfe hot metal-poor rms(err)/rms(error)",
                        lo <= ratio <= hi,
                        f"{ratio:.2f} (n={groups['n_hot_metal_poor']})",
                    )
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="model directory (with a forward model and calibration)"
    )
    parser.add_argument("--data", default=str(SHARED / "giraffe_synth_train.parquet"))
    parser.add_argument("--noisefree", default=str(SHARED / "giraffe_synth_train_noisefree.parquet"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=5, help="noise draws per twin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every number here")
    parser.add_argument(
        "--no-refine",
        action="store_true",
        help="a model with reference spectra: score the network's labels",
    )
    args = parser.parse_args()

    began = time.perf_counter()
    ensemble = load_model(args.model)
    names = list(ensemble.label_names)
    setup = ensemble.setup
    split = SplitRule.from_dict(ensemble.info["training"]["split"])
    table = pq.read_table(args.data)
    table = table.filter(pa.array(split.is_test(table.column("spectrum_id"))))
    clean = pq.read_table(args.noisefree)
    arrays = training_arrays(table, setup, clean=clean)
    arrays["first_arm_pixels"] = setup.arms[0].n_pixels
    true = {n: table.column(n).to_numpy().astype(np.float64) for n in names}
    labels = np.stack([true[n] for n in names], axis=1)
    ids = arrays["spectrum_id"]
    fold = np.minimum((hash_uniform(ids, FOLD_SALT) * args.folds).astype(int), args.folds - 1)
    widths = prior_widths(ensemble)
    refine = ensemble.refinement is not None and not args.no_refine
    stored = ensemble.refinement.calibration if refine else model_calibration(ensemble.info)
    print(
        f"model {ensemble.model_id} ({ensemble.n_members} members, forward model: "
        f"{ensemble.forward is not None}, stored calibration: {stored is not None}, refined: {refine}); "
        f"{len(ids)} test-split rows, {args.folds} folds, {args.draws} twin draws"
    )

    def sample(flux, mask, ivar, snr):
        mean, std, bound, aleatoric, distance = predict(ensemble, flux, mask, ivar, refine)
        return {
            "residual": mean - labels,
            "std": std,
            "bound": bound,
            "aleatoric": aleatoric,
            "distance": distance,
            "snr": snr,
            "fold": fold,
        }

    test = sample(arrays["flux"], arrays["mask"], arrays["ivar"], arrays["snr"])
    std = test["std"]
    rng = np.random.default_rng(args.seed)
    draws = [sample(*twin_spectra(arrays, np.arange(len(ids)), rng)) for _ in range(args.draws)]
    twins = {k: None if draws[0][k] is None else np.concatenate([d[k] for d in draws]) for k in draws[0]}

    # One calibration per fold and form, fitted on the other folds' test rows; each row scored by
    # the calibration of its own fold. Forms, as (bound-like term, its prior widths, aleatoric
    # term, distance): the model's (the forward-model bound where it has one, the members' own
    # predicted error where they have a variance head, the distance from the training set where
    # it has an embedding reference), the same without the distance and without the members'
    # error, and for comparison std + floor and std + b/snr + floor (the example).
    forms = {"cv": lambda d: (d["bound"], widths, d["aleatoric"], d["distance"])}
    if test["distance"] is not None:
        forms["cv-no-distance"] = lambda d: (d["bound"], widths, d["aleatoric"], None)
    if test["aleatoric"] is not None:
        forms["cv-no-var-head"] = lambda d: (d["bound"], widths, None, None)
    forms["cv-std"] = lambda d: (None, widths, None, None)
    forms["cv-snr"] = lambda d: (
        np.repeat(1.0 / d["snr"][:, None], len(names), axis=1),
        np.full(len(names), np.inf),
        None,
        None,
    )

    def rows_of(term, rows):
        return None if term is None else term[rows]

    fold_models = {}
    for kind, extra in forms.items():
        term, w, aleatoric, distance = extra(test)
        fold_models[kind] = [
            fit_error_calibration(
                test["residual"][fold != f],
                std[fold != f],
                rows_of(term, fold != f),
                names,
                w,
                aleatoric=rows_of(aleatoric, fold != f),
                distance=rows_of(distance, fold != f),
            )
            for f in range(args.folds)
        ]

    def cross_fitted(kind, sample):
        term, _, aleatoric, distance = forms[kind](sample)
        err = np.full(sample["std"].shape, np.nan)
        for f, model in enumerate(fold_models[kind]):
            rows = sample["fold"] == f
            err[rows] = model.total_error(
                sample["std"][rows], rows_of(term, rows), rows_of(aleatoric, rows), rows_of(distance, rows)
            )
        return err

    twin_true = {n: np.tile(true[n], args.draws) for n in names}
    test_err = {kind: cross_fitted(kind, test) for kind in forms}
    twin_err = {kind: cross_fitted(kind, twins) for kind in forms}
    if stored is not None:
        # total_error reads only the terms the stored calibration uses.
        twin_err["stored"] = stored.total_error(
            twins["std"], twins["bound"], twins["aleatoric"], twins["distance"]
        )
    samples = {
        "test": sample_report(test["residual"], std, test_err, test["snr"], true, names),
        "twins": sample_report(twins["residual"], twins["std"], twin_err, twins["snr"], twin_true, names),
    }
    kinds = {"test": list(test_err), "twins": list(twin_err)}
    stars = np.arange(len(ids))
    limits = {
        "test": sampling_limit(test["residual"], test_err["cv"], test["snr"], stars, names, seed=args.seed),
        "twins": sampling_limit(
            twins["residual"], twin_err["cv"], twins["snr"], np.tile(stars, args.draws), names, seed=args.seed
        ),
    }
    # The targets are checked on the model's form (cross-fitted) and the stored calibration.
    target_kinds = {"test": ["cv"], "twins": ["cv", "stored"] if stored is not None else ["cv"]}

    report = {
        "machine": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "model_id": ensemble.model_id,
        "n_members": ensemble.n_members,
        "forward_model": ensemble.forward is not None,
        "folds": args.folds,
        "draws": args.draws,
        "fold_calibrations": {k: [m.to_dict() for m in models] for k, models in fold_models.items()},
        "stored_calibration": None if stored is None else stored.to_dict(),
        "samples": samples,
        "sampling_limit": limits,
        "seconds": time.perf_counter() - began,
    }
    print_tables(report, names, kinds)
    checks = check_targets(report, names, target_kinds)
    print("\ntargets:")
    for what, ok, value in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {value}")
    print(f"{sum(ok for _, ok, _ in checks)} of {len(checks)} targets met ({report['seconds']:.0f} s)")
    print_sampling_limit(limits, names)
    report["targets"] = [{"what": w, "passed": ok, "value": v} for w, ok, v in checks]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")


def print_sampling_limit(limits: dict, names) -> None:
    print(
        "\nsampling limit of the cross-fitted err (cv): the chance that each cell meets both targets if "
        "err were exactly right, on these rows (Monte Carlo)"
    )
    for sample, limit in limits.items():
        rho = " ".join(f"{n} {r:.2f}" for n, r in zip(names, limit["star_correlation"], strict=True))
        print(f"{sample}: correlation of a star's draws: {rho}")
        print(f"  {'selection':<22} " + " ".join(f"{n:>6}" for n in names))
        for selection, p in limit["p_cell"].items():
            print(f"  {selection:<22} " + " ".join(f"{p[n]:>6.2f}" for n in names))
        lo, hi = limit["thirds_met_q05_q95"]
        print(
            f"  S/N-third cells met: {limit['thirds_met_measured']} of {limit['thirds_cells']} measured; "
            f"exactly right err: {limit['thirds_met_mean']:.1f} on average (5-95 %: {lo:.0f}-{hi:.0f}), "
            f"{limit['p_thirds_at_most_measured']:.2f} of draws meet no more than measured"
        )


def print_tables(report, names, kinds) -> None:
    for sample, data in report["samples"].items():
        print(f"\n{sample} ({data['n']} spectra): rms(sigma)/rms(error) | within 1 sigma | within 2 sigma")
        header = f"{'selection':<22} {'label':<6} {'n':>5} " + " ".join(
            f"{k:>20}" for k in ("before", *kinds[sample])
        )
        print(header)
        for selection, entry in data["selections"].items():
            for name in names:
                cells = []
                for kind in ("before", *kinds[sample]):
                    m = entry[kind][name]
                    key = key_of(kind)
                    values = (m[f"{key}_ratio"], m[f"frac_within_{key}"], m[f"frac_within_2{key}"])
                    cells.append(" ".join(f"{v:>6.2f}" for v in values))
                print(f"{selection:<22} {name:<6} {entry['n']:>5} " + " ".join(f"{c:>20}" for c in cells))
        print(f"\n{sample}: mean negative log-likelihood of the residuals under each err (lower is better)")
        print(f"{'selection':<22} {'form':<15} " + " ".join(f"{n:>8}" for n in names))
        for selection, entry in data["selections"].items():
            for kind in kinds[sample]:
                print(f"{selection:<22} {kind:<15} " + " ".join(f"{v:>8.3f}" for v in entry["nll"][kind]))
        print(
            f"\n{sample} by region (cuts on the true labels, bench/cv_accuracy.REGIONS): rms(error) / "
            "overall rms(error) | rms(sigma)/rms(error)"
        )
        print(
            f"{'region':<22} {'label':<6} {'n':>5} {'error/all':>9} "
            + " ".join(f"{k:>15}" for k in ("before", *kinds[sample]))
        )
        for region, entry in data["regions"].items():
            for k, name in enumerate(names):
                cells = [
                    f"{entry[kind][name][f'{key_of(kind)}_ratio']:>15.2f}"
                    for kind in ("before", *kinds[sample])
                ]
                print(
                    f"{region:<22} {name:<6} {entry['n']:>5} {entry['rms_error_over_overall'][k]:>9.2f} "
                    + " ".join(cells)
                )
        groups = data.get("alfe_groups")
        if groups and "before" in groups:
            print(
                f"[Al/Fe]: {groups['n_hot_metal_poor']} hot metal-poor (Teff > 5800, [Fe/H] < -1), "
                f"{groups['n_cool_giants']} cool giants (Teff < 5000, log g < 3.5)"
            )
            for kind in ("before", *kinds[sample]):
                g = groups[kind]
                hot = g["hot_metal_poor"]
                key = key_of(kind)
                hot_sigma, cool_sigma = g["mean_sigma_hot_metal_poor"], g["mean_sigma_cool_giants"]
                print(
                    f"  {kind:<7} mean sigma hot metal-poor {hot_sigma:.3f}, cool giants {cool_sigma:.3f}; "
                    f"hot metal-poor rms error {g['rms_error_hot_metal_poor']:.3f}, "
                    f"rms(sigma)/rms(error) {hot[f'{key}_ratio']:.2f}, "
                    f"within 1 sigma {hot[f'frac_within_{key}']:.2f}"
                )


if __name__ == "__main__":
    main()
