"""The ensemble as one portable ONNX graph, for pipelines that are not Python.

The graph takes ``flux`` (float32 ``[N, P]``, the setup's arms concatenated in setup order, any
value at a masked pixel) and ``good`` (``[N, P]``, bool, or float32 where a value > 0 marks a usable
pixel, so an inverse variance can be passed as it is) and returns ``mean`` and ``std`` ``[N, L]``
in physical units and ``members`` ``[M, N, L]``; a model whose members have a variance head
(``ArchConfig.variance_head``) also returns ``aleatoric`` ``[N, L]``, as ``Prediction.aleatoric``
(the members' own predicted error, before calibration). Inside it does what labelling does around the
networks: a pixel is usable where ``good`` says so and its flux is finite (as
``core.arrays.model_inputs`` decides), the flux of every other pixel is set to 1.0, each member reads
``reference - flux`` (zero at masked pixels, and the mask channel if it has one), its scaled output
is de-scaled with the model's label scaling, and ``std`` is the standard deviation over members with
``ddof = STD_DDOF`` (NaN with a single member, as :meth:`Ensemble.predict` gives).

What a reader needs is in the model's ``metadata_props`` (strings; JSON where structured):
``format``, ``format_version``, ``model_id``, ``labels`` (the output columns, in order), ``setup``
(the arms and grids), ``n_pixels``, ``n_members``, ``std_ddof``, ``good_dtype`` and
``label_training_ranges`` (``{label: [min, max]}``, to flag extrapolations).

:func:`export_onnx` runs the graph with onnxruntime on probe spectra with garbage in their masked
pixels and refuses it unless every label of the mean, the std and every member is within
:data:`EXPORT_MATCH` of that label's training range of the PyTorch reference; the bytes are returned
only after that check.

The exporter is torch's TorchScript-based one (``dynamo=False``): it needs only ``onnx``, while the
torch.export-based default of torch >= 2.9 also needs ``onnxscript``. torch is pinned, so its
deprecation warning is silenced here rather than shown to every user.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from speclabel.core.errors import ConfigError, IntegrityError, SpeclabelError

from .arch import LOG_VARIANCE_RANGE
from .ensemble import STD_DDOF, Ensemble

FORMAT = "speclabel-onnx"
FORMAT_VERSION = 1
OPSET = 17
EXPORT_MATCH = 1e-4  # of each label's training range: ONNX against the PyTorch reference
PROBE_SPECTRA = 16
GOOD_DTYPES = ("bool", "float32")
INPUT_NAMES = ("flux", "good")
OUTPUT_NAMES = ("mean", "std", "members")
VARIANCE_HEAD_OUTPUT = "aleatoric"
EXTRA_HINT = "install it with: pip install 'speclabel[export]'"


def onnx_modules():
    """``(onnx, onnxruntime)``; a clear error naming the extra when they are not installed."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise SpeclabelError(f"ONNX export needs the {exc.name!r} package: {EXTRA_HINT}") from exc
    return onnx, onnxruntime


class EnsembleGraph(nn.Module):
    """``forward(flux, good) -> (mean, std, members[, aleatoric])``: the ensemble as the ONNX graph
    computes it (``aleatoric`` for a variance-head model)."""

    def __init__(self, ensemble: Ensemble, good_dtype: str = "bool"):
        super().__init__()
        if good_dtype not in GOOD_DTYPES:
            raise ConfigError(f"good_dtype must be one of {GOOD_DTYPES}, not {good_dtype!r}")
        self.good_dtype = good_dtype
        # Copies in float32: the caller's networks (maybe float64, maybe on a GPU) stay as they are.
        self.networks = nn.ModuleList(
            copy.deepcopy(n).to("cpu", torch.float32).eval() for n in ensemble.networks
        )
        self.register_buffer("scale", torch.as_tensor(ensemble.scaler.scale, dtype=torch.float32))
        self.register_buffer("offset", torch.as_tensor(ensemble.scaler.offset, dtype=torch.float32))
        self.variance_head = ensemble.arch.variance_head

    def forward(self, flux: torch.Tensor, good: torch.Tensor):
        good = good > 0 if self.good_dtype == "float32" else good
        usable = good & torch.isfinite(flux)
        flux = torch.where(usable, flux, torch.ones((), dtype=flux.dtype))
        outputs = [network(flux, usable, log_variance=self.variance_head) for network in self.networks]
        scaled = torch.stack([out[0] for out in outputs] if self.variance_head else outputs)
        members = scaled * self.scale + self.offset
        mean = members.mean(dim=0)
        n_members = len(self.networks)
        if n_members > STD_DDOF:
            std = ((members - mean).square().sum(dim=0) / (n_members - STD_DDOF)).sqrt()
        else:
            std = torch.full_like(mean, float("nan"))
        if not self.variance_head:
            return mean, std, members
        log_var = torch.stack([out[1] for out in outputs]).clamp(*LOG_VARIANCE_RANGE)
        return mean, std, members, log_var.exp().mean(dim=0).sqrt() * self.scale


def output_names(ensemble: Ensemble) -> tuple[str, ...]:
    """The graph's outputs, in order: :data:`OUTPUT_NAMES`, and ``aleatoric`` for a variance-head model."""
    return (*OUTPUT_NAMES, VARIANCE_HEAD_OUTPUT) if ensemble.arch.variance_head else OUTPUT_NAMES


@dataclass
class ExportCheck:
    """How far the ONNX graph is from the PyTorch reference, as fractions of each label's range."""

    mean: np.ndarray  # [L] worst |difference| / range over the probe spectra
    std: np.ndarray
    members: np.ndarray
    tolerance: float
    aleatoric: np.ndarray | None = None  # a variance-head model's

    @property
    def worst(self) -> float:
        parts = (self.mean, self.std, self.members, *(() if self.aleatoric is None else (self.aleatoric,)))
        return float(max(part.max() for part in parts))

    @property
    def passed(self) -> bool:
        return self.worst <= self.tolerance


def probe_spectra(ensemble: Ensemble, n: int = PROBE_SPECTRA, seed: int = 0):
    """``(flux, good, clean_flux)``: spectra around the members' input reference (1.0 without
    centring) with absorption-like dips, scattered masked pixels, a masked run at the start of the
    first spectrum and the end of the second, and masked pixels holding NaN, inf or large values in
    ``flux``; ``clean_flux`` has 1.0 there, as ``core.arrays.model_inputs`` gives."""
    rng = np.random.default_rng(seed)
    n_pixels = ensemble.setup.n_pixels
    reference = ensemble.networks[0].reference.detach().cpu().double().numpy()
    depth = rng.uniform(0.0, 0.3, (n, n_pixels)) * (rng.random((n, n_pixels)) < 0.1)
    clean = (reference * rng.uniform(0.9, 1.1, (n, 1)) - depth + rng.normal(0, 0.02, (n, n_pixels))).astype(
        np.float32
    )
    good = rng.random((n, n_pixels)) > 0.03
    run = min(40, n_pixels // 4)
    good[0, :run] = False
    good[min(1, n - 1), -run:] = False
    clean = np.where(good, clean, np.float32(1.0))
    garbage = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30, -7.0], np.float32), size=(n, n_pixels))
    return np.where(good, clean, garbage).astype(np.float32), good, clean


def check_graph(
    ensemble: Ensemble, graph: bytes, good_dtype: str = "bool", *, tolerance: float = EXPORT_MATCH
) -> ExportCheck:
    """Run ``graph`` with onnxruntime on :func:`probe_spectra` and compare with the reference engine."""
    _, onnxruntime = onnx_modules()
    flux, good, clean = probe_spectra(ensemble)
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    feed = {"flux": flux, "good": good if good_dtype == "bool" else good.astype(np.float32)}
    mean, std, members, *aleatoric = session.run(list(output_names(ensemble)), feed)
    want = ensemble.predict(clean, good, members=True, engine="reference")
    span = ensemble.scaler.train_max - ensemble.scaler.train_min
    span = np.where(span > 0, span, ensemble.scaler.scale)

    def error(got: np.ndarray, expected: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
        both_nan = np.isnan(got) & np.isnan(expected)
        diff = np.where(both_nan, 0.0, np.abs(got - expected))  # NaN where only one side is NaN
        return np.nan_to_num(diff / span, nan=np.inf).max(axis=axes)

    return ExportCheck(
        mean=error(mean, want.mean, (0,)),
        std=error(std, want.std, (0,)),
        members=error(members, want.members, (0, 1)),
        tolerance=tolerance,
        aleatoric=error(aleatoric[0], want.aleatoric, (0,)) if aleatoric else None,
    )


def metadata(ensemble: Ensemble, good_dtype: str) -> dict[str, str]:
    scaler = ensemble.scaler
    values = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_id": ensemble.model_id or "",
        "labels": json.dumps(list(ensemble.label_names)),
        "setup": json.dumps(ensemble.setup.to_dict(), sort_keys=True),
        "n_pixels": str(ensemble.setup.n_pixels),
        "n_members": str(ensemble.n_members),
        "std_ddof": str(STD_DDOF),
        "good_dtype": good_dtype,
        "label_training_ranges": json.dumps(
            {
                name: [float(scaler.train_min[i]), float(scaler.train_max[i])]
                for i, name in enumerate(ensemble.label_names)
            }
        ),
    }
    return values


def ensemble_graph(ensemble: Ensemble, good_dtype: str) -> nn.Module:
    """The module that is traced into the ONNX graph (a seam the tests perturb)."""
    return EnsembleGraph(ensemble, good_dtype)


def export_onnx(
    ensemble: Ensemble, *, good_dtype: str = "bool", tolerance: float = EXPORT_MATCH
) -> tuple[bytes, ExportCheck]:
    """The ONNX model of ``ensemble`` as bytes, with the check it passed; raises
    :class:`IntegrityError` (nothing returned) when onnxruntime's labels are not within
    ``tolerance`` of each label's training range of the PyTorch reference."""
    onnx, _ = onnx_modules()
    module = ensemble_graph(ensemble, good_dtype).eval()
    n_pixels = ensemble.setup.n_pixels
    example = (
        torch.ones(2, n_pixels),
        torch.ones(2, n_pixels, dtype=torch.bool if good_dtype == "bool" else torch.float32),
    )
    buffer = io.BytesIO()
    batch = {0: "n_spectra"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter: see above
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # shape checks, constant
        torch.onnx.export(
            module,
            example,
            buffer,
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=list(output_names(ensemble)),
            dynamic_axes={
                name: {1: "n_spectra"} if name == "members" else batch
                for name in (*INPUT_NAMES, *output_names(ensemble))
            },
            opset_version=OPSET,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.doc_string = (
        f"speclabel ensemble {ensemble.model_id or '(unsaved)'} of {ensemble.n_members} members on setup "
        f"{ensemble.setup.name!r}: inputs flux and good [N, {n_pixels}], outputs mean and std "
        f"[N, {len(ensemble.label_names)}] ({', '.join(ensemble.label_names)}) and members"
    )
    for key, value in metadata(ensemble, good_dtype).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    graph = model.SerializeToString()
    check = check_graph(ensemble, graph, good_dtype, tolerance=tolerance)
    if not check.passed:
        names = ensemble.label_names
        parts = [
            f"{what} {names[int(err.argmax())]} off by {err.max():.2g}"
            for what, err in (
                ("mean", check.mean),
                ("std", check.std),
                ("member", check.members),
                ("aleatoric", check.aleatoric),
            )
            if err is not None and err.max() > tolerance
        ]
        raise IntegrityError(
            f"check 'ONNX matches PyTorch': onnxruntime's labels are not within {tolerance:g} of each "
            f"label's training range of the PyTorch ensemble ({'; '.join(parts)}, as fractions of the "
            "range); nothing was written"
        )
    return graph, check
