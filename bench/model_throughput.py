"""CPU throughput of the reference ensemble: spectra/s and GFLOP/s against this machine's matmul peak.

    nice -n 10 .venv/bin/python bench/model_throughput.py --arch default --threads 1 2

For each torch thread count: the peak (a 2048^3 float32 matmul, best of 5), then for each batch size
(a) the 8-member forward pass only and (b) forward + saliency for all 5 labels (the summary), through
``Ensemble.predict``. FLOPs are counted from the architecture (``arch.forward_flops``: convolutions
and dense layers, 2 per multiply-add); a saliency pass is counted as 1 forward + 5 input-gradient
backwards of about one forward each, i.e. 6 forwards per member. Random weights: speed does not
depend on what the network learnt.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from speclabel.model.arch import build_network, forward_flops, get_arch
from speclabel.model.ensemble import Ensemble
from speclabel.model.scaling import LabelScaler
from speclabel.pipeline.setups import get_setup


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="default")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--spectra", type=int, default=256, help="spectra per measurement")
    args = parser.parse_args()

    setup = get_setup()
    arch = get_arch(args.arch)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    scaler = LabelScaler.fit(rng.normal(size=(10, 5)))
    ensemble = Ensemble(setup, arch, scaler, [build_network(arch, setup) for _ in range(args.members)])
    flux = rng.uniform(0.6, 1.0, (args.spectra, setup.n_pixels)).astype(np.float32)
    mask = np.ones(flux.shape, bool)
    flops = forward_flops(arch, setup) * args.members

    print(
        f"machine: {platform.node()}, {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(
        f"arch {arch.name!r}: {forward_flops(arch, setup) / 1e6:.1f} MFLOP per spectrum per member forward; "
        f"{args.members} members; {args.spectra} spectra per measurement"
    )
    columns = ("threads", "peak GF/s", "mode", "batch", "spectra/s", "GFLOP/s", "% peak")
    print("\n{:>7} {:>9} {:<18} {:>5} {:>10} {:>8} {:>7}".format(*columns))
    for threads in args.threads:
        torch.set_num_threads(threads)
        peak = matmul_peak()
        for mode, saliency, work in (("forward", None, 1), ("forward+saliency", "summary", 6)):
            for batch in args.batch_sizes:
                ensemble.predict(flux[:batch], mask[:batch], saliency=saliency, batch_size=batch)  # warm-up
                seconds = min(
                    _timed(lambda: ensemble.predict(flux, mask, saliency=saliency, batch_size=batch))  # noqa: B023
                    for _ in range(2)
                )
                rate = args.spectra / seconds
                gflops = rate * flops * work / 1e9
                share = 100 * gflops / peak
                row = f"{threads:>7} {peak:>9.1f} {mode:<18} {batch:>5} {rate:>10.1f} {gflops:>8.2f}"
                print(f"{row} {share:>6.1f}%")


if __name__ == "__main__":
    main()
