"""Anomaly screening: detection rate per defect kind and false-flag rate on clean spectra, by S/N.

    nice -n 15 .venv/bin/python bench/trust_defects.py --model /work/runs/model-default-8

The stars are the held-out ones (the model's common test split) of
``../shared/data/giraffe_synth_train_noisefree.parquet``: their noise-free twins, each made defective
by ``pipeline/simulate/defects.py`` (``inject``: SB2 at 20-60 km/s, Ca II triplet emission, cosmic
rays, one arm's continuum off by 2-5 %, one arm from another held-out star) or left clean, then
observed with fresh photon noise at each S/N (``--draws`` noise draws per star). Each spectrum is
labelled by the model's ensemble and checked as the label job checks it: the forward model's chi^2
at the ensemble's labels, their calibrated errors propagated into the pixel variances (the distance
term at a typical training spectrum's, ``model.calibration.RowErrors.screening``), against the
thresholds stored in the model (flag ``anomalous_spectrum``).
The chi^2 at the true labels is given beside it (what a perfect network would get). Results go to
``--out`` as JSON; the printed table goes into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from speclabel.core.arrays import spectra_arrays
from speclabel.model.calibration import errors_or_std, model_calibration, prediction_errors
from speclabel.model.io import load_model
from speclabel.model.splits import SplitRule
from speclabel.pipeline.simulate.defects import DEFECTS, inject
from speclabel.pipeline.simulate.survey import photon_noise

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def held_out_twins(path: Path, ensemble) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free flux ``[N, P]`` and true labels ``[N, L]`` of the model's test-split stars."""
    table = pq.read_table(path)
    split = SplitRule.from_dict(ensemble.info["training"]["split"])
    test = split.is_test(table.column("spectrum_id").to_pylist())
    table = table.filter(test)
    arrays = spectra_arrays(table, ensemble.setup)
    flux = np.concatenate([arrays.flux[a.name] for a in ensemble.setup.arms], axis=1)
    labels = np.stack([table.column(n).to_numpy() for n in ensemble.label_names], axis=1)
    return flux, labels.astype(np.float64)


def rates(ensemble, clean, truth, snrs, draws, seed) -> dict:
    forward = ensemble.forward
    calibration = model_calibration(ensemble.info)
    other = np.roll(clean, 1, axis=0)  # companions and foreign arms: other held-out stars
    out: dict = {}
    for kind in ("clean", *DEFECTS):
        out[kind] = {}
        for snr in snrs:
            flagged, flagged_true, chi2 = [], [], []
            for draw in range(draws):
                rng = np.random.default_rng([seed, draw, int(snr), len(out)])
                flux = clean if kind == "clean" else inject(kind, clean, other, ensemble.setup, rng)
                observed, ivar = photon_noise(flux, np.full(len(flux), float(snr)), rng)
                good = np.ones(observed.shape, dtype=bool)
                prediction = ensemble.predict(observed, good, ood=True)
                # As the label job checks a row: its calibrated err propagated into the variances.
                err = (
                    None
                    if calibration is None
                    else prediction_errors(calibration, forward, prediction, ivar, good).screening
                )
                at_labels = forward.chi2(
                    observed, ivar, good, prediction.mean, errors_or_std(err, prediction.std)
                )
                flagged.append(forward.anomalous(at_labels))
                flagged_true.append(forward.anomalous(forward.chi2(observed, ivar, good, truth)))
                chi2.append(at_labels["total"])
            out[kind][str(snr)] = {
                "n": int(sum(len(f) for f in flagged)),
                "flagged": float(np.mean(np.concatenate(flagged))),
                "flagged_at_true_labels": float(np.mean(np.concatenate(flagged_true))),
                "median_chi2": float(np.median(np.concatenate(chi2))),
            }
    return out


def print_table(result: dict) -> None:
    snrs = list(next(iter(result["rates"].values())))
    stars = f"{result['n_stars']} held-out stars x {result['draws']} noise draws"
    print(f"\n{result['machine']}, {result['date']}, model {result['model_id']} ({stars})")
    print("fraction flagged anomalous_spectrum at the ensemble's labels (at the true labels in brackets)")
    print(f"{'spectra':<14}" + "".join(f"{'S/N ' + s:>18}" for s in snrs))
    for kind, by_snr in result["rates"].items():
        cells = "".join(
            f"{by_snr[s]['flagged']:>11.2f} ({by_snr[s]['flagged_at_true_labels']:.2f})" for s in snrs
        )
        print(f"{kind:<14}{cells}")
    print(f"thresholds: {result['thresholds']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory with a forward model")
    parser.add_argument("--data", default=str(SHARED / "giraffe_synth_train_noisefree.parquet"))
    parser.add_argument("--snr", type=float, nargs="+", default=[30.0, 60.0, 100.0, 150.0])
    parser.add_argument("--draws", type=int, default=3, help="noise draws per star and S/N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="trust_defects.json")
    args = parser.parse_args()
    ensemble = load_model(args.model)
    if ensemble.forward is None:
        raise SystemExit(f"{args.model} has no forward model: rerun its speclabel train command to add one")
    began = time.perf_counter()
    clean, truth = held_out_twins(Path(args.data), ensemble)
    result = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "model_id": ensemble.model_id,
        "n_stars": len(clean),
        "draws": args.draws,
        "thresholds": ensemble.forward.chi2_threshold,
        "rates": rates(ensemble, clean, truth, [int(s) for s in args.snr], args.draws, args.seed),
    }
    result["seconds"] = time.perf_counter() - began
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


if __name__ == "__main__":
    main()
