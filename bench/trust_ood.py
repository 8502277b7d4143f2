"""The out-of-distribution flag on held-out stars and on clearly foreign spectra.

    nice -n 15 .venv/bin/python bench/trust_ood.py --model models/ges-v1 [--data TRAIN.parquet]

For a model with an embedding reference (``speclabel train`` fits it; model/ood.py), it labels the
model's common test split of ``--data`` (default: the shared GIRAFFE file; held-out stars no member
trained on) and prints the ``ood_score`` distribution and the OUT_OF_DISTRIBUTION rate there (about
1 % expected at the default 99th-percentile threshold), then the same for foreign spectra built from
those stars: pure noise around the continuum, the second arm replaced by that of a star of another
kind (the held-out star with the most different Teff), the spectrum reversed in wavelength, and
simulated stars far outside the training labels (hot metal-poor and very cool metal-rich giants).
``--out FILE`` appends the numbers as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.model.io import load_model
from speclabel.model.splits import SplitRule
from speclabel.pipeline.simulate.spectra import microturbulence, synthesize

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "giraffe_synth_train.parquet"


def foreign_spectra(flux: np.ndarray, mask: np.ndarray, teff: np.ndarray, setup, seed: int = 0) -> dict:
    """Kinds of spectra the training set lacks, built from the held-out ``flux`` rows."""
    rng = np.random.default_rng(seed)
    arm = list(setup.arm_slices.values())[-1]
    other = np.argsort(teff)[::-1][np.argsort(np.argsort(teff))]  # hottest <-> coolest and so on
    swapped = flux.copy()
    swapped[:, arm] = flux[other][:, arm]
    n = len(flux)
    extreme = {
        "hot metal-poor (8000 K, [Fe/H] -3.5)": dict(teff=8000.0, logg=4.3, feh=-3.5, mgfe=0.4, alfe=0.0),
        "cool metal-rich giant (3300 K, [Fe/H] +0.8)": dict(
            teff=3300.0, logg=0.3, feh=0.8, mgfe=0.0, alfe=0.0
        ),
    }
    out = {
        "noise around the continuum": (rng.normal(1.0, 0.1, flux.shape).astype(np.float32), mask),
        "second arm from another kind of star": (swapped, mask),
        "reversed in wavelength": (np.ascontiguousarray(flux[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])),
    }
    for name, labels in extreme.items():
        values = {k: np.full(min(n, 20), v) for k, v in labels.items()}
        values["alpha"] = 0.8 * values["mgfe"]
        values["vmic"] = microturbulence(values["teff"], values["logg"])
        values["vbroad"] = np.full_like(values["teff"], 6.0)
        values["rv"] = np.zeros_like(values["teff"])
        out[name] = (
            synthesize(setup, values).astype(np.float32),
            np.ones((min(n, 20), setup.n_pixels), bool),
        )
    return out


def summary(scores: np.ndarray, flagged: np.ndarray) -> dict:
    return {
        "n": int(scores.size),
        "flagged": float(flagged.mean()),
        "median_score": float(np.median(scores)),
        "p10_score": float(np.percentile(scores, 10)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=str(SHARED))
    parser.add_argument("--out")
    args = parser.parse_args()
    ensemble = load_model(args.model)
    if ensemble.ood is None:
        raise SystemExit(f"{args.model} has no embedding reference: rerun `speclabel train` on its run")
    setup = ensemble.setup
    split = SplitRule.from_dict(ensemble.info["training"]["split"])
    table = pq.read_table(args.data)
    table = table.filter(split.is_test(table.column("spectrum_id").to_pylist()))
    flux, mask = model_inputs(spectra_arrays(table, setup), setup)
    teff = table.column("teff").to_numpy()
    began = time.perf_counter()
    held_out = ensemble.predict(flux, mask, ood=True)
    results = {"held-out stars (test split)": summary(held_out.ood_score, held_out.out_of_distribution)}
    for name, (f, m) in foreign_spectra(flux, mask, teff, setup).items():
        prediction = ensemble.predict(f, m, ood=True)
        results[name] = summary(prediction.ood_score, prediction.out_of_distribution)
    print(
        f"model {ensemble.model_id}: threshold {ensemble.ood.threshold:g}, k {ensemble.ood.k}, "
        f"{ensemble.ood.points.shape[0]} reference spectra"
    )
    print(f"{'spectra':<46} {'n':>5} {'flagged':>8} {'median':>7} {'p10':>6}")
    for name, r in results.items():
        print(f"{name:<46} {r['n']:>5} {r['flagged']:>8.3f} {r['median_score']:>7.1f} {r['p10_score']:>6.1f}")
    if args.out:
        record = {
            "bench": "trust_ood",
            "model": args.model,
            "model_id": ensemble.model_id,
            "machine": platform.node(),
            "date": time.strftime("%Y-%m-%d"),
            "seconds": time.perf_counter() - began,
            "results": results,
        }
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
