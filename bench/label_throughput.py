"""`speclabel label` end to end against a plain single-process torch loop, and its peak memory.

Three measurements, each in a fresh process (so timings and memory belong to that run alone):

1. **With saliency summary** (8 members, the default network, GIRAFFE HR10+HR21, 15942 pixels):
   spectra/s of `speclabel label` on a simulated Parquet file against the same computation as a
   plain loop in one process (read batches -> validate/prepare -> ``Ensemble.predict`` -> label
   rows, no writing) over the same file. The plain loop runs with torch's default threads (= CPUs)
   and with 1 thread; the ratio is taken against the faster of the two.
2. **Forward only** (``--saliency none``), the same comparison.
3. **Memory**: peak PSS (proportional set size: shared object-store pages counted once) of the
   whole Ray job's process tree (driver, raylet, GCS, workers), forward only, for several survey
   sizes, with a generating source standing in for files (100k spectra are ~13 GB of Parquet).

The weights are random (speed does not depend on them). Ray runs locally with --cpus CPUs.

    python bench/label_throughput.py                          # the issue's sizes (about an hour on 2 CPUs)
    python bench/label_throughput.py --n-saliency 120 --n-forward 500 --memory-sizes 2000 6000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.abspath(__file__)


# -- the measured processes ---------------------------------------------------------------------------


def make_model(folder: str, members: int = 8) -> str:
    import numpy as np
    import torch

    from speclabel.core.setups import get_setup
    from speclabel.model.arch import build_network, get_arch
    from speclabel.model.ensemble import Ensemble
    from speclabel.model.io import save_model
    from speclabel.model.scaling import LabelScaler
    from speclabel.pipeline.simulate import draw_labels

    setup = get_setup()
    labels = draw_labels(np.random.default_rng(0), 1000)
    scaler = LabelScaler.fit(np.stack([labels[k] for k in ("teff", "logg", "feh", "mgfe", "alfe")], axis=1))
    torch.manual_seed(0)
    arch = get_arch()  # the default preset, what `speclabel train` fits
    ensemble = Ensemble(setup, arch, scaler, [build_network(arch, setup) for _ in range(members)])
    save_model(ensemble, folder)
    return folder


def plain_loop(spectra: str, model: str, saliency: str, threads: int | None, batch_size: int) -> dict:
    """The reference: one process, no Ray."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from speclabel.model.io import load_model
    from speclabel.pipeline.labelling.batch import (
        SOURCE,
        FlagThresholds,
        OutputSpec,
        label_rows,
        model_batch,
        prepare,
    )

    if threads:
        torch.set_num_threads(threads)
    ensemble = load_model(model)
    setup = ensemble.setup
    mode = None if saliency == "none" else saliency
    spec = OutputSpec(ensemble.label_names, tuple(setup.line_windows), mode, False, setup.n_pixels)
    start = time.perf_counter()
    rows = 0
    for batch in pq.ParquetFile(spectra).iter_batches(batch_size=batch_size):
        table = pa.Table.from_batches([batch])
        table = table.append_column(SOURCE, pa.array([spectra] * table.num_rows))
        prepared = prepare(table, setup)
        good_rows, flux, mask = model_batch(prepared)
        prediction = ensemble.predict(flux, mask, saliency=mode)
        now = dt.datetime.now(dt.UTC)
        label_rows(
            prepared.take(good_rows),
            prediction,
            spec,
            FlagThresholds(),
            model_id="m",
            run_id="r",
            processed_at=now,
        )
        rows += table.num_rows
    return {"rows": rows, "seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}


def label_job(
    spectra: str, model: str, saliency: str, cpus: int, catalogue: str, generate: int | None
) -> dict:
    """`speclabel label` as a user runs it, on a local Ray with ``cpus`` CPUs."""
    import ray

    from speclabel.pipeline.labelling import LabelOptions, label_spectra

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    options = LabelOptions(release="BENCH", saliency=saliency, progress=False)
    source = GeneratedSpectra(generate) if generate else None
    result = label_spectra(spectra, model, catalogue, options, source=source)
    ray.shutdown()
    return {
        "rows": result.rows_in,
        "labelled": result.labelled,
        "seconds": time.perf_counter() - start,
        "label_seconds": result.label_seconds,
    }


class GeneratedSpectra:
    """``n`` spectra made by Ray tasks as the job pulls them: simulator templates repeated under new
    ids. A stand-in for files when measuring memory at scale (implements ``SpectraSource``)."""

    SOURCE = "generated"

    def __init__(self, n: int, templates: int = 64, seed: int = 0) -> None:
        self.n, self.templates, self.seed = n, templates, seed
        self.fingerprint = f"generated-{n}-{templates}-{seed}"
        self.releases = ["BENCH"]

    @property
    def rows_in(self) -> int:
        return self.n

    def rows_by_source(self) -> dict[str, int]:
        return {self.SOURCE: self.n}

    def describe(self) -> dict:
        return {"location": "generated", "rows": self.n, "fingerprint": self.fingerprint}

    def refused_quarantine(self):
        return iter(())

    def scan_ids(self) -> None:
        pass  # generated ids are unique

    def all_ids(self) -> list[str]:
        return [f"G-{i:09d}" for i in range(self.n)]

    def dataset(self, *, read_rows: int, num_cpus: float):
        import ray

        from speclabel.core.setups import get_setup
        from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk

        config = SurveyConfig(n=self.templates, seed=self.seed, chunk_size=self.templates)
        templates = simulate_chunk(get_setup(), config, 0).drop_columns(["release"])
        blocks = -(-self.n // read_rows)
        return ray.data.range(blocks, override_num_blocks=blocks).map_batches(
            _generate,
            fn_kwargs={"templates": templates, "n": self.n, "rows": read_rows, "source": self.SOURCE},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=num_cpus,
        )


def _generate(block, templates, n: int, rows: int, source: str):
    import numpy as np
    import pyarrow as pa

    for index in block.column("id").to_pylist():
        start = index * rows
        count = min(rows, n - start)
        table = templates.take(pa.array(np.arange(start, start + count) % templates.num_rows))
        table = table.set_column(
            0, "spectrum_id", pa.array([f"G-{i:09d}" for i in range(start, start + count)])
        )
        table = table.append_column("_source", pa.array([source] * count))
        yield table.append_column("_duplicate", pa.array(np.zeros(count, dtype=bool)))


# -- the parent: runs each measurement in a child and watches its memory ------------------------------


def tree_pss_mib(pid: int) -> float:
    """PSS (MiB) of a process and all its descendants, from /proc (Linux)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    stack += [int(child) for child in fh.read().split()]
        except (OSError, StopIteration):
            continue  # the process ended between listing and reading
    return total / 1024


def measure(args: list[str]) -> tuple[dict, float]:
    """Run ``this script args`` in a child; its JSON result and the peak PSS (MiB) of its process tree."""
    log = tempfile.TemporaryFile(mode="w+")  # Ray's logs; shown only when the run fails
    child = subprocess.Popen([sys.executable, HERE, *args], stdout=subprocess.PIPE, stderr=log, text=True)
    peak, done = 0.0, threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_pss_mib(child.pid))
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = child.communicate()
    done.set()
    watcher.join()
    if child.returncode != 0:
        log.seek(0)
        sys.stderr.write(log.read()[-5000:])
        raise SystemExit(f"measurement {args} failed with exit code {child.returncode}")
    log.close()
    return json.loads(out.strip().splitlines()[-1]), peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-saliency", type=int, default=480, help="spectra for the saliency comparison")
    parser.add_argument("--n-forward", type=int, default=2000, help="spectra for the forward-only comparison")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[20000, 100000])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--tmp", default=None, help="folder for the temporary files")
    args = parser.parse_args()
    print(
        f"# {platform.node()}, {os.cpu_count()} CPUs, Ray with {args.cpus} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        model = make_model(os.path.join(tmp, "model"))
        if args.n_saliency or args.n_forward:
            print(
                f"{'mode':<17} {'spectra':>7} {'plain':>14} {'plain 1 thr':>12} {'label job':>10} "
                f"{'label wall':>10} {'ratio':>6} {'ratio wall':>10}  (spectra/s; ratio: job / best plain)"
            )
        for saliency, n in (("summary", args.n_saliency), ("none", args.n_forward)):
            if not n:
                continue
            spectra = os.path.join(tmp, f"survey-{n}.parquet")
            if not os.path.exists(spectra):
                from speclabel.core.setups import get_setup
                from speclabel.pipeline.simulate import SurveyConfig, write_parquet

                write_parquet(
                    spectra, get_setup(), SurveyConfig(n=n, seed=1, chunk_size=min(500, n), release="BENCH")
                )
            plain, _ = measure(["_plain", spectra, model, saliency, "0", str(args.batch_size)])
            plain1, _ = measure(["_plain", spectra, model, saliency, "1", str(args.batch_size)])
            catalogue = os.path.join(tmp, f"cat-{saliency}")
            job, _ = measure(["_label", spectra, model, saliency, str(args.cpus), catalogue, "0"])
            best = max(n / plain["seconds"], n / plain1["seconds"])
            print(
                f"{'saliency summary' if saliency == 'summary' else 'forward only':<17} {n:>7} "
                f"{n / plain['seconds']:>9.2f} ({plain['threads']}t) {n / plain1['seconds']:>12.2f} "
                f"{n / job['label_seconds']:>10.2f} {n / job['seconds']:>10.2f} "
                f"{n / job['label_seconds'] / best:>6.2f} {n / job['seconds'] / best:>10.2f}",
                flush=True,
            )
        if args.memory_sizes:
            print(
                f"\n{'forward only, generated':<24} {'spectra':>8} {'wall s':>8} {'spectra/s':>9} "
                f"{'peak PSS MiB':>12}"
            )
        for n in args.memory_sizes:
            catalogue = os.path.join(tmp, f"cat-memory-{n}")
            job, peak = measure(["_label", "generated", model, "none", str(args.cpus), catalogue, str(n)])
            print(
                f"{'':<24} {n:>8} {job['seconds']:>8.1f} {n / job['label_seconds']:>9.1f} {peak:>12.0f}",
                flush=True,
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        spectra, model, saliency, threads, batch = sys.argv[2:7]
        print(json.dumps(plain_loop(spectra, model, saliency, int(threads) or None, int(batch))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_label":
        spectra, model, saliency, cpus, catalogue, generate = sys.argv[2:8]
        print(json.dumps(label_job(spectra, model, saliency, int(cpus), catalogue, int(generate) or None)))
    else:
        main()
