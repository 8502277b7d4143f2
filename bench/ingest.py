"""Ingest throughput: FITS files to the spectra store on Ray Data, against a plain single-process loop.

Writes a simulated survey as Gaia-ESO-like FITS files (two per star), then times
(1) the per-file work alone in one process (decode, resample, assemble; no I/O of outputs), and
(2) the whole `run_ingest` job on a local Ray instance (scan, plan, ingest, accounting, publish).
The ratio of the two, measured in the same run, is the number to compare across machines.

    python bench/ingest.py                 # 2000 stars (4000 files)
    python bench/ingest.py --stars 500     # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stars", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--tmp", default=None, help="folder for the temporary files")
    args = parser.parse_args()

    import ray

    from speclabel.core.setups import get_setup
    from speclabel.pipeline.fits_formats import read_primary_header, spectrum_id
    from speclabel.pipeline.ingest import IngestOptions, assemble_star, run_ingest
    from speclabel.pipeline.simulate import SurveyConfig, write_fits

    setup = get_setup()
    options = IngestOptions(release="BENCH")
    print(f"# {platform.node()} {os.cpu_count()} CPUs (Ray given {args.cpus}), {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        sim = Path(tmp) / "sim"
        write_fits(str(sim), setup, SurveyConfig(n=args.stars, seed=1), workers=args.cpus)
        files = sorted((sim / "spectra").rglob("*.fits"))
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"# {args.stars} stars, {len(files)} files, {megabytes:.0f} MB")
        print(f"{'method':<34} {'seconds':>8} {'stars/s':>8} {'files/s':>8} {'MB/s':>6}")

        def report(name: str, seconds: float) -> None:
            rates = (args.stars / seconds, len(files) / seconds, megabytes / seconds)
            print(f"{name:<34} {seconds:>8.1f} {rates[0]:>8.0f} {rates[1]:>8.0f} {rates[2]:>6.1f}")

        start = time.perf_counter()
        stars = defaultdict(list)
        for path in files:
            data = path.read_bytes()
            star, _ = spectrum_id(read_primary_header(iter_blocks(data)), str(path))
            stars[star].append((str(path), data))
        for star, star_files in stars.items():
            assert assemble_star(star, star_files, setup, options).stored
        single = time.perf_counter() - start
        report("per-file work, 1 process", single)

        ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            start = time.perf_counter()
            result = run_ingest(str(sim / "spectra"), str(Path(tmp) / "store"), setup, options)
            job = time.perf_counter() - start
        finally:
            ray.shutdown()
        assert result.counts["spectra_stored"] == args.stars
        report(f"run_ingest on Ray ({args.cpus} CPUs)", job)
        phases = ", ".join(f"{k} {v:.1f}" for k, v in result.timings_s.items())
        print(f"# job phases (s): {phases}; job / single-process = {job / single:.2f}")


def iter_blocks(data: bytes):
    position = 0

    def read(n: int) -> bytes:
        nonlocal position
        chunk = data[position : position + n]
        position += n
        return chunk

    return read


if __name__ == "__main__":
    main()
