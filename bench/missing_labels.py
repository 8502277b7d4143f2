"""Accuracy when 30 % of the [Mg/Fe] and [Al/Fe] values are missing, against the full table.

    nice -n 15 .venv/bin/python bench/missing_labels.py --members 2 --epochs 30

Trains the same variant (``accuracy_shared.VARIANTS``) twice on the shared GIRAFFE file, in-process
with one torch thread: on the full table, and with ``--fraction`` (default 0.3) of the training rows'
[Mg/Fe] and [Al/Fe] removed at random (independently per label; the held-out test rows keep every
label, so both ensembles are measured on the same truth). A row lacking a label still trains the
others (the masked loss of ``model.training.masked_mean``). Prints per label the test scatter
(S/N >= 50 and all) of both and their ratio; the other labels should not get worse. Appends a JSON
line to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from accuracy_shared import fit_in_process, load_shared

from speclabel.core.labels import LABEL_NAMES
from speclabel.model.fit import EnsembleConfig

REMOVED = ("mgfe", "alfe")


def with_missing(arrays: dict, fraction: float, split, seed: int = 7) -> dict:
    """``arrays`` with ``fraction`` of the non-test rows' [Mg/Fe] and [Al/Fe] set to NaN."""
    rng = np.random.default_rng(seed)
    labels = arrays["labels"].copy()
    pool = np.flatnonzero(~split.is_test(arrays["spectrum_id"]))
    for name in REMOVED:
        k = LABEL_NAMES.index(name)
        labels[rng.choice(pool, round(fraction * len(pool)), replace=False), k] = np.nan
    return {**arrays, "labels": labels}


def fit(arrays, setup, variant, members, epochs):
    test = EnsembleConfig().split.is_test(arrays["spectrum_id"])
    test_arrays = {k: arrays[k][test] for k in ("flux", "mask", "labels", "snr")}
    return fit_in_process(arrays, setup, variant, members, epochs, test=test_arrays).info["metrics"]["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="paper-centred-tuned")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--out", default=str(Path(__file__).with_name("missing_labels.jsonl")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    arrays, setup = load_shared()
    split = EnsembleConfig().split
    began = time.perf_counter()
    full = fit(arrays, setup, args.variant, args.members, args.epochs)
    missing = fit(with_missing(arrays, args.fraction, split), setup, args.variant, args.members, args.epochs)
    print(
        f"# {args.variant}, {args.members} members, {args.epochs} epochs, {args.fraction:.0%} of "
        f"{'/'.join(REMOVED)} removed; test scatter (full -> missing, ratio)"
    )
    for key in ("snr>=50", "all"):
        cells = []
        for name in LABEL_NAMES:
            a, b = full[key][name]["scatter"], missing[key][name]["scatter"]
            cells.append(f"{name} {a:.4g} -> {b:.4g} ({b / a:.2f})")
        print(f"{key:>8}: " + "; ".join(cells))
    record = {
        "bench": "missing_labels",
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.node(),
        "variant": args.variant,
        "members": args.members,
        "epochs": args.epochs,
        "fraction": args.fraction,
        "seconds": round(time.perf_counter() - began, 1),
        "full": full,
        "missing": missing,
    }
    with open(args.out, "a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
