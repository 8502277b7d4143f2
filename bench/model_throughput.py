"""Ensemble throughput on CPU: the fused engine against the member-by-member reference, in one run.

    nice -n 10 .venv/bin/python bench/model_throughput.py                 # default preset, 1 and 2 threads
    .venv/bin/python bench/model_throughput.py --arch paper default --threads 1 --batch-sizes 64

For each torch thread count, the machine's float32 matmul peak (2048^3, best of 5) is measured in
the same run, then each engine labels the same simulated spectra (``pipeline.simulate``, masked
pixels included) through ``Ensemble.predict``: forward only, and forward + saliency for all labels
(``saliency="summary"``), at a few batch sizes. Reported: spectra/s (wall clock, best of
``--repeats``), fused / reference, GFLOP/s and % of the matmul peak, % of the FLOP limit, and
spectra per CPU-second of this process with its fused / reference ratio (other jobs on a shared
machine distort wall-clock rates, 2-thread ones most: OpenMP threads wait for each other). FLOPs
come from the architecture (``arch.forward_flops``: convolutions and dense layers, 2 per
multiply-add) times the members; a saliency pass counts 1 + n_labels forwards (each input-gradient
backward costs about one forward). The FLOP limit is the matmul peak divided by those FLOPs.

Before timing, the fused labels and saliency are checked against the reference on the first
spectra (issue 10 tolerances), so a fast wrong answer cannot be reported. Random weights: speed does
not depend on what the network learnt. The machine is shared: compare ratios from one run, and note
the load average printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import get_setup
from speclabel.model.arch import build_network, forward_flops, get_arch
from speclabel.model.ensemble import Ensemble, InferenceOptions
from speclabel.model.scaling import LabelScaler
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of a large matmul at the current thread count: the machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    return 2 * n**3 / min(_timed(lambda: a @ b) for _ in range(repeats)) / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spectra_per_second(ensemble, flux, mask, saliency, batch, engine, repeats) -> tuple[float, float]:
    """Best of ``repeats`` rates of ``Ensemble.predict`` after a warm-up batch: spectra per wall-clock
    second, and per second of this process's CPU time (less sensitive to other jobs on the machine)."""
    ensemble.predict(flux[:batch], mask[:batch], saliency=saliency, batch_size=batch, engine=engine)
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        ensemble.predict(flux, mask, saliency=saliency, batch_size=batch, engine=engine)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return len(flux) / min(wall), len(flux) / min(cpu)


def simulated_inputs(setup, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = simulate_chunk(setup, SurveyConfig(n=n, seed=3, chunk_size=n), 0)
    flux, mask = model_inputs(spectra_arrays(table, setup), setup)
    labels = np.stack([table.column(name).to_numpy() for name in LABEL_NAMES], axis=1)
    return flux, mask, labels


def check_agreement(ensemble: Ensemble, flux: np.ndarray, mask: np.ndarray) -> str:
    """The fused engine against the reference: largest label error (fraction of the training
    range), largest saliency error (fraction of each label's largest |gradient|), and the fraction
    of saliency values off by more than 1e-4 of it (max-pool near-ties, see ``ensemble.py``)."""
    fast = ensemble.predict(flux, mask, saliency="full")
    ref = ensemble.predict(flux, mask, saliency="full", engine="reference")
    span = ensemble.scaler.train_max - ensemble.scaler.train_min
    label_error = (np.abs(fast.mean - ref.mean) / span).max()
    peak = np.abs(ref.saliency_maps).max(axis=(0, 2))[None, :, None]
    error = np.abs(fast.saliency_maps - ref.saliency_maps) / peak
    spectra_hit = (error > 1e-4).any(axis=(1, 2)).sum()
    return (
        f"labels within {label_error:.1e} of the training range; saliency within {error.max():.1e} of max "
        f"|grad|, {100 * (error > 1e-4).mean():.3f}% of values (in {spectra_hit} of {len(flux)} spectra) "
        "beyond 1e-4 (max-pool near-ties)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", nargs="+", default=["default"], help="presets or .toml files")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--spectra", type=int, default=64, help="spectra per fused measurement")
    parser.add_argument(
        "--reference-spectra", type=int, default=16, help="spectra per reference measurement (it is slow)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--tile", type=int, default=None, help="fused tile (default: sized to the caches)")
    args = parser.parse_args()

    setup = get_setup()
    flux, mask, labels = simulated_inputs(
        setup, max(args.spectra, args.reference_spectra, max(args.batch_sizes))
    )
    print(
        f"# {platform.node()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"# load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    header = (
        f"{'arch':<8} {'thr':>3} {'peak GF/s':>9} {'mode':<9} {'batch':>5} {'engine':<9} "
        f"{'spectra/s':>9} {'x ref':>6} {'GFLOP/s':>8} {'% peak':>6} {'% limit':>7} "
        f"{'/CPU-s':>7} {'x ref':>6}"
    )
    for arch_name in args.arch:
        arch = get_arch(arch_name)
        torch.manual_seed(0)
        networks = [build_network(arch, setup) for _ in range(args.members)]
        scaler = LabelScaler.fit(labels)
        ensemble = Ensemble(setup, arch, scaler, networks, inference=InferenceOptions(tile=args.tile))
        agreement = check_agreement(ensemble, flux[: args.reference_spectra], mask[: args.reference_spectra])
        fused = ensemble.fused_engine()
        if fused is None:
            raise SystemExit("the fused engine is not in use for this architecture: nothing to measure")
        flops = forward_flops(arch, setup) * args.members
        print(
            f"\n# arch {arch.name!r}: {forward_flops(arch, setup) / 1e6:.2f} MFLOP per member forward, "
            f"{args.members} members, fused tile {fused.tile}"
        )
        print(f"# fused vs reference on {args.reference_spectra} simulated spectra: {agreement}")
        print(header)
        for threads in args.threads:
            torch.set_num_threads(threads)
            peak = matmul_peak()
            for mode, saliency, work in (("forward", None, 1), ("saliency", "summary", 1 + len(LABEL_NAMES))):
                limit = peak * 1e9 / (flops * work)
                for batch in args.batch_sizes:
                    rates = {
                        engine: spectra_per_second(
                            ensemble, flux[:n], mask[:n], saliency, batch, engine, args.repeats
                        )
                        for engine, n in (("reference", args.reference_spectra), ("fused", args.spectra))
                    }
                    for engine, (rate, cpu_rate) in rates.items():
                        gflops = rate * flops * work / 1e9
                        print(
                            f"{arch.name:<8} {threads:>3} {peak:>9.1f} {mode:<9} {batch:>5} {engine:<9} "
                            f"{rate:>9.1f} {rate / rates['reference'][0]:>6.1f} {gflops:>8.2f} "
                            f"{100 * gflops / peak:>5.1f}% {100 * rate / limit:>6.1f}% "
                            f"{cpu_rate:>7.1f} {cpu_rate / rates['reference'][1]:>6.1f}"
                        )
    print(f"\n# load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
