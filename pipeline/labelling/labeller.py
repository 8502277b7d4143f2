"""The actor that holds the ensemble: one per GPU on a cluster, CPU actors locally.

:class:`EnsembleLabeller` loads the model once (``model.io.load_model``: integrity and setup checks)
and turns prepared batches (:func:`.batch.prepare`) into output rows (:func:`.batch.output_table`).
All model work goes through ``Ensemble.predict``, so a faster implementation behind it is picked up
without changes here; a model with reference spectra then refines the labels
(``Refinement.apply``, model/refine.py) unless the run was asked not to.

GPU path: the actor computes on its GPU through ``Ensemble.inference`` (``InferenceOptions(device=
"cuda", precision=...)``); batches wait in page-locked host memory reused between calls, so the
engine's ``non_blocking`` copies to the GPU are asynchronous DMA. Reduced precision is the engine's
own checked choice: ``auto`` takes the fastest of bf16 / tf32 whose labels and saliency stay within
tolerance of float32 on the first spectra it labels (else float32); ``bf16`` or ``tf32`` insist, and
fail the run if the check fails. CPU actors compute in float32. What each actor used is reported in
its batch summaries, and so in the run's manifest.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from speclabel.core.contract import MODEL_ERROR
from speclabel.core.errors import ConfigError, InputError
from speclabel.core.faults import Fault, fault_point
from speclabel.core.setups import Setup
from speclabel.model.calibration import RowErrors, errors_or_std, model_calibration, prediction_errors
from speclabel.model.saliency import SaliencyAccumulator

from .batch import (
    REASON,
    FlagThresholds,
    OutputSpec,
    forward_checks,
    ivar_batch,
    label_rows,
    model_batch,
    nonfinite_label_reasons,
    output_schema,
    output_table,
    quarantine_rows,
    summary_row,
)

log = logging.getLogger(__name__)

# --precision: float32, or reduced precision on GPU actors (the fused engine checks it, see above).
PRECISIONS = ("float32", "auto", "bf16", "tf32")


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
    predict_batch_size: int = 256
    fault: Fault | None = None  # core.faults: read by the driver, carried to the actors
    with_ivar: bool = False  # the model has a forward model: prepared rows carry _ivar for chi^2
    refine: bool = False  # refine the labels with the model's reference spectra (needs with_ivar)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")


class EnsembleLabeller:
    """A Ray Data callable class: ``__call__(prepared batch) -> output rows`` (pyarrow tables)."""

    def __init__(self, settings: LabellerSettings):
        import ray
        import torch

        from speclabel.model.io import load_model

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
        precision = settings.precision if self.device == "cuda" else "float32"
        self.ensemble.inference = self.ensemble.inference.replace(
            device=self.device if self.device == "cuda" else None, precision=precision
        )
        self.precision_check = {"requested": settings.precision}
        if precision != settings.precision:
            self.precision_check["why"] = "reduced precision is used on GPUs only"
        # A refined row's errors are those of the refined labels, calibrated on their own.
        self.refinement = self.ensemble.refinement if settings.refine else None
        self.calibration = (
            model_calibration(self.ensemble.info) if self.refinement is None else self.refinement.calibration
        )
        self.schema = output_schema(settings.spec)
        self._pinned: dict[str, np.ndarray] = {}
        self.batches = 0
        self.batches_predicted = 0
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
        fault_point("label.batch", settings.fault, batches=self.batches)
        self.batches += 1
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
                # Read once: the refinement, the errors' bound and the chi^2 all use it.
                ivar = ivar_batch(batch, rows) if settings.with_ivar else None
                if self.refinement is not None:
                    prediction = self.refinement.apply(prediction, flux, ivar, mask)
                errors = self._errors(ivar, mask, prediction)
                checks = self._forward_checks(ivar, flux, mask, prediction, errors)
                err = None if errors is None else errors.err
                parts += self._label(good, prediction, accumulator, checks, err)
        engine = self.ensemble.fused_engine() if self.batches_predicted else None
        actor = {
            **self.identity,
            "engine": "fused" if engine is not None else "reference",
            "precision": engine.precision if engine is not None else "float32",
            "precision_check": self.precision_check,
        }
        parts.append(summary_row(batch.num_rows, actor, accumulator))
        return output_table(parts, self.schema)

    def _predict(self, flux: np.ndarray, mask: np.ndarray):
        """``Ensemble.predict`` with full maps whenever saliency is on: the summary needs them
        anyway, and the population sums are taken here, over rows with finite labels only."""
        settings = self.settings
        flux, mask = self._host_batch(flux), self._host_batch(mask)
        prediction = self.ensemble.predict(
            flux,
            mask,
            members=settings.spec.members,
            saliency=None if settings.spec.saliency is None else "full",
            batch_size=settings.predict_batch_size,
            ood=True,  # scored where the model has an embedding reference
        )
        self.batches_predicted += 1
        return prediction

    def _host_batch(self, array: np.ndarray) -> np.ndarray:
        """On a GPU, ``array`` copied into page-locked host memory (one buffer per shape, grown as
        needed and reused), so that copies to the device overlap; elsewhere ``array`` itself.
        ``Ensemble.predict`` keeps numpy views as they are, so the pinned pages reach the engine."""
        if self.device != "cuda":
            return array
        import torch

        key = f"{array.dtype}/{array.shape[1:]}"
        buffer = self._pinned.get(key)
        if buffer is None or buffer.shape[0] < array.shape[0]:
            dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
            buffer = torch.empty(array.shape, dtype=dtype, pin_memory=True).numpy()
            self._pinned[key] = buffer
        view = buffer[: array.shape[0]]
        view[...] = array
        return view

    def _forward_checks(self, ivar, flux, mask, prediction, errors: RowErrors | None):
        """(chi^2 per arm and total, anomalous rows) at the ensemble's labels, with their calibrated
        errors (``errors.screening`` where known, else the ensemble std) in the pixel variances;
        (None, None) for a model without a forward model."""
        forward = self.ensemble.forward
        if forward is None:
            return None, None
        label_error = errors_or_std(None if errors is None else errors.screening, prediction.std)
        chi2 = forward_checks(forward, flux, ivar, mask, prediction.mean, label_error)
        return chi2, forward.anomalous(chi2)

    def _errors(self, ivar, mask, prediction) -> RowErrors | None:
        """The calibrated errors of the rows (``model.calibration.RowErrors``: ``<label>_err`` and
        what the anomaly check propagates; NaN where unknown); None for a model without a
        calibration or a run without the columns."""
        if self.calibration is None or not self.settings.spec.error_columns:
            return None
        return prediction_errors(self.calibration, self.ensemble.forward, prediction, ivar, mask)

    def _label(
        self, good: pa.Table, prediction, accumulator, checks=(None, None), err=None
    ) -> list[pa.Table]:
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
            chi2=checks[0],
            anomalous=checks[1],
            err=err,
        )
        if not failed.any():
            return [rows]
        quarantined = quarantine_rows(good.filter(pa.array(failed)), [r for r in reasons if r is not None])
        return [rows.filter(pa.array(~failed)), quarantined]
