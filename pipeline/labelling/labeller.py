"""The actor that holds the ensemble: one per GPU on a cluster, CPU actors locally.

:class:`EnsembleLabeller` loads the model once (``model.io.load_model``: integrity and setup checks)
and turns prepared batches (:func:`.batch.prepare`) into output rows (:func:`.batch.output_table`).
All model work goes through ``Ensemble.predict``, so a faster implementation behind it is picked up
without changes here.

GPU path: the members move to the actor's GPU, batches cross to it from page-locked host memory
(``Ensemble.predict`` pins them), and with ``precision="bf16"`` the actor runs the members under
bf16 autocast *only if* its first batch's labels agree with float32 within
:data:`BF16_TOLERANCE` (:func:`bf16_agrees`); otherwise it stays at float32 and says so in its
batch summaries (and so in the run's manifest).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ...model.saliency import SaliencyAccumulator
from ..contract import MODEL_ERROR
from ..errors import ConfigError, InputError
from ..setups import Setup
from .batch import (
    REASON,
    FlagThresholds,
    OutputSpec,
    label_rows,
    model_batch,
    nonfinite_label_reasons,
    output_schema,
    output_table,
    quarantine_rows,
    summary_row,
)

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bf16")
# How far bf16 labels may stray from float32 ones (physical units) for bf16 to be used: a quarter
# of the internal precision Ambrosch et al. (2023) report, so rounding never shows in the labels.
BF16_TOLERANCE = {"teff": 6.0, "logg": 0.0075, "feh": 0.005, "mgfe": 0.005, "alfe": 0.0075}
CALIBRATION_ROWS = 64


class InjectedFault(RuntimeError):
    """Raised on purpose by the fault-injection hook (``SPECLABEL_FAULT_AFTER_BATCHES``)."""


@dataclass(frozen=True)
class LabellerSettings:
    """Everything an actor needs besides the model; plain data, shipped to every actor."""

    model_location: str
    setup: Setup
    spec: OutputSpec
    thresholds: FlagThresholds
    run_id: str
    model_id: str
    map_ids: frozenset[str] | None = None  # spectra whose full saliency maps are kept
    threads: int = 1
    use_gpu: bool = False
    precision: str = "float32"
    bf16_tolerance: dict[str, float] = field(default_factory=lambda: dict(BF16_TOLERANCE))
    predict_batch_size: int = 256
    fault_after_batches: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")


def bf16_agrees(
    ensemble, flux: np.ndarray, mask: np.ndarray, tolerance: dict[str, float], device_type: str
) -> tuple[bool, dict[str, float]]:
    """Whether the ensemble's labels under bf16 autocast on ``device_type`` stay within
    ``tolerance`` (per label, physical units) of float32 on these spectra; and the largest
    differences. Labels without a tolerance must agree exactly, so they never pass by omission."""
    import torch

    reference = ensemble.predict(flux, mask).mean
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        reduced = ensemble.predict(flux, mask).mean
    worst = np.abs(reduced - reference).max(axis=0) if len(flux) else np.zeros(len(ensemble.label_names))
    differences = {name: float(worst[k]) for k, name in enumerate(ensemble.label_names)}
    ok = all(np.isfinite(d) and d <= tolerance.get(name, 0.0) for name, d in differences.items())
    return ok, differences


class EnsembleLabeller:
    """A Ray Data callable class: ``__call__(prepared batch) -> output rows`` (pyarrow tables)."""

    def __init__(self, settings: LabellerSettings):
        import ray
        import torch

        from ...model.io import load_model

        self.settings = settings
        torch.set_num_threads(settings.threads)
        gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        # A GPU actor on a machine whose torch has no CUDA (a test cluster with declared GPUs, a
        # CPU build) computes on the CPU rather than failing; the device is reported per batch.
        self.device = "cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu"
        self.ensemble = load_model(settings.model_location, setup=settings.setup)
        if self.ensemble.model_id != settings.model_id:
            raise ConfigError(
                f"model at {settings.model_location} changed during the run: its model_id is "
                f"{self.ensemble.model_id}, the run started with {settings.model_id}"
            )
        self.ensemble.to(self.device)
        self.schema = output_schema(settings.spec)
        self.precision: str | None = None if settings.precision == "bf16" else "float32"
        self.precision_check: dict | None = None
        self.batches = 0
        self.identity = {
            "actor": uuid.uuid4().hex[:12],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "gpu_ids": gpu_ids,
            "device": self.device,
            "threads": settings.threads,
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        settings = self.settings
        self.batches += 1
        if settings.fault_after_batches is not None and self.batches > settings.fault_after_batches:
            raise InjectedFault(
                f"fault injected after {settings.fault_after_batches} batches (SPECLABEL_FAULT_AFTER_BATCHES)"
            )
        rows, flux, mask = model_batch(batch)
        parts = [quarantine_rows(batch.filter(batch.column(REASON).is_valid()))]
        accumulator = None
        if settings.spec.saliency is not None:
            accumulator = SaliencyAccumulator.empty(len(self.ensemble.label_names), settings.setup.n_pixels)
        if len(rows):
            good = batch.take(pa.array(rows))
            try:
                prediction = self._predict(flux, mask)
            except InputError as exc:  # the data, not the job: these rows go to quarantine
                parts.append(quarantine_rows(good, [f"{MODEL_ERROR}: {exc}"] * good.num_rows))
            else:
                parts += self._label(good, prediction, accumulator)
        actor = {
            **self.identity,
            "precision": self.precision or "float32",
            "precision_check": self.precision_check,
        }
        parts.append(summary_row(batch.num_rows, actor, accumulator))
        return output_table(parts, self.schema)

    def _predict(self, flux: np.ndarray, mask: np.ndarray):
        """``Ensemble.predict`` with full maps whenever saliency is on: the summary needs them
        anyway, and the population sums are taken here, over rows with finite labels only."""
        import torch

        settings = self.settings
        if self.precision is None:
            self._choose_precision(flux[:CALIBRATION_ROWS], mask[:CALIBRATION_ROWS])
        autocast = (
            torch.autocast(device_type=self.device, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            return self.ensemble.predict(
                flux,
                mask,
                members=settings.spec.members,
                saliency=None if settings.spec.saliency is None else "full",
                batch_size=settings.predict_batch_size,
            )

    def _choose_precision(self, flux: np.ndarray, mask: np.ndarray) -> None:
        if self.device != "cuda":
            self.precision = "float32"
            self.precision_check = {
                "requested": "bf16",
                "used": "float32",
                "why": "bf16 is used on GPUs only",
            }
            return
        ok, differences = bf16_agrees(
            self.ensemble, flux, mask, self.settings.bf16_tolerance, device_type=self.device
        )
        self.precision = "bf16" if ok else "float32"
        self.precision_check = {
            "requested": "bf16",
            "used": self.precision,
            "max_abs_difference": differences,
            "tolerance": self.settings.bf16_tolerance,
        }
        if not ok:
            log.warning("bf16 labels differ from float32 by %s: this actor uses float32", differences)

    def _label(self, good: pa.Table, prediction, accumulator) -> list[pa.Table]:
        settings = self.settings
        reasons = nonfinite_label_reasons(prediction, self.ensemble.label_names)
        failed = np.array([r is not None for r in reasons])
        if accumulator is not None:
            accumulator.add(prediction.saliency_maps[~failed])
        map_rows = None
        if settings.spec.saliency == "full":
            ids = good.column("spectrum_id").to_pylist()
            map_rows = np.array([settings.map_ids is None or i in settings.map_ids for i in ids], dtype=bool)
        rows = label_rows(
            good,
            prediction,
            settings.spec,
            settings.thresholds,
            model_id=settings.model_id,
            run_id=settings.run_id,
            processed_at=dt.datetime.now(dt.UTC),
            map_rows=map_rows,
        )
        if not failed.any():
            return [rows]
        quarantined = quarantine_rows(good.filter(pa.array(failed)), [r for r in reasons if r is not None])
        return [rows.filter(pa.array(~failed)), quarantined]
