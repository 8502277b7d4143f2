"""The baseline to beat: The Cannon (PyPI ``thecannon``, quadratic in the labels) against speclabel.

    .venv/bin/pip install -e '.[bench]'
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/baseline_cannon.py

Both methods learn from the same rows of ``../shared/data/giraffe_synth_train.parquet``, every row
outside the common test split of ``model.splits`` (speclabel's members draw their validation rows
from these too), and both are scored on the same held-out test spectra with ``model.metrics``:
bias, scatter (ddof 1) and robust scatter per label, over all test spectra and at S/N >= 50.

* The Cannon: ``TheCannon`` 0.7.3 (Ho et al. 2017), a second-order (quadratic) model per pixel,
  trained with its per-pixel scatter; labels of a test spectrum by its ``curve_fit`` test step,
  started at the training labels' median (its default start, 1 in scaled units, is an arbitrary
  corner of label space).
* speclabel: the default architecture and training configuration (``model.arch.get_arch()``,
  ``TrainConfig()``), ``--members`` members fitted in-process (``model.fit.fit_ensemble``), saved as
  a model directory under ``--out`` so ``speclabel evaluate --model`` can report on it.

Time per spectrum is the test step (labels of already-reduced spectra) on this machine in this run,
torch and BLAS on ``--threads`` threads: The Cannon's per-spectrum optimisation against the
ensemble's forward passes, without and with the saliency maps the label job also computes.
Results go to ``--out``/baseline_cannon.json; the printed table goes into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from speclabel.core.contract import validate
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import get_setup
from speclabel.model.arch import get_arch
from speclabel.model.fit import EnsembleConfig, fit_ensemble, prepare_arrays
from speclabel.model.io import load_model, save_model
from speclabel.model.metrics import metrics_by_snr
from speclabel.model.training import TrainConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def cannon_labels(arrays: dict, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, dict]:
    """Labels of the test rows from a quadratic TheCannon model trained on the train rows."""
    import matplotlib

    saved = dict(matplotlib.rcParams)
    from TheCannon import dataset, model

    # TheCannon switches matplotlib to LaTeX text at import; nothing here plots, but leave no trace.
    matplotlib.rcParams.update(saved)

    ids = arrays["spectrum_id"]
    flux, ivar, labels = arrays["flux"], arrays["ivar"], arrays["labels"]
    data = dataset.Dataset(
        get_setup().wave,
        ids[train],
        flux[train].astype(np.float64),
        ivar[train].astype(np.float64),
        labels[train],
        ids[test],
        flux[test].astype(np.float64),
        ivar[test].astype(np.float64),
    )
    data.set_label_names(list(LABEL_NAMES))
    cannon = model.CannonModel(2, useErrors=False)
    began = time.perf_counter()
    cannon.train(data)
    train_s = time.perf_counter() - began
    began = time.perf_counter()
    cannon.infer_labels(data, starting_guess=np.zeros(len(LABEL_NAMES)))
    test_s = time.perf_counter() - began
    return np.asarray(data.test_label_vals), {"train_s": train_s, "test_s_per_spectrum": test_s / test.sum()}


def speclabel_labels(
    arrays: dict, data_path: Path, members: int, out: Path, test: np.ndarray, trained: Path | None = None
):
    """Fit the default ensemble (or load ``trained``, a model directory fitted on the same rows)."""
    setup = get_setup()
    began = time.perf_counter()
    if trained is None:
        ensemble = fit_ensemble(
            arrays,
            setup,
            get_arch(),
            TrainConfig(),
            EnsembleConfig(n_members=members),
            data={"location": str(data_path)},
        )
        train_s = time.perf_counter() - began
        model_id = save_model(ensemble, str(out / "model"), overwrite=True)
    else:
        ensemble = load_model(str(trained))
        train_s, model_id = math.nan, ensemble.model_id
    arch, config = ensemble.arch, ensemble.info.get("training", {}).get("config", {})
    flux, mask = arrays["flux"][test], arrays["mask"][test]
    ensemble.predict(flux[:2], mask[:2])  # warm-up: first-call allocations are not per-spectrum cost
    began = time.perf_counter()
    prediction = ensemble.predict(flux, mask)
    plain_s = time.perf_counter() - began
    began = time.perf_counter()
    ensemble.predict(flux, mask, saliency="summary")
    saliency_s = time.perf_counter() - began
    timing = {
        "train_s": train_s,
        "test_s_per_spectrum": plain_s / test.sum(),
        "test_with_saliency_s_per_spectrum": saliency_s / test.sum(),
        "model_id": model_id,
        "arch": arch.name,
        "train_config": config,
        "epochs_run": [m["epochs_run"] for m in ensemble.member_info],
    }
    return prediction.mean, prediction.std, timing


def print_table(result: dict) -> None:
    print(f"\n{result['machine']}, {result['date']}, torch/BLAS threads {result['threads']}")
    print(
        f"data: {result['data']} ({result['rows']} rows, {result['quarantined']} refused); "
        f"{result['n_train']} training rows, {result['n_test']} test rows "
        f"({result['n_test_snr50']} at S/N >= 50)"
    )
    methods = result["methods"]
    for key, title in (("snr>=50", "S/N >= 50"), ("all", "all S/N")):
        print(f"\nscatter of predicted - true on the test spectra, {title} (bias in brackets)")
        print(f"{'method':<34}" + "".join(f"{n:>18}" for n in LABEL_NAMES))
        for name, entry in methods.items():
            cells = "".join(
                f"{entry['metrics'][key][n]['scatter']:>9.3g} ({entry['metrics'][key][n]['bias']:+.2g})"
                for n in LABEL_NAMES
            )
            print(f"{name:<34}{cells}")
    print("\ntime (this machine, this run)")
    print(f"{'method':<34}{'train s':>10}{'test ms/spectrum':>18}{'+saliency ms/spectrum':>24}")
    for name, entry in methods.items():
        t = entry["timing"]
        with_saliency = t.get("test_with_saliency_s_per_spectrum")
        print(
            f"{name:<34}{t['train_s']:>10.0f}{1e3 * t['test_s_per_spectrum']:>18.2f}"
            + (f"{1e3 * with_saliency:>24.2f}" if with_saliency is not None else f"{'-':>24}")
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED / "giraffe_synth_train.parquet")
    parser.add_argument("--members", type=int, default=EnsembleConfig().n_members)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("out/baseline_cannon"))
    parser.add_argument(
        "--model",
        type=Path,
        help="score this model directory (trained on the same file, e.g. by bench/accuracy_shared.py "
        "--save) instead of fitting one",
    )
    parser.add_argument("--skip-speclabel", action="store_true", help="The Cannon only (a quick check)")
    parser.add_argument("--table-only", action="store_true", help="print the table of an earlier run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "baseline_cannon.json"
    if args.table_only:
        print_table(json.loads(result_path.read_text()))
        return

    setup = get_setup()
    table = pq.read_table(args.data)
    reasons = validate(table, setup, labelled=True)
    good = np.array([r is None for r in reasons])
    arrays = prepare_arrays(table.filter(good), setup)
    test = EnsembleConfig().split.is_test(arrays["spectrum_id"])
    truth, snr = arrays["labels"][test], arrays["snr"][test]

    methods = {}
    predicted, timing = cannon_labels(arrays, ~test, test)
    methods["The Cannon (TheCannon 0.7.3, quadratic)"] = {
        "metrics": metrics_by_snr(predicted, truth, LABEL_NAMES, snr),
        "timing": timing,
    }
    if not args.skip_speclabel:
        mean, std, timing = speclabel_labels(arrays, args.data, args.members, args.out, test, args.model)
        methods[f"speclabel ({timing['arch']}, {len(timing['epochs_run'])} members)"] = {
            "metrics": metrics_by_snr(mean, truth, LABEL_NAMES, snr, std=std),
            "timing": timing,
        }
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "threads": args.threads,
        "data": str(args.data),
        "rows": table.num_rows,
        "quarantined": int((~good).sum()),
        "n_train": int((~test).sum()),
        "n_test": int(test.sum()),
        "n_test_snr50": int((snr >= 50).sum()),
        "methods": methods,
    }
    result_path.write_text(json.dumps(result, indent=1, sort_keys=True))
    print_table(result)


if __name__ == "__main__":
    main()
