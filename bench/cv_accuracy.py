"""Grouped k-fold cross-validation over the shared file's training pool: the SELECTION numbers.

    nice -n 15 .venv/bin/python bench/cv_accuracy.py --variants default default+rv+tilt --folds 3 --epochs 40

Model choices (preset, recipe, augmentation) are made on these numbers, never on the common test
split: the pool is every row outside that split (``model.splits.SplitRule``), and the test rows are
never read here; ``bench/accuracy_shared.py`` scores them, once, at the end. Pool row ``i`` is in fold
``floor(k u(cv_salt, spectrum_id_i))`` (``model.splits.hash_uniform``), so a star keeps its fold
however the file grows. For each fold and variant one member (seed = fold + ``--seed-offset``, one
torch thread; a nonzero offset is a replicate, tabled as ``<variant>@seed+<offset>``) trains
on the other folds, with the variant's recipe from ``bench/accuracy_shared.py`` (its validation rows:
the split rule's ``member_masks`` within those folds; label scaling and input reference from them
alone), and scores the held-out fold on

* (a) ``observed``: its observed spectra (their own S/N),
* (b) ``twins``: its noise-free twins with fresh noise at S/N 50-150, ``--draws`` draws per star,
* (c) ``perturbed``: the same draws (the same noise) of the twins seen through a radial-velocity
  residual (Gaussian, sigma ``--rv-sigma`` km/s) and a continuum tilt (uniform in +-``--tilt`` per
  arm), as real reductions leave.

The out-of-fold predictions of all folds are pooled. Per label: the scatter of (a) overall and at
S/N >= 50, of (a) at S/N >= 50, (b) and (c) by region of label space (``REGIONS``, printed) and of
(a) by S/N bin, each cell with its number of stars and a bootstrap uncertainty (stars resampled, all
draws of a star together), the robustness ratio (c) / (b) (paired bootstrap), and each variant's
scatter minus the first variant's on the same stars, overall and by region (paired bootstrap: the
stars' sampling only, not the training seed's; ``--seed-offset`` replicates measure that).
``--ensembles`` adds each variant's replicates averaged star by star (``<variant>@mean-of-<n>``), paired
with the first variant's: a recipe's gain for one member can vanish in an ensemble. Each fold's
predictions are appended to ``--out`` as a JSON line as soon as it is done, so that a run cut short
still tables (``--table-only``), and a rerun skips the folds already there. Folds can run in separate
processes (``--only-folds 1 --out part1.jsonl``, ...): concatenate the files and table them with
``--table-only --out all.jsonl``.

``--model DIR ...`` is the end of the protocol, not a selection step: it scores finished model
directories (``speclabel train`` on the shared file) on their common test split, with the same
sets (a), (b), (c) and the same tables, each labelled as test-split numbers. Run it once per landed
model; nothing is chosen on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from accuracy_shared import VARIANTS, fit_cannon, load_shared, noisy_twins, variant_config

from speclabel.core.labels import LABEL_NAMES
from speclabel.model.ensemble import Ensemble
from speclabel.model.fit import EnsembleConfig, sample_weights
from speclabel.model.io import load_model
from speclabel.model.metrics import snr_bin_name, snr_bins
from speclabel.model.scaling import LabelScaler
from speclabel.model.splits import SplitRule, hash_uniform
from speclabel.model.training import ArrayData, continuum_tilt, input_reference, rv_shift, train_member

CV_SALT = "speclabel-cv-v1"
TEST_SEED = 1_000_003  # the noise draws of --model (folds use their own number)
SNR_EDGES = (20.0, 50.0, 100.0)
TEFF, LOGG, FEH = (LABEL_NAMES.index(n) for n in ("teff", "logg", "feh"))


def _clump(lab):
    return (lab[:, LOGG] >= 2.2) & (lab[:, LOGG] < 2.8) & (lab[:, TEFF] >= 4500) & (lab[:, TEFF] < 5200)


# The regions of label space, in one place: name -> (cut as printed, rows of labels [N, L] in it).
REGIONS = {
    "cool giants": (
        "Teff < 5800 K, log g <= 3.5, not red clump",
        lambda lab: (lab[:, TEFF] < 5800) & (lab[:, LOGG] <= 3.5) & ~_clump(lab),
    ),
    "red clump": ("4500 <= Teff < 5200 K, 2.2 <= log g < 2.8", _clump),
    "cool dwarfs": ("Teff <= 5800 K, log g > 3.5", lambda lab: (lab[:, TEFF] <= 5800) & (lab[:, LOGG] > 3.5)),
    "hot dwarfs": ("Teff > 5800 K, log g > 3.5", lambda lab: (lab[:, TEFF] > 5800) & (lab[:, LOGG] > 3.5)),
    "metal-poor": ("[Fe/H] < -1 (any Teff, log g)", lambda lab: lab[:, FEH] < -1),
    "hot metal-poor dwarfs": (
        "Teff > 5800 K, log g > 3.5, [Fe/H] < -1",
        lambda lab: (lab[:, TEFF] > 5800) & (lab[:, LOGG] > 3.5) & (lab[:, FEH] < -1),
    ),
    # Issue 20's [Al/Fe] target holds "where its lines are measurable"; it still includes the cool
    # metal-poor stars, whose Al I lines are weak too, so both are tabled.
    "Al measurable": (
        "Teff < 5800 K or [Fe/H] > -1 (issue 20's [Al/Fe] target)",
        lambda lab: (lab[:, TEFF] < 5800) | (lab[:, FEH] > -1),
    ),
    "cool metal-poor": (
        "Teff < 5800 K, [Fe/H] < -1",
        lambda lab: (lab[:, TEFF] < 5800) & (lab[:, FEH] < -1),
    ),
}

SETS = {
    "observed": "(a) observed spectra",
    "twins": "(b) noise-free twins, fresh noise S/N 50-150",
    "perturbed": "(c) the same twins + RV residual + continuum tilt",
}


def cv_folds(spectrum_ids, k: int) -> np.ndarray:
    """The fold (0 .. k-1) of each id, by a hash of the id alone."""
    return np.minimum((hash_uniform(spectrum_ids, CV_SALT) * k).astype(int), k - 1)


def reduction_residuals(arrays, rows, setup, rng, *, rv_sigma, tilt):
    """The rows' noise-free twins seen at a Gaussian RV residual (sigma ``rv_sigma`` km/s) and tilted
    by a uniform fraction in +-``tilt`` per arm (``model.training.rv_shift``, ``continuum_tilt``)."""
    clean = torch.as_tensor(arrays["flux_clean"][rows], dtype=torch.float64)
    mask = torch.as_tensor(arrays["mask"][rows])
    velocity = torch.as_tensor(rng.normal(0.0, rv_sigma, len(clean)))
    clean, mask = rv_shift(clean, mask, setup, velocity)
    slopes = torch.as_tensor(rng.uniform(-tilt, tilt, (len(clean), len(setup.arms))))
    # Good where the shifted spectrum and the original are: the noise follows the original's ivar.
    return continuum_tilt(clean, mask, setup, slopes).numpy(), mask.numpy() & arrays["mask"][rows]


def variant_label(name: str, seed_offset: int) -> str:
    """The variant's name in the records and tables: a replicate with other seeds is told apart."""
    return f"{name}@seed+{seed_offset}" if seed_offset else name


def run_fold(name, fold, k, epochs, *, draws, rv_sigma, tilt, seed_offset=0):
    """Train the variant on the folds other than ``fold`` and score ``fold`` on (a), (b) and (c)."""
    arrays, setup = load_shared()
    arch, config = variant_config(name, epochs)
    ensemble_config = EnsembleConfig()
    split = ensemble_config.split
    ids = arrays["spectrum_id"]
    folds = np.where(split.is_test(ids), -1, cv_folds(ids, k))  # -1: the common test split, never used
    held = folds == fold
    train_rows, val_rows = split.member_masks(ids, fold)
    train_rows, val_rows = train_rows & (folds != fold), val_rows & (folds != fold)
    scaler = LabelScaler.fit(arrays["labels"][train_rows | val_rows], ensemble_config.scaling)
    # Density weights (if the recipe has them) from the fold's training pool alone, as fit_ensemble does.
    weights = sample_weights(arrays, train_rows | val_rows, config, LABEL_NAMES)
    if weights is not None:
        arrays = {**arrays, "sample_weight": weights}
    train, val = ArrayData.from_arrays(arrays, train_rows), ArrayData.from_arrays(arrays, val_rows)
    reference = input_reference(train, val) if arch.center_input else None
    began, cpu = time.perf_counter(), time.process_time()
    result = train_member(
        arch, setup, scaler, config.replace(seed=fold + seed_offset), train, val, reference=reference
    )
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu
    model = Ensemble(setup, arch, scaler, [result.network])
    sets = held_out_sets(
        arrays,
        setup,
        held,
        lambda flux, mask, _: model.predict(flux, mask).mean,
        seed=fold,
        draws=draws,
        rv_sigma=rv_sigma,
        tilt=tilt,
    )
    return {
        "variant": variant_label(name, seed_offset),
        "fold": fold,
        "seed": fold + seed_offset,
        "folds": k,
        "epochs": config.epochs,
        "draws": draws,
        "rv_sigma": rv_sigma,
        "tilt": tilt,
        "arch": arch.to_dict(),
        "train": config.to_dict(),
        "fingerprint": arrays["fingerprint"],
        "n_pool": int((folds >= 0).sum()),
        "n_train": result.n_train,
        "n_val": result.n_val,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        **sets,
        "machine": f"{platform.node()}, torch threads 1",
        "date": time.strftime("%Y-%m-%d"),
    }


def held_out_sets(arrays, setup, held, label, *, seed, draws, rv_sigma, tilt) -> dict:
    """Sets (a), (b), (c) of the ``held`` rows labelled by ``label(flux, mask, ivar) -> [N, L]``, the
    noise and perturbation draws seeded by ``seed`` (a fold's number; :data:`TEST_SEED` for the test
    split): every method scored with the same seed sees the same spectra."""
    twins, perturbed = [], []
    for draw in range(draws):
        flux, mask, _, ivar = noisy_twins(arrays, held, np.random.default_rng([seed, draw]))
        twins.append(label(flux, mask, ivar))
        shifted, shifted_mask = reduction_residuals(
            arrays, held, setup, np.random.default_rng([seed, draw, 1]), rv_sigma=rv_sigma, tilt=tilt
        )
        # The same noise draw as the twin above (same generator seed), on the perturbed spectrum.
        flux, mask, _, ivar = noisy_twins(
            arrays, held, np.random.default_rng([seed, draw]), clean=shifted, mask=shifted_mask
        )
        perturbed.append(label(flux, mask, ivar))
    return {
        "spectrum_id": [str(s) for s in arrays["spectrum_id"][held]],
        "truth": arrays["labels"][held].tolist(),
        "snr": arrays["snr"][held].tolist(),
        "observed": label(arrays["flux"][held], arrays["mask"][held], arrays["ivar"][held]).tolist(),
        "twins": np.stack(twins).tolist(),
        "perturbed": np.stack(perturbed).tolist(),
    }


def score_model(location: str, *, draws, rv_sigma, tilt, cannon: bool = False) -> list[dict]:
    """A finished model directory on its common test split: the record :func:`run_fold` gives for a
    fold, with ``fold`` -1 and the sets (a), (b), (c) of the test stars (``--model``); with
    ``cannon``, also a quadratic Cannon fitted on the same model's training pool, scored the same way."""
    arrays, setup = load_shared()
    model = load_model(location, setup=setup)
    split = SplitRule.from_dict(model.info["training"]["split"])
    held = split.is_test(arrays["spectrum_id"])
    training = model.info["training"]
    common = {
        "fold": -1,
        "folds": 0,
        "draws": draws,
        "rv_sigma": rv_sigma,
        "tilt": tilt,
        "fingerprint": arrays["fingerprint"],
        "n_pool": int((~held).sum()),
        "cpu_seconds": float("nan"),
        "machine": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
    }
    # A model with reference spectra is scored twice on the same spectra: the network alone, and
    # refined as `speclabel label` labels it.
    labellers = {"": lambda flux, mask, _: model.predict(flux, mask).mean}
    if model.refinement is not None:
        labellers["+refine"] = lambda flux, mask, ivar: (
            model.refinement.apply(model.predict(flux, mask), flux, ivar, mask).mean
        )
    records = [
        {
            **common,
            "variant": f"model {Path(location).name} ({model.model_id}){suffix}",
            "epochs": training["config"]["epochs"],
            "arch": model.arch.to_dict(),
            "train": training["config"],
            "n_members": model.n_members,
            "epochs_run": [m["epochs_run"] for m in model.member_info],
            "best_epoch": [m["best_epoch"] for m in model.member_info],
            **held_out_sets(
                arrays, setup, held, label, seed=TEST_SEED, draws=draws, rv_sigma=rv_sigma, tilt=tilt
            ),
        }
        for suffix, label in labellers.items()
    ]
    if cannon:
        label = fit_cannon(arrays, ~held)
        records.append(
            {
                **common,
                "variant": f"cannon (quadratic), pool of {Path(location).name}",
                "epochs": 0,
                "n_members": 0,
                "epochs_run": [],
                "best_epoch": [],
                **held_out_sets(
                    arrays,
                    setup,
                    held,
                    lambda flux, _, ivar: label(flux, ivar),
                    seed=TEST_SEED,
                    draws=draws,
                    rv_sigma=rv_sigma,
                    tilt=tilt,
                ),
            }
        )
    return records


def pooled(records: list[dict]) -> dict[str, np.ndarray]:
    """One variant's out-of-fold predictions of every fold: residuals [stars, draws, L] per set."""
    truth = np.concatenate([np.asarray(r["truth"]) for r in records])
    return {
        "truth": truth,
        "snr": np.concatenate([np.asarray(r["snr"]) for r in records]),
        "observed": np.concatenate([np.asarray(r["observed"]) for r in records])[:, None, :] - truth[:, None],
        **{
            key: np.concatenate([np.asarray(r[key]).transpose(1, 0, 2) for r in records]) - truth[:, None]
            for key in ("twins", "perturbed")
        },
    }


def replicate_ensembles(records: list[dict]) -> list[dict]:
    """Per variant with seed replicates, the out-of-fold mean of its replicates' predictions, fold by
    fold, as a record of its own (``<variant>@mean-of-<n>``): a small ensemble scored like a member.
    Eight members average away part of what a recipe gives one member, so a choice is checked on
    these too. A fold enters only when every replicate of the variant has run it."""
    by_base: dict[str, dict[int, list[dict]]] = {}
    for r in records:
        by_base.setdefault(r["variant"].split("@")[0], {}).setdefault(r["fold"], []).append(r)
    ensembles = []
    for base, by_fold in by_base.items():
        n = max(len(runs) for runs in by_fold.values())
        for fold, runs in sorted(by_fold.items()):
            if n < 2 or len(runs) < n:
                continue
            first = runs[0]
            for r in runs[1:]:
                same = ("spectrum_id", "draws", "rv_sigma", "tilt", "fingerprint")
                assert all(r[key] == first[key] for key in same), f"{base} fold {fold}: replicates differ"
            ensembles.append(
                {
                    **first,
                    "variant": f"{base}@mean-of-{n}",
                    "seed": [r["seed"] for r in runs],
                    "epochs_run": [r["epochs_run"] for r in runs],
                    "best_epoch": [r["best_epoch"] for r in runs],
                    "seconds": sum(r["seconds"] for r in runs),
                    "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
                    **{
                        key: np.mean([r[key] for r in runs], axis=0).tolist()
                        for key in ("observed", "twins", "perturbed")
                    },
                }
            )
    return ensembles


def bootstrap_picks(n_stars: int, n_boot: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_stars, (n_boot, n_stars))


def scatter_cell(residual: np.ndarray, n_boot: int = 300) -> tuple[int, np.ndarray, np.ndarray]:
    """(stars, scatter per label, bootstrap std of it) of residuals [stars, draws, L]: the std over all
    draws of all stars (ddof 1), the stars resampled with replacement for the uncertainty."""
    n = residual.shape[0]
    if n < 2:
        return n, np.full(residual.shape[-1], np.nan), np.full(residual.shape[-1], np.nan)
    flat = residual.reshape(-1, residual.shape[-1])
    picks = bootstrap_picks(n, n_boot)
    boot = residual[picks].reshape(n_boot, -1, residual.shape[-1])
    return n, np.nanstd(flat, axis=0, ddof=1), np.nanstd(boot, axis=1, ddof=1).std(axis=0, ddof=1)


def paired_cell(
    a: np.ndarray, b: np.ndarray, op=np.divide, n_boot: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """op(scatter(a), scatter(b)) per label over the same stars (residuals [stars, draws, L] each),
    with a paired bootstrap std: both resampled with the same picks of stars."""
    picks = bootstrap_picks(a.shape[0], n_boot)
    value = op(
        np.nanstd(a.reshape(-1, a.shape[-1]), 0, ddof=1), np.nanstd(b.reshape(-1, b.shape[-1]), 0, ddof=1)
    )
    boot_a = np.nanstd(a[picks].reshape(n_boot, -1, a.shape[-1]), axis=1, ddof=1)
    boot_b = np.nanstd(b[picks].reshape(n_boot, -1, b.shape[-1]), axis=1, ddof=1)
    return value, op(boot_a, boot_b).std(axis=0, ddof=1)


def _fmt(value: float, err: float, label: str) -> str:
    digits = 1 if label == "teff" else 3
    return f"{value:.{digits}f}±{err:.{digits}f}"


def _row(title: str, residual: np.ndarray, width: int = 34) -> str:
    n, scatter, err = scatter_cell(residual)
    cells = " ".join(f"{_fmt(s, e, name):>14}" for s, e, name in zip(scatter, err, LABEL_NAMES, strict=True))
    return f"{title:<{width}} {n:>5} {cells}"


def _header(first: str, width: int = 34) -> str:
    return f"{first:<{width}} {'stars':>5} " + " ".join(f"{n:>14}" for n in LABEL_NAMES)


def print_comparison(by_variant: dict[str, list[dict]]) -> None:
    """The variants side by side on the folds that all of them have run (the same held-out stars)."""
    common = sorted(set.intersection(*({r["fold"] for r in runs} for runs in by_variant.values())))
    print(f"\nvariants on the same folds {common}: scatter ± bootstrap std; (c)/(b) paired")
    print(_header("variant: set", 40))
    for name, runs in by_variant.items():
        data = pooled(sorted((r for r in runs if r["fold"] in common), key=lambda r: r["fold"]))
        if not len(data["truth"]):
            continue
        print(_row(f"{name}: (a) S/N >= 50", data["observed"][data["snr"] >= 50], 40))
        print(_row(f"{name}: (b) twins", data["twins"], 40))
        print(_row(f"{name}: (c) twins + RV + tilt", data["perturbed"], 40))
        ratio, err = paired_cell(data["perturbed"], data["twins"])
        cells = " ".join(f"{f'{r:.2f}±{e:.2f}':>14}" for r, e in zip(ratio, err, strict=True))
        print(f"{f'{name}: (c) / (b)':<40} {len(data['truth']):>5} {cells}")


def print_differences(by_variant: dict[str, list[dict]]) -> None:
    """Each variant's scatter minus the first variant's on the same stars (the folds all have run),
    overall and by region, with a paired bootstrap std: what a change of recipe did, star for star.
    A seed replicate (``<variant>@seed+<k>``) is paired with the first variant's same replicate when
    that has run, so that the difference is the recipe's and not the seeds'."""
    common = sorted(set.intersection(*({r["fold"] for r in runs} for runs in by_variant.values())))
    data = {
        name: pooled(sorted((r for r in runs if r["fold"] in common), key=lambda r: r["fold"]))
        for name, runs in by_variant.items()
    }
    (base, first), *others = data.items()
    if not others or not len(first["truth"]):
        return
    everyone = np.ones(len(first["truth"]), bool)
    regions = (("all", everyone), *((k, v[1](first["truth"])) for k, v in REGIONS.items()))
    for name, other in others:
        # The baseline's own replicate is paired with the baseline: the seeds' effect alone.
        replicate = f"{base}@{name.partition('@')[2]}"
        reference = replicate if replicate in data and replicate != name else base
        paired = data[reference]
        assert np.array_equal(other["truth"], paired["truth"]), "the variants' folds hold other stars"
        print(f"\n{name} minus {reference}, folds {common}: scatter difference ± paired bootstrap std")
        print(_header("set: region"))
        for key, title, high in (
            ("observed", "(a) S/N >= 50", paired["snr"] >= 50),
            ("twins", "(b)", everyone),
        ):
            for region, inside in regions:
                rows = inside & high
                if rows.sum() < 2:
                    continue
                diff, err = paired_cell(other[key][rows], paired[key][rows], np.subtract)
                cells = " ".join(
                    f"{_fmt(d, e, n):>14}" for d, e, n in zip(diff, err, LABEL_NAMES, strict=True)
                )
                print(f"{f'{title}: {region}':<34} {int(rows.sum()):>5} {cells}")


def print_tables(records: list[dict]) -> None:
    print("regions (cuts on the true labels):")
    for name, (cut, _) in REGIONS.items():
        print(f"  {name:<22} {cut}")
    by_variant: dict[str, list[dict]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    if by_variant:
        print_comparison(by_variant)
        print_differences(by_variant)
    for name, runs in by_variant.items():
        runs = sorted(runs, key=lambda r: r["fold"])
        data = pooled(runs)
        high = data["snr"] >= 50
        first = runs[0]
        test_split = first["fold"] == -1
        if test_split:
            print(
                f"\n== {name}: {first['n_members']} members (epochs run {first['epochs_run']}, best "
                f"{first['best_epoch']}), trained on {first['n_pool']} pool rows; its common test split, "
                f"{first['draws']} twin draws per star; (c): RV sigma {first['rv_sigma']} km/s, tilt "
                f"+-{first['tilt']:.0%} per arm"
            )
        else:
            print(
                f"\n== {name}: folds {[r['fold'] for r in runs]} of {first['folds']}, "
                f"{first['epochs']} epochs (run {[r['epochs_run'] for r in runs]}, "
                f"best {[r['best_epoch'] for r in runs]}), "
                f"{np.mean([r['cpu_seconds'] for r in runs]) / 60:.1f} min CPU per fold, pool "
                f"{first['n_pool']} stars, {first['draws']} twin draws per star; (c): RV sigma "
                f"{first['rv_sigma']} km/s, tilt +-{first['tilt']:.0%} per arm"
            )
        if len({r["fingerprint"] for r in runs}) > 1:
            print("   WARNING: these folds were run on different versions of the data file")
        if test_split:
            print(
                "scatter ± bootstrap std, the common test split scored once, at the end "
                "(NOT selection numbers)"
            )
        else:
            print("scatter ± bootstrap std, out-of-fold (SELECTION numbers)")
        print(_header("set"))
        print(_row("(a) observed, all S/N", data["observed"]))
        print(_row("(a) observed, S/N >= 50", data["observed"][high]))
        print(_row("(b) twins S/N 50-150", data["twins"]))
        print(_row("(c) twins + RV + tilt", data["perturbed"]))
        for fold in runs if not test_split else ():
            one = pooled([fold])
            print(_row(f"    (b) fold {fold['fold']} alone", one["twins"]))
        for key, title in SETS.items():
            print(f"\nby region: {title}" + (", S/N >= 50" if key == "observed" else ""))
            print(_header("region"))
            for region, (_, select) in REGIONS.items():
                inside = select(data["truth"]) & (high if key == "observed" else True)
                print(_row(region, data[key][inside]))
        print("\nby S/N bin: (a) observed spectra")
        print(_header("S/N"))
        for lo, hi in snr_bins(SNR_EDGES):
            inside = (data["snr"] >= lo) & (data["snr"] < hi)
            print(_row(snr_bin_name(lo, hi), data["observed"][inside]))
        print("\nrobustness: scatter (c) / scatter (b), paired bootstrap std")
        print(_header("region"))
        everyone = np.ones(len(data["truth"]), bool)
        for region, inside in (("all", everyone), *((k, v[1](data["truth"])) for k, v in REGIONS.items())):
            if inside.sum() < 2:
                continue
            ratio, err = paired_cell(data["perturbed"][inside], data["twins"][inside])
            cells = " ".join(f"{f'{r:.2f}±{e:.2f}':>14}" for r, e in zip(ratio, err, strict=True))
            print(f"{region:<34} {int(inside.sum()):>5} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="*", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--only-folds", type=int, nargs="*", help="run these folds only (default all)")
    parser.add_argument("--epochs", type=int, default=None, help="override the variant's epoch limit")
    parser.add_argument("--draws", type=int, default=5, help="fresh-noise draws per held-out twin")
    parser.add_argument("--rv-sigma", type=float, default=1.5, help="(c): RV residual sigma, km/s")
    parser.add_argument("--tilt", type=float, default=0.01, help="(c): continuum tilt per arm, +- fraction")
    parser.add_argument("--out", default="out/cv_accuracy.jsonl")
    parser.add_argument(
        "--seed-offset", type=int, default=0, help="member seed = fold + this: a replicate of the variants"
    )
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--ensembles",
        action="store_true",
        help="also table each variant's seed replicates averaged, as <variant>@mean-of-<n>, paired "
        "with the first variant's",
    )
    parser.add_argument(
        "--model",
        nargs="*",
        default=[],
        metavar="DIR",
        help="score these finished model directories on their common test split (once, at the end) "
        "instead of cross-validating",
    )
    parser.add_argument(
        "--cannon",
        action="store_true",
        help="with --model: also a quadratic Cannon fitted on the first model's training pool",
    )
    args = parser.parse_args()
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.model:
        torch.set_num_threads(1)
        records = [
            record
            for i, location in enumerate(args.model)
            for record in score_model(
                location,
                draws=args.draws,
                rv_sigma=args.rv_sigma,
                tilt=args.tilt,
                cannon=args.cannon and i == 0,
            )
        ]
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as fh:
            fh.writelines(json.dumps(record) + "\n" for record in records)
        print_tables(records)
        return
    if not args.table_only:
        torch.set_num_threads(1)
        out.parent.mkdir(parents=True, exist_ok=True)
        fingerprint = load_shared()[0]["fingerprint"]
        for fold in args.only_folds if args.only_folds is not None else range(args.folds):
            for name in args.variants:  # variants side by side fold by fold: a partial run compares them
                epochs = variant_config(name, args.epochs)[1].epochs
                key = (
                    variant_label(name, args.seed_offset),
                    fold,
                    args.folds,
                    epochs,
                    args.draws,
                    fingerprint,
                )
                if any(
                    (r["variant"], r["fold"], r["folds"], r["epochs"], r["draws"], r["fingerprint"]) == key
                    for r in done
                ):
                    continue
                record = run_fold(
                    name,
                    fold,
                    args.folds,
                    args.epochs,
                    draws=args.draws,
                    rv_sigma=args.rv_sigma,
                    tilt=args.tilt,
                    seed_offset=args.seed_offset,
                )
                with out.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                done.append(record)
                print(
                    f"{record['variant']} fold {fold}: {record['cpu_seconds'] / 60:.1f} min CPU", flush=True
                )
    # The variants asked for with their seed replicates, in --variants order: the first is the baseline.
    order = {name: i for i, name in enumerate(args.variants)}
    chosen = [r for r in done if r["variant"].split("@")[0] in order and r["folds"] == args.folds]
    if args.ensembles:
        chosen += replicate_ensembles(chosen)
    print_tables(sorted(chosen, key=lambda r: (order[r["variant"].split("@")[0]], r["variant"])))


if __name__ == "__main__":
    main()
