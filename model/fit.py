"""An ensemble fitted in one process: member after member, then selection, test metrics, provenance.

This is the notebook and benchmark path and the reference for the parallel Ray job, which runs
the same steps with members in parallel: ``core.arrays.prepare_arrays`` (a table to arrays, outside
``model/``) -> :func:`fit_scaler` ->
:func:`member_data` + ``training.train_member`` per member seed -> :func:`assemble_ensemble`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# The arrays come from a table through core (model/ never reads Arrow); the name stays importable
# from here, where README has always shown it.
from speclabel.core.arrays import prepare_arrays as prepare_arrays
from speclabel.core.errors import ConfigError, InputError
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import Setup

from .arch import ArchConfig
from .ensemble import Ensemble, select_members
from .metrics import metrics_by_snr
from .scaling import LabelScaler
from .splits import SplitRule
from .training import (
    ArrayData,
    EpochMetrics,
    MemberResult,
    TrainConfig,
    TrainingState,
    density_weights,
    input_reference,
    train_member,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsembleConfig:
    """How many members, which seeds, which to keep, and how labels are scaled and rows split.

    ``n_candidates`` > ``n_members`` trains more and keeps the ``n_members`` best by validation
    loss; ``keep_percentile`` (e.g. 80, as Guiglion et al. 2020) keeps only members at or below that
    percentile of the candidates' validation losses.
    """

    n_members: int = 8
    n_candidates: int | None = None
    keep_percentile: float | None = None
    base_seed: int = 0
    scaling: str = "standard"
    split: SplitRule = field(default_factory=SplitRule)

    def __post_init__(self) -> None:
        if isinstance(self.split, Mapping):
            object.__setattr__(self, "split", SplitRule.from_dict(self.split))
        if self.n_members < 1:
            raise ConfigError(f"n_members must be >= 1, got {self.n_members}")
        if self.n_candidates is not None and self.n_candidates < self.n_members:
            raise ConfigError(f"n_candidates ({self.n_candidates}) must be >= n_members ({self.n_members})")

    @property
    def seeds(self) -> list[int]:
        return [self.base_seed + i for i in range(self.n_candidates or self.n_members)]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "split": self.split.to_dict()}


def fit_scaler(
    arrays: Mapping[str, np.ndarray], split: SplitRule, method: str, names: Sequence[str] = LABEL_NAMES
) -> LabelScaler:
    """The label scaling of the whole ensemble, from every row outside the common test split
    (each label from the rows that have it)."""
    rows = ~split.is_test(arrays["spectrum_id"])
    if rows.sum() < 2:
        raise InputError(f"only {int(rows.sum())} training rows outside the test split")
    return LabelScaler.fit(arrays["labels"][rows], method, tuple(names))


def sample_weights(
    arrays: Mapping[str, np.ndarray],
    rows: np.ndarray,
    config: TrainConfig,
    names: Sequence[str] = LABEL_NAMES,
) -> np.ndarray | None:
    """Every row's ``sample_weight`` (``training.density_weights``) measured over the labels of
    ``rows`` (a boolean mask: the training pool), 1 outside them; None when ``config`` does not
    weight by density. Computed once, before the members start: every member weighs a row alike."""
    if config.density_weighting == 0:
        return None
    out = np.ones(len(arrays["labels"]))
    out[rows] = density_weights(arrays["labels"][rows], names, config)
    return out


def member_data(arrays: Mapping[str, np.ndarray], split: SplitRule, seed: int) -> tuple[ArrayData, ArrayData]:
    train_rows, val_rows = split.member_masks(arrays["spectrum_id"], seed)
    if not train_rows.any() or not val_rows.any():
        raise InputError(
            f"member seed {seed} has {int(train_rows.sum())} training and {int(val_rows.sum())} "
            "validation rows: it needs both"
        )
    return ArrayData.from_arrays(arrays, train_rows), ArrayData.from_arrays(arrays, val_rows)


def assemble_ensemble(
    setup: Setup,
    arch: ArchConfig,
    scaler: LabelScaler,
    candidates: list[MemberResult],
    *,
    ensemble_config: EnsembleConfig,
    train_config: TrainConfig,
    test: Mapping[str, np.ndarray] | None,
    data: Mapping,
) -> Ensemble:
    """Select the members, measure the ensemble on the common test split, record provenance.

    ``test``: arrays of the test rows (flux, mask, labels, optional snr) or None; ``data``: where
    the training data came from (location, fingerprint, n_rows, ...), stored in model.json.
    """
    kept = select_members(
        [c.best_val_loss for c in candidates],
        keep=ensemble_config.n_members,
        percentile=ensemble_config.keep_percentile,
    )
    members = [candidates[i] for i in kept]
    member_info = [
        {
            "seed": m.seed,
            "split": {"rule": "member_masks(spectrum_id, seed)", "n_train": m.n_train, "n_val": m.n_val},
            "best_val_loss": m.best_val_loss,
            "best_epoch": m.best_epoch,
            "epochs_run": m.epochs_run,
            "stopped_early": m.stopped_early,
            "validation": m.val_metrics,
        }
        for m in members
    ]
    ensemble = Ensemble(setup, arch, scaler, [m.network for m in members], member_info=member_info)
    metrics = {
        "validation": {
            "note": "each member on its own validation split; val loss is MSE of scaled labels",
            "mean_best_val_loss": float(np.mean([m.best_val_loss for m in members])),
        },
    }
    if test is not None:
        test_result = test_metrics(ensemble, [test])
        if test_result is not None:
            metrics["test"] = test_result
    ensemble.info = {
        "training": {
            "data": dict(data),
            "split": ensemble_config.split.to_dict(),
            "ensemble": ensemble_config.to_dict(),
            "config": train_config.to_dict(),
            "candidates": [
                {"seed": c.seed, "best_val_loss": c.best_val_loss, "kept": i in kept}
                for i, c in enumerate(candidates)
            ],
        },
        "metrics": metrics,
    }
    return ensemble


def test_metrics(
    ensemble: Ensemble, batches: Iterable[Mapping[str, np.ndarray]], *, refinement=None
) -> dict | None:
    """The ensemble on the common test split (``metrics.metrics_by_snr``), over batches of its rows.

    The one computation of ``metrics.test`` in model.json, for this in-process fit and the Ray job
    alike. ``batches``: dicts with ``flux``, ``mask``, ``labels`` and optionally ``snr`` (one batch of
    all test rows, or the job's streamed batches); None when there are no test rows. A one-member
    ensemble has no spread (its std is NaN), so its metrics have no calibration keys (``std_ratio``, ...)
    rather than NaN in model.json. With a ``refinement`` (``model.refine.Refinement``; the batches
    then need ``ivar``) they are the refined labels' metrics (model.json ``metrics.test_refined``).
    """
    mean, std, labels, snr = [], [], [], []
    for batch in batches:
        if not len(batch["labels"]):
            continue
        prediction = ensemble.predict(batch["flux"], batch["mask"])
        if refinement is not None:
            prediction = refinement.apply(prediction, batch["flux"], batch["ivar"], batch["mask"])
        mean.append(prediction.mean)
        std.append(prediction.std)
        labels.append(np.asarray(batch["labels"], dtype=np.float64))
        snr.append(np.asarray(batch["snr"], dtype=np.float64) if batch.get("snr") is not None else None)
    if not labels:
        return None
    snr_all = None if any(s is None for s in snr) else np.concatenate(snr)
    spread = np.concatenate(std) if ensemble.n_members > 1 else None
    return metrics_by_snr(
        np.concatenate(mean), np.concatenate(labels), ensemble.label_names, snr_all, std=spread
    )


def fit_ensemble(
    arrays: Mapping[str, np.ndarray],
    setup: Setup,
    arch: ArchConfig,
    train_config: TrainConfig,
    ensemble_config: EnsembleConfig,
    *,
    data: Mapping,
    on_epoch: Callable[[int, EpochMetrics, TrainingState], None] | None = None,
) -> Ensemble:
    """Train every candidate member in turn (``on_epoch(seed, metrics, state)`` after each epoch)."""
    split = ensemble_config.split
    names = arrays.get("label_names", LABEL_NAMES)
    scaler = fit_scaler(arrays, split, ensemble_config.scaling, names)
    weights = sample_weights(arrays, ~split.is_test(arrays["spectrum_id"]), train_config, names)
    if weights is not None:
        arrays = {**arrays, "sample_weight": weights}
    reference = (
        input_reference(*member_data(arrays, split, ensemble_config.seeds[0])) if arch.center_input else None
    )
    candidates = []
    for seed in ensemble_config.seeds:
        train, val = member_data(arrays, split, seed)
        callback = None if on_epoch is None else (lambda m, s, seed=seed: on_epoch(seed, m, s))
        result = train_member(
            arch,
            setup,
            scaler,
            train_config.replace(seed=seed),
            train,
            val,
            on_epoch=callback,
            reference=reference,
        )
        log.info(
            "member seed %d: best val loss %.4g at epoch %d of %d",
            seed,
            result.best_val_loss,
            result.best_epoch,
            result.epochs_run,
        )
        candidates.append(result)
    test_rows = split.is_test(arrays["spectrum_id"])
    test = {k: arrays[k][test_rows] for k in ("flux", "mask", "labels", "snr") if arrays.get(k) is not None}
    return assemble_ensemble(
        setup,
        arch,
        scaler,
        candidates,
        ensemble_config=ensemble_config,
        train_config=train_config,
        test=test,
        data={"n_rows": len(arrays["labels"]), "fingerprint": arrays.get("fingerprint"), **data},
    )
