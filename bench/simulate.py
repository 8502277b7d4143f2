"""Simulator throughput and memory: spectra/s by worker count, peak RSS flat in the survey size.

Each measurement runs `speclabel simulate` in a fresh process so that peak RSS (of the writer and its
worker processes) belongs to that run alone.

    python bench/simulate.py                      # 20k and 100k spectra (100k ~ 13 GB of Parquet)
    python bench/simulate.py --sizes 2000 10000   # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time


def run_once(n: int, workers: int, out_dir: str) -> tuple[float, float, float]:
    """Wall seconds, peak RSS of the parent and of the largest child (MiB), output size (GB)."""
    path = os.path.join(out_dir, f"survey-{n}-{workers}.parquet")
    code = (
        "import resource, sys; from speclabel.jobs.cli import main; rc = main(sys.argv[1:]); "
        "self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
        "print(f'RSS {self} {kids}'); sys.exit(rc)"
    )
    args = ["simulate", "--n", str(n), "--out", path, "--seed", "1", "--workers", str(workers)]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    rss_self, rss_kids = (int(v) / 1024 for v in result.stdout.split("RSS ")[1].split())
    size_gb = os.path.getsize(path) / 1e9
    os.unlink(path)
    return elapsed, max(rss_self, rss_kids), size_gb


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tmp", default=None, help="folder for the temporary output")
    args = parser.parse_args()
    print(f"# {platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print(
        f"{'spectra':>8} {'workers':>7} {'seconds':>8} {'spectra/s':>9} {'peak RSS MiB':>12} {'file GB':>8}"
    )
    with tempfile.TemporaryDirectory(dir=args.tmp) as out_dir:
        for n in args.sizes:
            for workers in args.workers:
                seconds, rss, size = run_once(n, workers, out_dir)
                print(f"{n:>8} {workers:>7} {seconds:>8.1f} {n / seconds:>9.0f} {rss:>12.0f} {size:>8.2f}")


if __name__ == "__main__":
    main()
