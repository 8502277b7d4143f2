"""Does `speclabel suggest` pick better training stars than chance? On the shared GIRAFFE file.

    nice -n 15 .venv/bin/python bench/suggest.py [--epochs 120] [--start-members 3] [--draws 3]

1. ``--start`` (150) start stars, the smallest hash of ``spectrum_id`` (salt ``START_SALT``) among
   the rows outside the common test split (``model.splits``); the pool is every other non-test row.
2. A start ensemble of ``--start-members`` members (the ensemble std needs more than one) on the
   start stars, with its embedding reference (``model.ood``) fitted on them as ``speclabel train``
   does; it labels the pool (mean, std, ood_score: the catalogue's columns; no calibration, so
   ``err`` is null and the std stands in).
3. ``--add`` (100) stars chosen from the pool by ``pipeline.suggest`` (the score, four hash
   partitions of at most ``--per-partition`` rows, k-center in each, then the merge k-center: the
   same functions as the command) and ``--draws`` (3) random draws of as many.
4. One member (seed 0, the ``default`` architecture with the default training, ``--epochs``, one
   torch thread) trained on start + suggested and on start + each random draw, same settings; each
   scored on the common test split (all S/N) and on the held-out stars' noise-free twins at S/N
   50-150 (``accuracy_shared.twin_test``).

Prints per label the scatter of each, the random draws' mean, and suggested / random - 1. Appends
one JSON line per trained model to ``--out``, so a run stopped part way keeps what it measured;
``--runs`` trains only the named ones (the random draws do not depend on it), so two processes can
share the work and the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from accuracy_shared import VARIANTS, fit_in_process, load_shared, twin_test

from speclabel.core.labels import LABEL_NAMES
from speclabel.model.calibration import prior_widths
from speclabel.model.fit import EnsembleConfig, test_metrics
from speclabel.model.ood import OODConfig, fit_embedding_reference
from speclabel.model.splits import hash_uniform
from speclabel.pipeline.suggest import CandidatePools, score_parts, select

START_SALT = "speclabel-suggest-bench-start"
PARTITIONS = 4


def subset(arrays: dict, rows: np.ndarray) -> dict:
    n = len(arrays["spectrum_id"])
    return {k: v[rows] if isinstance(v, np.ndarray) and len(v) == n else v for k, v in arrays.items()}


def train(arrays, setup, rows, variant, members, epochs):
    """An ensemble of ``members`` members (seeds 0 ..) of ``variant`` on ``rows`` (outside the test
    split), each with its own validation split of them, as the training job draws it."""
    return fit_in_process(
        subset(arrays, rows), setup, variant, members, epochs, data={"n_rows": int(rows.sum())}
    )


def suggested(ensemble, arrays, pool: np.ndarray, n: int, per_partition: int) -> np.ndarray:
    """Row indices of the ``n`` stars ``pipeline.suggest`` picks from ``pool`` (indices)."""
    prediction = ensemble.predict(arrays["flux"][pool], arrays["mask"][pool], ood=True)
    ids = arrays["spectrum_id"][pool]
    columns = {"spectrum_id": pa.array(ids.tolist()), "row": pa.array(pool)}
    columns["sky"] = pa.array((hash_uniform(ids, "bench-partition") * PARTITIONS).astype(np.int32))
    for k, name in enumerate(ensemble.label_names):
        columns[name] = pa.array(prediction.mean[:, k])
    widths = prior_widths(ensemble)
    for key, values in score_parts(prediction.std, None, prediction.ood_score, widths).items():
        columns[key] = pa.array(values)
    pools = CandidatePools(per_partition)
    pools.add(pa.table(columns))
    picks = select(pools, n, ensemble.label_names, widths)
    return picks.column("row").to_numpy()


def scores(ensemble, arrays, test_rows) -> dict:
    test = {k: arrays[k][test_rows] for k in ("flux", "mask", "labels", "snr")}
    metrics = test_metrics(ensemble, [test])
    twins = twin_test(ensemble, arrays, test_rows)
    return {
        "test_all": {n: metrics["all"][n]["scatter"] for n in LABEL_NAMES},
        "twins": {n: twins[n]["scatter"] for n in LABEL_NAMES},
    }


def print_table(records: list[dict]) -> None:
    for key, title in (("test_all", "common test split, all S/N"), ("twins", "twins, S/N 50-150")):
        print(f"\nscatter on the {title}")
        print(f"{'training set':<24} " + " ".join(f"{n:>9}" for n in LABEL_NAMES))
        for r in records:
            print(f"{r['name']:<24} " + " ".join(f"{r[key][n]:>9.4g}" for n in LABEL_NAMES))
        chosen = [r for r in records if r["name"] == "start+suggested"]
        random = [r for r in records if r["name"].startswith("start+random")]
        if chosen and random:
            mean = {n: float(np.mean([r[key][n] for r in random])) for n in LABEL_NAMES}
            print(f"{'random mean':<24} " + " ".join(f"{mean[n]:>9.4g}" for n in LABEL_NAMES))
            change = " ".join(f"{100 * (chosen[0][key][n] / mean[n] - 1):>+8.1f}%" for n in LABEL_NAMES)
            print(f"{'suggested vs random':<24} {change}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=150)
    parser.add_argument("--add", type=int, default=100)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--start-members", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override the default 120 epochs")
    parser.add_argument(
        "--variant", default="default", choices=sorted(VARIANTS), help="the recipe of every run"
    )
    parser.add_argument("--per-partition", type=int, default=1000)
    parser.add_argument("--out", default="out/suggest.jsonl")
    parser.add_argument(
        "--runs",
        nargs="*",
        help="train only these (start+suggested, start+random1, ...); draws stay the same",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    arrays, setup = load_shared()
    split = EnsembleConfig().split
    ids = arrays["spectrum_id"]
    test_rows = split.is_test(ids)
    outside = np.flatnonzero(~test_rows)
    order = outside[np.argsort(hash_uniform(ids[outside], START_SALT), kind="stable")]
    start, pool = np.sort(order[: args.start]), np.sort(order[args.start :])
    print(f"{len(ids)} rows: {test_rows.sum()} test, {len(start)} start, {len(pool)} pool")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    common = {
        "variant": args.variant,
        "epochs": args.epochs,
        "machine": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
    }

    rng = np.random.default_rng(2026)
    runs = [("start+suggested", None)] + [
        (f"start+random{d + 1}", rng.choice(pool, args.add, replace=False)) for d in range(args.draws)
    ]
    runs = [(name, added) for name, added in runs if not args.runs or name in args.runs]
    if runs and runs[0][0] == "start+suggested":
        began = time.perf_counter()
        start_mask = np.isin(np.arange(len(ids)), start)
        ensemble = train(arrays, setup, start_mask, args.variant, args.start_members, args.epochs)
        embedding = ensemble.predict(arrays["flux"][start], arrays["mask"][start], embedding=True).embedding
        ensemble.ood = fit_embedding_reference([(ids[start].tolist(), embedding)], OODConfig(rows=len(start)))
        runs[0] = ("start+suggested", suggested(ensemble, arrays, pool, args.add, args.per_partition))
        seconds = time.perf_counter() - began
        print(f"start ensemble ({args.start_members} members) and suggestions: {seconds:.0f} s")
    for name, added in runs:
        began, cpu = time.perf_counter(), time.process_time()
        rows = np.isin(np.arange(len(ids)), np.concatenate([start, added]))
        model = train(arrays, setup, rows, args.variant, 1, args.epochs)
        record = {
            "bench": "suggest",
            "name": name,
            "added_labels_mean": dict(
                zip(LABEL_NAMES, arrays["labels"][added].mean(0).tolist(), strict=True)
            ),
            "added_labels_std": dict(zip(LABEL_NAMES, arrays["labels"][added].std(0).tolist(), strict=True)),
            "seconds": time.perf_counter() - began,
            "cpu_seconds": time.process_time() - cpu,
            "epochs_run": model.member_info[0]["epochs_run"],
            **scores(model, arrays, test_rows),
            **common,
        }
        with out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"{name}: {record['seconds']:.0f} s, {record['epochs_run']} epochs")
    # Every record in --out: runs made by separate processes (--runs) table together.
    print_table([json.loads(line) for line in out.read_text().splitlines()])


if __name__ == "__main__":
    main()
