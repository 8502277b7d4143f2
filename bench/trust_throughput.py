"""What the trust columns cost the label job: the same spectra labelled by one ensemble without and
with its forward model, calibration and OOD reference, in one run on one local Ray instance.

    python bench/trust_throughput.py --plain MODEL_WITHOUT --trust MODEL_WITH --spectra TABLE

``--plain`` and ``--trust`` are the same members (e.g. a model directory copied before rerunning
``speclabel train`` on its run added the post-training fits). Each mode labels ``--spectra`` into a
fresh catalogue ``--repeat`` times, alternating, and reports the best spectra/s per mode and the ratio.

    python bench/trust_throughput.py --refined MODEL_WITH_REFERENCE_SPECTRA --spectra TABLE

compares the label refinement instead: the same model labelled with ``--no-refine`` ("network")
and as it labels by default ("refined").
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from speclabel.core.reporting import QUIET
from speclabel.pipeline.labelling import LabelOptions, label_spectra
from speclabel.pipeline.ray_session import ray_session


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--plain", help="model directory without the trust fits")
    parser.add_argument("--trust", help="the same members with them")
    parser.add_argument("--refined", help="instead: a model with reference spectra, unrefined and refined")
    parser.add_argument("--spectra", required=True, help="a spectra table (Parquet file or store)")
    parser.add_argument("--saliency", default="summary", choices=["summary", "none"])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.refined:
        modes = (("network", args.refined, False), ("refined", args.refined, True))
    elif args.plain and args.trust:
        modes = (("plain", args.plain, True), ("trust", args.trust, True))
    else:
        parser.error("give --plain and --trust, or --refined")
    best: dict[str, float] = {}
    print(
        f"# {platform.node()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), "
        f"{time.strftime('%Y-%m-%d')}; saliency {args.saliency}"
    )
    with ray_session("local", quiet=True), tempfile.TemporaryDirectory() as folder:
        for i in range(args.repeat):
            for mode, model, refine in modes:
                out = os.path.join(folder, f"{mode}-{i}")
                options = LabelOptions(release="BENCH", saliency=args.saliency, refine=refine, progress=False)
                began = time.perf_counter()
                result = label_spectra(args.spectra, model, out, options, reporter=QUIET)
                seconds = time.perf_counter() - began
                rate = result.labelled / seconds
                best[mode] = max(best.get(mode, 0.0), rate)
                print(
                    f"{mode:<6} run {i}: {result.labelled} spectra in {seconds:.1f} s, {rate:.1f} spectra/s"
                )
    (first, *_), (second, *_) = modes
    print(
        f"best: {first} {best[first]:.1f}, {second} {best[second]:.1f} spectra/s; "
        f"{second} / {first} {best[second] / best[first]:.3f}"
    )


if __name__ == "__main__":
    main()
