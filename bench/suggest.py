"""Does `speclabel suggest` pick better training stars than chance? On the shared GIRAFFE file.

    nice -n 15 .venv/bin/python bench/suggest.py [--epochs 120] [--start-members 3] [--draws 3]

1. ``--start`` (150) start stars, the smallest hash of ``spectrum_id`` (salt ``START_SALT``) among
   the rows outside the common test split (``model.splits``); then ``--validation`` (100) pool
   validation stars, the next smallest by another hash (``VALIDATION_SALT``), never candidates and
   never trained on: the numbers for choosing between selections; the pool is every other non-test
   row.
2. A start ensemble of ``--start-members`` members (the ensemble std needs more than one) on the
   start stars, with its embedding reference (``model.ood``) fitted on them as ``speclabel train``
   does; it labels the pool (mean, std, ood_score: the catalogue's columns; no calibration, so
   ``err`` is null and the std stands in).
3. ``--add`` (100) stars chosen from the pool by ``pipeline.suggest`` (the score, four hash
   partitions of at most ``--per-partition`` rows, the ``--diversity`` selection in each, then the
   merge: the same functions as the command; ``start+suggested`` is k-center, the default, and
   ``start+suggested-k-median`` k-median; ``--cover start`` adds the same selections started from
   the start stars' labels, the reference stars a model trained on them holds, so the picks fill
   their gaps: ``start+suggested-covered``, ...) and ``--draws`` (3) random draws of as many.
4. One member per ``--seeds`` seed (default 0; the ``default`` architecture with the default
   training, ``--epochs``, one torch thread) trained on start + suggested and on start + each
   random draw, same settings; each scored on the pool validation stars and on the common test
   split, each on the observed spectra (all S/N) and on the noise-free twins at S/N 50-150
   (``accuracy_shared.twin_test``).
5. With ``--refine`` (the default; ``--no-refine`` skips it) the same spectra are scored again with
   the labels refined against reference spectra, as a model trained with ``--reference-spectra``
   labels them: each training set's noise-free twins are its reference spectra
   (``reference_refinement``), so an added star improves the refinement's local models as well as
   the member.

Prints per label the scatter of each, the random draws' mean, and suggested / random - 1, per seed
and over the seeds (the seed alone moves a scatter by ~15 %). Appends one JSON line per trained
model to ``--out``, so a run stopped part way keeps what it measured; ``--runs`` trains only the
named ones (the random draws do not depend on it), so two processes can share the work and the table;
a rerun into the same ``--out`` skips the (training set, seed) pairs already there.
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
from speclabel.jobs.train.refine import refine_config
from speclabel.model.calibration import prior_widths
from speclabel.model.fit import EnsembleConfig, test_metrics
from speclabel.model.ood import OODConfig, fit_embedding_reference
from speclabel.model.refine import ReferenceLibrary, RefineConfig, Refinement
from speclabel.model.splits import hash_uniform
from speclabel.pipeline.suggest import (
    DEFAULT_DIVERSITY,
    DIVERSITY,
    CandidatePools,
    covered_points,
    score_parts,
    select,
)

START_SALT = "speclabel-suggest-bench-start"
VALIDATION_SALT = "speclabel-suggest-bench-validation"
PARTITIONS = 4


def subset(arrays: dict, rows: np.ndarray) -> dict:
    n = len(arrays["spectrum_id"])
    return {k: v[rows] if isinstance(v, np.ndarray) and len(v) == n else v for k, v in arrays.items()}


def train(arrays, setup, rows, variant, members, epochs, base_seed=0):
    """An ensemble of ``members`` members (seeds ``base_seed`` ..) of ``variant`` on ``rows``
    (outside the test split), each with its own validation split of them, as the training job draws it."""
    return fit_in_process(
        subset(arrays, rows),
        setup,
        variant,
        members,
        epochs,
        data={"n_rows": int(rows.sum())},
        base_seed=base_seed,
    )


def suggested_name(diversity: str, cover: str) -> str:
    name = "start+suggested" if diversity == DEFAULT_DIVERSITY else f"start+suggested-{diversity}"
    return name if cover == "none" else f"{name}-covered"


def suggested(ensemble, arrays, pool: np.ndarray, n: int, per_partition: int, selections, start) -> dict:
    """Row indices of the ``n`` stars ``pipeline.suggest`` picks from ``pool`` (indices), per
    selection ``(diversity, cover)`` of ``selections``; cover ``start``: away from the labels of the
    ``start`` rows."""
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
    covered = covered_points(arrays["labels"][start], LABEL_NAMES, ensemble.label_names, widths)
    return {
        (d, cover): select(
            pools, n, ensemble.label_names, widths, diversity=d, covered=covered if cover == "start" else None
        )
        .column("row")
        .to_numpy()
        for d, cover in selections
    }


def reference_refinement(ensemble, arrays, rows) -> Refinement:
    """The label refinement ``speclabel train --reference-spectra`` would attach to ``ensemble``
    trained on ``rows``: their noise-free twins as the reference spectra, the default settings with
    the members' validation scatter as the prior widths. A star added to the training set is a
    reference star too, so the refined labels are what the suggested stars buy a model with them."""
    library = ReferenceLibrary(
        arrays["labels"][rows], arrays["flux_clean"][rows], arrays["mask"][rows], ensemble.setup
    )
    return Refinement(library, refine_config(ensemble, RefineConfig()))


SAMPLES = {"validation": "val_", "test": ""}  # scored rows -> key prefix (the test keys as before)


def scores(ensemble, arrays, rows: dict, refinement=None) -> dict:
    """Per sample of ``rows`` (:data:`SAMPLES` -> row mask): scatter on its observed spectra (all
    S/N) and its twins (S/N 50-150) of the network's labels and, with a ``refinement``, of the
    refined labels on the same spectra (keys ``*_refined``)."""
    out = {}
    labellings = {"": None, **({"_refined": refinement} if refinement is not None else {})}
    for sample, chosen in rows.items():
        observed = {k: arrays[k][chosen] for k in ("flux", "mask", "labels", "snr", "ivar")}
        prefix = SAMPLES[sample]
        for suffix, refine in labellings.items():
            metrics = test_metrics(ensemble, [observed], refinement=refine)
            twins = twin_test(ensemble, arrays, chosen, refinement=refine)
            out[f"{prefix}test_all{suffix}"] = {n: metrics["all"][n]["scatter"] for n in LABEL_NAMES}
            out[f"{prefix}twins{suffix}"] = {n: twins[n]["scatter"] for n in LABEL_NAMES}
    return out


def print_table(records: list[dict]) -> None:
    """Per seed: each training set's scatter, the random draws' mean and each suggested set against
    it; then over the seeds that have every run: the mean change and its spread over the seeds."""
    seeds = sorted({r.get("seed", 0) for r in records})
    samples = (
        ("val_test_all", "pool validation stars, all S/N (for choosing)"),
        ("val_twins", "pool validation stars' twins, S/N 50-150 (for choosing)"),
        ("test_all", "common test split, all S/N"),
        ("twins", "test split's twins, S/N 50-150"),
    )
    keys = [
        (f"{sample}{suffix}", f"{title}{what}")
        for suffix, what in (("", ""), ("_refined", ", refined labels"))
        for sample, title in samples
    ]
    for key, title in keys:
        if not any(key in r for r in records):
            continue
        records_of_key = [r for r in records if key in r]
        print(f"\nscatter on the {title}")
        print(f"{'training set':<36} " + " ".join(f"{n:>9}" for n in LABEL_NAMES))
        changes: dict[str, list[list[float]]] = {}
        for seed in seeds:
            mine = [r for r in records_of_key if r.get("seed", 0) == seed]
            for r in mine:
                print(
                    f"{r['name'] + f' @seed {seed}':<36} "
                    + " ".join(f"{r[key][n]:>9.4g}" for n in LABEL_NAMES)
                )
            random = [r for r in mine if r["name"].startswith("start+random")]
            if not random:
                continue
            mean = {n: float(np.mean([r[key][n] for r in random])) for n in LABEL_NAMES}
            print(f"{f'random mean @seed {seed}':<36} " + " ".join(f"{mean[n]:>9.4g}" for n in LABEL_NAMES))
            for chosen in (r for r in mine if r["name"].startswith("start+suggested")):
                change = [100 * (chosen[key][n] / mean[n] - 1) for n in LABEL_NAMES]
                changes.setdefault(chosen["name"], []).append(change)
                label = f"{chosen['name'][6:]} vs random @seed {seed}"
                print(f"{label:<36} " + " ".join(f"{c:>+8.1f}%" for c in change))
        for name, per_seed in changes.items():
            if len(per_seed) > 1:
                values = np.array(per_seed)
                cells = " ".join(
                    f"{m:>+5.1f}±{s:<4.1f}"
                    for m, s in zip(values.mean(0), values.std(0, ddof=1), strict=True)
                )
                print(f"{name[6:] + f' vs random, {len(per_seed)} seeds':<36} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=150)
    parser.add_argument("--validation", type=int, default=100, help="pool stars held out for choosing")
    parser.add_argument("--add", type=int, default=100)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--start-members", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override the default 120 epochs")
    parser.add_argument(
        "--variant", default="default", choices=sorted(VARIANTS), help="the recipe of every run"
    )
    parser.add_argument("--per-partition", type=int, default=1000)
    parser.add_argument(
        "--diversity", nargs="*", default=[DEFAULT_DIVERSITY], choices=sorted(DIVERSITY), help="selections"
    )
    parser.add_argument(
        "--cover",
        nargs="*",
        default=["none"],
        choices=["none", "start"],
        help="start: also each selection away from the start stars' labels (the reference stars)",
    )
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="member seeds of the retrainings")
    parser.add_argument("--out", default="out/suggest.jsonl")
    parser.add_argument(
        "--runs",
        nargs="*",
        help="train only these (start+suggested, start+random1, ...); draws stay the same",
    )
    parser.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score the refined labels, with each training set's twins as reference spectra",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    arrays, setup = load_shared()
    split = EnsembleConfig().split
    ids = arrays["spectrum_id"]
    test_rows = split.is_test(ids)
    outside = np.flatnonzero(~test_rows)
    order = outside[np.argsort(hash_uniform(ids[outside], START_SALT), kind="stable")]
    start, rest = np.sort(order[: args.start]), order[args.start :]
    rest = rest[np.argsort(hash_uniform(ids[rest], VALIDATION_SALT), kind="stable")]
    validation, pool = np.sort(rest[: args.validation]), np.sort(rest[args.validation :])
    print(
        f"{len(ids)} rows: {test_rows.sum()} test, {len(start)} start, "
        f"{len(validation)} validation, {len(pool)} pool"
    )
    scored = {"validation": np.isin(np.arange(len(ids)), validation), "test": test_rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    common = {
        "variant": args.variant,
        "epochs": args.epochs,
        "validation": args.validation,
        "machine": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
    }

    rng = np.random.default_rng(2026)
    chosen = {suggested_name(d, c): (d, c) for d in args.diversity for c in args.cover}
    runs = {name: None for name in chosen}
    runs.update(
        {f"start+random{d + 1}": rng.choice(pool, args.add, replace=False) for d in range(args.draws)}
    )
    runs = {name: added for name, added in runs.items() if not args.runs or name in args.runs}
    wanted = [d for name, d in chosen.items() if name in runs]
    if wanted:
        began = time.perf_counter()
        start_mask = np.isin(np.arange(len(ids)), start)
        ensemble = train(arrays, setup, start_mask, args.variant, args.start_members, args.epochs)
        embedding = ensemble.predict(arrays["flux"][start], arrays["mask"][start], embedding=True).embedding
        ensemble.ood = fit_embedding_reference([(ids[start].tolist(), embedding)], OODConfig(rows=len(start)))
        picks = suggested(ensemble, arrays, pool, args.add, args.per_partition, wanted, start)
        runs.update({suggested_name(*selection): rows for selection, rows in picks.items()})
        seconds = time.perf_counter() - began
        print(f"start ensemble ({args.start_members} members) and suggestions: {seconds:.0f} s")
    # A rerun into the same --out skips the (training set, seed) pairs it already holds.
    done = set()
    if out.exists():
        protocol = (args.variant, args.epochs, args.validation)
        for line in out.read_text().splitlines():
            r = json.loads(line)
            if (r["variant"], r["epochs"], r.get("validation", 0)) == protocol:
                done.add((r["name"], r.get("seed", 0)))
    for (name, added), seed in ((run, seed) for seed in args.seeds for run in runs.items()):
        if (name, seed) in done:
            print(f"{name} @seed {seed}: already in {out}")
            continue
        began, cpu = time.perf_counter(), time.process_time()
        rows = np.isin(np.arange(len(ids)), np.concatenate([start, added]))
        model = train(arrays, setup, rows, args.variant, 1, args.epochs, base_seed=seed)
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu
        refinement = reference_refinement(model, arrays, rows) if args.refine else None
        record = {
            "bench": "suggest",
            "name": name,
            "seed": seed,
            "added_labels_mean": dict(
                zip(LABEL_NAMES, arrays["labels"][added].mean(0).tolist(), strict=True)
            ),
            "added_labels_std": dict(zip(LABEL_NAMES, arrays["labels"][added].std(0).tolist(), strict=True)),
            "seconds": seconds,  # the training's, not the scoring's
            "cpu_seconds": cpu_seconds,
            "epochs_run": model.member_info[0]["epochs_run"],
            **scores(model, arrays, scored, refinement),
            **common,
        }
        with out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"{name} @seed {seed}: {record['seconds']:.0f} s, {record['epochs_run']} epochs")
    # Every record in --out: runs made by separate processes (--runs) table together.
    print_table([json.loads(line) for line in out.read_text().splitlines()])


if __name__ == "__main__":
    main()
