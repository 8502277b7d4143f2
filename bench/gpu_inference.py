"""Spectra/s per GPU end to end with I/O, and the projected time for 10 million spectra on 8 GPUs.

Run it on a machine with an NVIDIA GPU (BENCHMARKS.md says which numbers exist):

    .venv/bin/python bench/gpu_inference.py                                   # simulated survey
    .venv/bin/python bench/gpu_inference.py --model path/to/model --input survey.parquet
    .venv/bin/python bench/gpu_inference.py --device cpu --spectra 512        # try it without a GPU

Without ``--input`` a simulated survey is written to a temporary Parquet file first (not timed).
Then, for each precision (``float32``; ``tf32`` and ``bf16`` only after ``Ensemble`` has checked
them against float32 on the first spectra: one outside its tolerance is reported and skipped) and
each mode (forward only; forward + saliency summary), the Parquet row groups are read, turned into
network inputs (``core.arrays.model_inputs``), labelled by ``Ensemble.predict`` with one
fused ensemble on the device, and the labels and summaries collected. Reported: spectra/s end to
end, the part of the wall time spent in ``predict`` (the compute path, including host-device copies),
and the time to label 10 M spectra on 8 GPUs at 8x the end-to-end rate: one process per GPU, each
reading its own shard, so that I/O scales with the GPUs (as Ray Data actors do).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.errors import ConfigError
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import get_setup
from speclabel.model.arch import build_network, get_arch
from speclabel.model.ensemble import Ensemble, InferenceOptions
from speclabel.model.io import load_model
from speclabel.model.scaling import LabelScaler
from speclabel.pipeline.simulate import SurveyConfig, write_parquet

SURVEY = 10_000_000
GPUS = 8


def label_file(
    ensemble: Ensemble, path: str, batch_size: int, saliency: str | None
) -> tuple[int, float, float]:
    """Label every row of ``path``: (rows, wall seconds, seconds inside predict)."""
    rows, in_predict = 0, 0.0
    start = time.perf_counter()
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        flux, mask = model_inputs(
            spectra_arrays(pa.Table.from_batches([batch]), ensemble.setup), ensemble.setup
        )
        before = time.perf_counter()
        ensemble.predict(flux, mask, saliency=saliency, batch_size=batch_size)
        in_predict += time.perf_counter() - before
        rows += len(flux)
    return rows, time.perf_counter() - start, in_predict


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", help="model directory (default: random weights, --arch, --members)")
    parser.add_argument("--arch", default="paper")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--input", help="Parquet spectra table (default: a simulated survey)")
    parser.add_argument("--spectra", type=int, default=20000, help="size of the simulated survey")
    parser.add_argument("--batch-size", type=int, default=2048, help="rows per Parquet read and predict call")
    parser.add_argument("--precisions", nargs="+", default=["float32", "tf32", "bf16"])
    parser.add_argument("--tile", type=int, default=None, help="spectra per fused step (default: by memory)")
    args = parser.parse_args()

    setup = get_setup()
    if args.model:
        ensemble = load_model(args.model, setup=setup)
    else:
        arch = get_arch(args.arch)
        torch.manual_seed(0)
        scaler = LabelScaler.fit([[4000, 1, -2, -0.2, -0.3], [7000, 5, 0.5, 0.5, 0.6]])
        ensemble = Ensemble(setup, arch, scaler, [build_network(arch, setup) for _ in range(args.members)])
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {platform.node()}: {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# arch {ensemble.arch.name!r}, {ensemble.n_members} members, {len(LABEL_NAMES)} labels")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.input
        if path is None:
            path = os.path.join(tmp, "survey.parquet")
            write_parquet(
                path, setup, SurveyConfig(n=args.spectra, seed=5, chunk_size=min(args.spectra, 4096))
            )
        print(
            f"# input {path}: {pq.ParquetFile(path).metadata.num_rows} spectra, batches of {args.batch_size}"
        )
        print(
            f"{'precision':<9} {'mode':<9} {'tile':>5} {'spectra/s':>10} {'in predict':>10} "
            f"{'10M, 8 devices':>14}"
        )
        for precision in args.precisions:
            for mode, saliency in (("forward", None), ("saliency", "summary")):
                ensemble.inference = InferenceOptions(device=args.device, precision=precision, tile=args.tile)
                try:
                    label_file_warm_up(ensemble, path, args.batch_size, saliency)
                except ConfigError as exc:
                    print(f"{precision:<9} {mode:<9} skipped: {exc}")
                    break
                rows, seconds, in_predict = label_file(ensemble, path, args.batch_size, saliency)
                rate = rows / seconds
                hours = SURVEY / (rate * GPUS) / 3600
                tile = ensemble.fused_engine().tile if ensemble.fused_engine() else "ref"
                print(
                    f"{precision:<9} {mode:<9} {tile:>5} {rate:>10.1f} {100 * in_predict / seconds:>9.0f}% "
                    f"{hours:>12.2f} h"
                )


def label_file_warm_up(ensemble: Ensemble, path: str, batch_size: int, saliency: str | None) -> None:
    """Build and check the engine, and let the device allocate, on the first row group."""
    first = next(pq.ParquetFile(path).iter_batches(batch_size=batch_size))
    flux, mask = model_inputs(spectra_arrays(pa.Table.from_batches([first]), ensemble.setup), ensemble.setup)
    ensemble.predict(flux, mask, saliency=saliency, batch_size=batch_size)


if __name__ == "__main__":
    main()
