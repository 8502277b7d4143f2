"""Accuracy of architecture and training variants on the shared GIRAFFE file, trained in-process.

    nice -n 10 .venv/bin/python bench/accuracy_shared.py --variants paper default --members 2

For each variant it trains members (seeds 0, 1, ...) with one CPU thread each, as the Ray job
runs them, on the rows outside the common test split (each member with its own validation split),
and prints the ensemble's per-label bias and scatter on the held-out test spectra: at S/N >= 50 (the
issue's target), at all S/N, and on the same held-out stars' noise-free twins with fresh noise at
S/N 50-150 (``twins``: the same stars, 10 noise draws each, a steadier number than ~20 spectra).
``--workers 2`` trains two members at a time in separate processes (as the Ray job does on this
2-core machine) and reports the wall time of the whole ensemble; ``--save DIR`` writes the model
directory. ``--cannon`` adds a quadratic Cannon (Ness et al. 2015) fitted on the same rows as a yardstick.
Results are appended as JSON lines to ``--out`` so runs made one at a time can be tabled together
(``--table-only``). ``--model DIR`` scores a model directory made elsewhere (``speclabel train``)
on the same rows instead of training one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import get_setup
from speclabel.model.arch import PRESETS, ArchConfig
from speclabel.model.fit import (
    EnsembleConfig,
    assemble_ensemble,
    fit_scaler,
    member_data,
    prepare_arrays,
    test_metrics,
)
from speclabel.model.io import load_model, save_model
from speclabel.model.metrics import label_metrics
from speclabel.model.splits import SplitRule
from speclabel.model.training import AugmentConfig, TrainConfig, input_reference, train_member

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGETS = {"teff": 30.0, "logg": 0.06, "feh": 0.03, "mgfe": 0.03, "alfe": 0.04}

BASE_TRAIN = TrainConfig(epochs=150, batch_size=32, learning_rate=1e-3, patience=25)
TWIN_NOISE = AugmentConfig(noise=True, snr_range=(10.0, 150.0))
# Centred input, no dropout, cosine schedule: the training that measured best (BENCHMARKS.md).
TUNED = TrainConfig(
    epochs=120, batch_size=16, learning_rate=1e-3, patience=120, lr_schedule="cosine", augment=TWIN_NOISE
)
PAPER = PRESETS["paper"]
TWO_CONV = PAPER.replace(
    name="two-conv16", conv_channels=(16, 16), pool_size=4, dense_units=(64,), dropout=0.0, center_input=True
)
ONE_CONV = PAPER.replace(
    name="one-conv", conv_channels=(8,), pool_size=4, dense_units=(64,), dropout=0.0, center_input=True
)

# name -> (architecture, training configuration)
VARIANTS: dict[str, tuple[ArchConfig, TrainConfig]] = {
    "paper": (PAPER, BASE_TRAIN),
    "paper+noise": (PAPER, BASE_TRAIN.replace(augment=TWIN_NOISE)),
    "paper-centred-tuned": (PAPER.replace(dropout=0.0, center_input=True), TUNED),
    "one-conv-tuned": (ONE_CONV, TUNED),
    "two-conv16-tuned": (TWO_CONV, TUNED),
    "two-conv16-per-arm-tuned": (TWO_CONV.replace(arms="per_arm"), TUNED),
    "two-conv16-tuned+rv": (TWO_CONV, TUNED.replace(augment=AugmentConfig(noise=True, rv_shift_kms=2.0))),
    "three-conv16-tuned": (TWO_CONV.replace(conv_channels=(16, 16, 16)), TUNED),
    "two-conv16-dense128-tuned": (TWO_CONV.replace(dense_units=(128,)), TUNED),
    "paper+default-training": (PAPER, TrainConfig()),
    # The default until 2026-12-04 (fresh-noise augmentation only), the baseline of the CV tables.
    "default-2026-12-03": (
        PRESETS["default"].replace(variance_head=False),
        TrainConfig(augment=AugmentConfig(noise=True, snr_range=(10.0, 150.0))),
    ),
    # Robustness to reduction residuals (issue 20): velocity shifts and per-arm continuum tilts in training.
    "default+rv+tilt": (
        PRESETS["default"],
        TrainConfig(augment=AugmentConfig(noise=True, rv_shift_kms=3.0, continuum_tilt=0.01)),
    ),
}
# Wider dense layers for the weak-line labels (issue 20): more units, or a second layer.
VARIANTS["default+dense128"] = (PRESETS["default"].replace(dense_units=(128,)), TrainConfig())
VARIANTS["default+dense64x2"] = (PRESETS["default"].replace(dense_units=(64, 64)), TrainConfig())
# A third conv layer per arm (issue 20): a 4x wider receptive field (broad wings of the Paschen and Ca
# II lines) and a 4x smaller dense layer (fewer weights for ~800 training stars).
VARIANTS["default+conv3"] = (PRESETS["default"].replace(conv_channels=(16, 16, 16)), TrainConfig())
# Sparse regions of label space (issue 20): rows weighted by density^-beta (TrainConfig.density_weighting).
for _beta in (0.5, 1.0):
    _arch, _config = VARIANTS["default+rv+tilt"]
    VARIANTS[f"default+rv+tilt+density{_beta:g}"] = (_arch, _config.replace(density_weighting=_beta))
# A loss per label (issue 20): label l weighs (its validation MSE)^-alpha (TrainConfig.label_balance).
for _alpha in (0.25, 0.5, 1.0):
    VARIANTS[f"default+balance{_alpha:g}"] = (PRESETS["default"], TrainConfig(label_balance=_alpha))
# ... and with the wider dense layer, so that balancing need not take capacity from [Al/Fe].
VARIANTS["default+dense128+balance0.5"] = (VARIANTS["default+dense128"][0], TrainConfig(label_balance=0.5))


# Every architecture preset (the default included) also runs with the default training configuration.
for _name, _arch in PRESETS.items():
    VARIANTS.setdefault(_name, (_arch, TrainConfig()))


def twin_ivar(arrays, rows, level, mask=None):
    """The inverse variance of the rows' twins at continuum S/N ``level`` [N]: each spectrum's own
    noise pattern (its ivar) rescaled so that its median over good pixels gives that S/N."""
    mask = arrays["mask"][rows] if mask is None else mask
    inv_sigma = np.sqrt(arrays["ivar"][rows])
    own = np.array([np.median(s[m]) for s, m in zip(inv_sigma, arrays["mask"][rows], strict=True)])[:, None]
    return np.where(mask, (inv_sigma * np.asarray(level)[:, None] / own) ** 2, 0.0)


def noisy_twins(arrays, rows, rng, *, snr=(50.0, 150.0), clean=None, mask=None):
    """One draw of the rows' noise-free twins with fresh noise at S/N log-uniform in ``snr``, keeping
    each spectrum's own noise pattern (:func:`twin_ivar`), as the training augmentation does:
    (flux, mask, S/N per row, ivar). ``clean``, ``mask``: perturbed copies of the twins to add it to."""
    clean = arrays["flux_clean"][rows] if clean is None else clean
    mask = arrays["mask"][rows] if mask is None else mask
    level = np.exp(rng.uniform(np.log(snr[0]), np.log(snr[1]), len(clean)))
    ivar = twin_ivar(arrays, rows, level, mask)
    sigma = np.where(mask, 1.0 / np.sqrt(np.maximum(ivar, 1e-300)), 0.0)
    flux = np.where(mask, clean + rng.standard_normal(clean.shape) * sigma, 1.0).astype(np.float32)
    return flux, mask, level, ivar


def twin_test(ensemble, arrays, rows, *, draws=10, snr=(50.0, 150.0), seed=0, refinement=None):
    """Held-out stars' noise-free twins, ``draws`` fresh-noise draws each (:func:`noisy_twins`); with a
    ``refinement`` (``model.refine.Refinement``) the refined labels' metrics, on the same draws."""
    rng = np.random.default_rng(seed)
    predicted, truth, spread = [], [], []
    for _ in range(draws):
        flux, mask, _, ivar = noisy_twins(arrays, rows, rng, snr=snr)
        prediction = ensemble.predict(flux, mask)
        if refinement is not None:
            prediction = refinement.apply(prediction, flux, ivar, mask)
        predicted.append(prediction.mean)
        spread.append(prediction.std)
        truth.append(arrays["labels"][rows])
    return label_metrics(
        np.concatenate(predicted), np.concatenate(truth), LABEL_NAMES, std=np.concatenate(spread)
    )


_LOADED: dict = {}


def load_shared():
    """The shared file's training arrays (with the noise-free twins), once per process."""
    if not _LOADED:
        setup = get_setup()
        table = pq.read_table(SHARED / "giraffe_synth_train.parquet")
        clean = pq.read_table(SHARED / "giraffe_synth_train_noisefree.parquet")
        _LOADED.update(setup=setup, arrays=prepare_arrays(table, setup, clean=clean))
    return _LOADED["arrays"], _LOADED["setup"]


def train_one(task):
    """One member in a worker process with one torch thread, as the Ray job runs members."""
    name, seed, epochs = task
    torch.set_num_threads(1)
    arrays, setup = load_shared()
    arch, config = variant_config(name, epochs)
    split = EnsembleConfig().split
    scaler = fit_scaler(arrays, split, "standard")
    train, val = member_data(arrays, split, seed)
    # The ensemble's common input reference (the training pool's mean), as fit_ensemble and the job set it.
    reference = input_reference(train, val) if arch.center_input else None
    began, cpu = time.perf_counter(), time.process_time()
    result = train_member(arch, setup, scaler, config.replace(seed=seed), train, val, reference=reference)
    return result, time.perf_counter() - began, time.process_time() - cpu


def variant_config(name, epochs):
    arch, config = VARIANTS[name]
    return arch, config if epochs is None else config.replace(epochs=epochs)


def fit_in_process(arrays, setup, variant, members, epochs, *, test=None, data=None, base_seed=0):
    """An ensemble of ``members`` members (seeds ``base_seed`` ..) of ``variant`` on ``arrays`` in
    this process, one after another, each on its own validation split, as the training job draws
    them; ``test``/``data`` go to ``assemble_ensemble`` (test-split arrays to score, what it trained on)."""
    arch, config = variant_config(variant, epochs)
    ensemble_config = EnsembleConfig(n_members=members, base_seed=base_seed)
    split = ensemble_config.split
    scaler = fit_scaler(arrays, split, "standard")
    first = ensemble_config.seeds[0]
    reference = input_reference(*member_data(arrays, split, first)) if arch.center_input else None
    results = []
    for seed in ensemble_config.seeds:
        train, val = member_data(arrays, split, seed)
        results.append(
            train_member(arch, setup, scaler, config.replace(seed=seed), train, val, reference=reference)
        )
    return assemble_ensemble(
        setup,
        arch,
        scaler,
        results,
        ensemble_config=ensemble_config,
        train_config=config,
        test=test,
        data=data or {"n_rows": len(arrays["labels"])},
    )


def run_variant(name, members, epochs, workers, save=None):
    arrays, setup = load_shared()
    arch, config = variant_config(name, epochs)
    ensemble_config = EnsembleConfig(n_members=members)
    tasks = [(name, seed, epochs) for seed in ensemble_config.seeds]
    began = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(train_one, tasks))
    else:
        done = [train_one(task) for task in tasks]
    wall = time.perf_counter() - began
    test_rows = ensemble_config.split.is_test(arrays["spectrum_id"])
    ensemble = assemble_ensemble(
        setup,
        arch,
        fit_scaler(arrays, ensemble_config.split, ensemble_config.scaling),
        [result for result, _, _ in done],
        ensemble_config=ensemble_config,
        train_config=config,
        test={k: arrays[k][test_rows] for k in ("flux", "mask", "labels", "snr")},
        data={
            "location": str(SHARED / "giraffe_synth_train.parquet"),
            "n_rows": len(arrays["labels"]),
            "fingerprint": arrays["fingerprint"],
        },
    )
    if save:
        save_model(ensemble, save, overwrite=True)
    metrics = ensemble.info["metrics"]["test"]
    return {
        "variant": name,
        "members": members,
        "arch": arch.to_dict(),
        "train": config.to_dict(),
        "seconds_per_member": float(np.mean([seconds for _, seconds, _ in done])),
        "cpu_seconds_per_member": float(np.mean([cpu for _, _, cpu in done])),
        "wall_seconds": wall,
        "workers": workers,
        "epochs_run": [m["epochs_run"] for m in ensemble.member_info],
        "best_epoch": [m["best_epoch"] for m in ensemble.member_info],
        "val": [m["validation"] for m in ensemble.member_info],
        "test_snr50": metrics["snr>=50"],
        "test_all": metrics["all"],
        "twins": twin_test(ensemble, arrays, test_rows),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch threads 1",
        "date": time.strftime("%Y-%m-%d"),
    }


def fit_cannon(arrays, rows):
    """A quadratic Cannon fitted on ``rows``: per-pixel flux = theta . (1, l, l l^T) by weighted least
    squares; returns ``labels(flux [N, P], ivar [N, P]) -> [N, L]``, each spectrum's labels by
    non-linear least squares. A yardstick, not part of speclabel's model."""
    from scipy.optimize import least_squares

    labels = arrays["labels"][rows]
    offset, scale = labels.mean(0), labels.std(0)

    def design(z):
        z = np.atleast_2d(z)
        pairs = [z[:, i] * z[:, j] for i in range(z.shape[1]) for j in range(i, z.shape[1])]
        return np.column_stack([np.ones(len(z)), z, *pairs])

    a = design((labels - offset) / scale)
    flux, ivar = arrays["flux"][rows], arrays["ivar"][rows]
    theta = np.empty((a.shape[1], flux.shape[1]))
    for start in range(0, flux.shape[1], 2000):  # weighted normal equations, a block of pixels at a time
        w = ivar[:, start : start + 2000]
        ata = np.einsum("np,ni,nj->pij", w, a, a) + 1e-6 * np.eye(a.shape[1])
        atb = np.einsum("np,ni,np->pi", w, a, flux[:, start : start + 2000])
        theta[:, start : start + 2000] = np.linalg.solve(ata, atb[..., None])[..., 0].T

    def label(spectra, weights):
        out = []
        for f, w in zip(spectra, weights, strict=True):
            sw = np.sqrt(w)
            fit = least_squares(
                lambda z, f=f, sw=sw: (design(z) @ theta - f)[0] * sw, np.zeros(labels.shape[1])
            )
            out.append(fit.x * scale + offset)
        return np.array(out)

    return label


def cannon_baseline(arrays, split):
    """The Cannon (:func:`fit_cannon`) on every row outside the test split, scored on the test rows."""
    test = split.is_test(arrays["spectrum_id"])
    predicted = fit_cannon(arrays, ~test)(arrays["flux"][test], arrays["ivar"][test])
    labels = arrays["labels"]
    high = arrays["snr"][test] >= 50
    return {
        "variant": "cannon (quadratic)",
        "members": 0,
        "test_snr50": label_metrics(predicted[high], labels[test][high], LABEL_NAMES),
        "test_all": label_metrics(predicted, labels[test], LABEL_NAMES),
    }


def score_model(location: str, name: str | None = None) -> dict:
    """A model directory (e.g. from ``speclabel train`` on the shared file) on the same held-out rows."""
    arrays, setup = load_shared()
    ensemble = load_model(location, setup=setup)
    split = SplitRule.from_dict(ensemble.info["training"]["split"])
    test_rows = split.is_test(arrays["spectrum_id"])
    metrics = test_metrics(ensemble, [{k: arrays[k][test_rows] for k in ("flux", "mask", "labels", "snr")}])
    return {
        "variant": name or Path(location).name,
        "members": ensemble.n_members,
        "model": location,
        "epochs_run": [m["epochs_run"] for m in ensemble.member_info],
        "test_snr50": metrics["snr>=50"],
        "test_all": metrics["all"],
        "twins": twin_test(ensemble, arrays, test_rows),
        "machine": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
    }


def print_table(results: list[dict]) -> None:
    header = f"{'variant':<26} {'M':>2} {'s/memb':>7} {'epochs':>7}  " + " ".join(
        f"{n:>15}" for n in LABEL_NAMES
    )
    for key, title in (
        ("test_snr50", "held-out test spectra, S/N >= 50"),
        ("test_all", "held-out test spectra, all S/N"),
        ("twins", "held-out stars' twins, fresh noise S/N 50-150"),
    ):
        print(f"\n{title}: scatter (bias)")
        print(header)
        for r in results:
            if key not in r:
                continue
            cells = " ".join(f"{r[key][n]['scatter']:>8.3g} ({r[key][n]['bias']:+.2g})" for n in LABEL_NAMES)
            epochs = f"{np.mean(r['epochs_run']):.0f}" if r.get("epochs_run") else "-"
            seconds = f"{r['seconds_per_member']:.0f}" if r.get("seconds_per_member") else "-"
            print(f"{r['variant']:<26} {r['members']:>2} {seconds:>7} {epochs:>7}  {cells}")
    print("\ntargets at S/N >= 50: " + ", ".join(f"{n} {v:g}" for n, v in TARGETS.items()))
    for r in results:
        if r.get("workers", 1) > 1:
            print(
                f"\n{r['variant']}: {r['members']} members, {r['workers']} at a time: "
                f"{r['wall_seconds'] / 60:.1f} min wall "
                f"({r['seconds_per_member'] / 60:.1f} min wall, "
                f"{r.get('cpu_seconds_per_member', 0) / 60:.1f} min CPU per member, one thread each)"
            )
    ratios = [r for r in results if "twins" in r and r["members"] > 1]
    if ratios:
        print("\nensemble std / actual error (rms ratio), twins at S/N 50-150")
        for r in ratios:
            print(
                f"{r['variant']:<26} "
                + " ".join(f"{n} {r['twins'][n]['std_ratio']:.2f}" for n in LABEL_NAMES)
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS))
    parser.add_argument("--members", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="override the variant's epoch limit")
    parser.add_argument("--cannon", action="store_true")
    parser.add_argument("--out", default="out/accuracy_shared.jsonl")
    parser.add_argument("--workers", type=int, default=1, help="members trained at a time (processes)")
    parser.add_argument("--save", help="write the (last) ensemble as a model directory here")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--model", help="score this model directory instead of training one")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.table_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        todo = [("cannon", None)] if args.cannon else []
        todo += [(name, name) for name in args.variants]
        todo += [("model", args.model)] if args.model else []
        for kind, name in todo:
            if kind == "cannon":
                result = cannon_baseline(load_shared()[0], EnsembleConfig().split)
            elif kind == "model":
                result = score_model(name)
            else:
                result = run_variant(name, args.members, args.epochs, args.workers, args.save)
            with out.open("a") as fh:
                fh.write(json.dumps(result) + "\n")
            print_table([result])
    results = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    print_table(results)


if __name__ == "__main__":
    main()
