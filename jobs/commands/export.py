"""Export a model directory as one portable file, for survey pipelines that are not Python.

  speclabel export MODEL_DIR --format onnx --out model.onnx

--format onnx writes the whole ensemble as one ONNX graph (opset 17). Inputs: flux, float32
[N, pixels of all arms in setup order], any value at a masked pixel; good, same shape, bool (or
float32 with --good-type float32: > 0 where usable, e.g. the inverse variance), true where the
pixel is usable. Outputs: mean and std [N, labels] in physical units (std over members, ddof 1) and
members [M, N, labels]. Masked and non-finite pixels are handled inside the graph as speclabel's own
labelling handles them. The label names, setup and model_id are in the file's metadata_props.
Before anything is written the graph is run with onnxruntime on probe spectra and compared with the
PyTorch ensemble; a graph whose labels are off by more than 1e-4 of a label's training range is
refused (exit 1). Needs the export extra: pip install 'speclabel[export]'.
"""

from __future__ import annotations

import argparse

HELP = "export a model as one portable file (ONNX) for pipelines that are not Python"
FORMATS = ("onnx",)
GOOD_TYPES = ("bool", "float32")  # model.export_onnx.GOOD_DTYPES (not imported here: it imports torch)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="model directory (path or URI)")
    parser.add_argument(
        "--format", choices=FORMATS, default=FORMATS[0], help="file format (default: %(default)s)"
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="file to write (path or URI), e.g. model.onnx"
    )
    parser.add_argument(
        "--good-type",
        choices=GOOD_TYPES,
        default=GOOD_TYPES[0],
        help="type of the graph's good input: bool, or float32 where > 0 is usable (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from speclabel.core.errors import UsageError
    from speclabel.core.storage import exists, filesystem_and_path, write_bytes_atomic
    from speclabel.model.export_onnx import export_onnx, onnx_modules
    from speclabel.model.io import load_model

    fs, target = filesystem_and_path(args.out)
    if not args.overwrite and exists(fs, target):
        raise UsageError(f"{args.out} exists; choose another name or pass --overwrite")
    onnx_modules()  # a missing extra is reported before the model is read
    ensemble = load_model(args.model)
    graph, check = export_onnx(ensemble, good_dtype=args.good_type)
    write_bytes_atomic(fs, target, graph)
    print(
        f"export: model {ensemble.model_id} ({ensemble.n_members} members, setup {ensemble.setup.name}, "
        f"labels {', '.join(ensemble.label_names)}) -> {args.out} ({len(graph) / 2**20:.1f} MiB, onnx); "
        f"onnxruntime matches PyTorch to {check.worst:.1g} of each label's training range "
        f"(tolerance {check.tolerance:g})"
    )
    return 0
