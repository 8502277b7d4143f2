"""Training one ensemble member: MSE with Adam, early stopping with best-weight restore, augmentation.

Data come through a small interface, :class:`TrainingData`: ``batches(epoch, batch_size,
shuffle_seed)`` yields dicts of arrays (numpy or torch) with the keys

* ``flux`` [B, P] float (masked pixels = 1.0, as ``core.arrays.model_inputs`` gives them),
* ``mask`` [B, P] bool (True = good pixel), ``labels`` [B, L] physical units, NaN where a row
  lacks a label (the loss then ignores that entry: :func:`masked_mean`),
* optional ``label_err`` [B, L] (for inverse-variance weighting), ``ivar`` [B, P] (to add noise down
  to a lower S/N), ``flux_clean`` [B, P] (a noise-free twin: fresh noise at a drawn S/N) and
  ``sample_weight`` [B] (a factor on the row's loss weights, e.g. :func:`density_weights`).

:class:`ArrayData` holds numpy arrays in memory; :class:`BatchStream` wraps any factory
``epoch -> iterable of batches``, e.g. a Ray Data shard's ``iter_torch_batches``.

Determinism and exact resume: every random draw of an epoch (dropout, augmentation, shuffling) comes
from generators seeded by ``(seed, epoch)``, never from where the previous epoch left a global
generator. The state passed to the per-epoch callback (model, optimiser, scheduler, best weights,
counters, history) therefore resumes to the same weights, bit for bit, as an uninterrupted run.
:meth:`TrainingState.save` writes it as safetensors + JSON, never as a pickle.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.spatial import cKDTree
from torch import nn

from speclabel.core.config import dataclass_from_dict
from speclabel.core.errors import ConfigError, InputError
from speclabel.core.setups import SPEED_OF_LIGHT_KMS, Setup

from .arch import LOG_VARIANCE_RANGE, ArchConfig, build_network
from .metrics import label_metrics
from .scaling import LabelScaler

STATE_FORMAT = "speclabel-train-state"
STATE_VERSION = 1
LOSS_WEIGHTINGS = ("none", "inverse_variance")
LR_SCHEDULES = ("constant", "cosine", "plateau")
BATCH_KEYS = ("flux", "mask", "labels", "label_err", "ivar", "flux_clean", "sample_weight")
# The labels whose joint density density_weights measures (standardised), in this order.
DENSITY_LABELS = ("teff", "logg", "feh")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation: survey spectra come at many S/N and small velocity residuals.

    ``noise``: each training spectrum is shown at an S/N drawn log-uniformly from ``snr_range``:
    a noise-free twin (``flux_clean``) gets fresh noise, with the per-pixel pattern of its observed
    twin's ivar rescaled to the drawn S/N (sigma = 1/S/N everywhere without ivar); an observed
    spectrum (with ``ivar``) gets extra noise only when the drawn S/N is below its own. A spectrum's
    S/N is the median of sqrt(ivar) over its good pixels.
    ``rv_shift_kms``: each spectrum is shifted by a velocity drawn uniformly in +-rv_shift_kms.
    ``continuum_tilt``: each arm of each spectrum is multiplied by 1 + t x, x the arm's wavelength
    mapped to [-1, 1] and t drawn uniformly in +-continuum_tilt (a fractional tilt, e.g. 0.01), as a
    reduction's continuum normalisation leaves; masked pixels stay as they are.
    """

    noise: bool = False
    snr_range: tuple[float, float] = (10.0, 150.0)
    rv_shift_kms: float = 0.0
    continuum_tilt: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "snr_range", tuple(float(s) for s in self.snr_range))
        lo, hi = self.snr_range
        if not 0 < lo <= hi:
            raise ConfigError(f"augmentation snr_range must satisfy 0 < lo <= hi, got {self.snr_range}")
        if self.rv_shift_kms < 0:
            raise ConfigError(f"rv_shift_kms must be >= 0, got {self.rv_shift_kms}")
        if not 0 <= self.continuum_tilt < 1:
            raise ConfigError(f"continuum_tilt must be in [0, 1), got {self.continuum_tilt}")

    @property
    def active(self) -> bool:
        return self.noise or self.rv_shift_kms > 0 or self.continuum_tilt > 0


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: what measured best on the shared GIRAFFE file within the 60-minute budget of 8 members
    on 2 cores (BENCHMARKS.md): batches of 16, Adam at 1e-3 annealed (cosine) over 120 epochs, every
    training spectrum shown at a fresh S/N between 10 and 150, shifted by up to +-3 km/s and each arm
    tilted by up to +-1 % (cross-validated, issue 20: the labels no longer move with the velocity and
    continuum residuals real reductions leave, at no cost in accuracy). The augmentation default is
    set here, not in AugmentConfig, so that a model.json written before a field existed still
    reads as trained without it."""

    epochs: int = 120
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 40  # epochs without a better validation loss before stopping
    min_delta: float = 0.0  # improvement smaller than this does not count
    lr_schedule: str = "cosine"  # "cosine": anneal to lr * lr_floor over `epochs`; "plateau": see below
    lr_floor: float = 0.01
    plateau_patience: int = 10  # "plateau": multiply the learning rate by plateau_factor after this many
    plateau_factor: float = 0.5  # epochs without a better validation loss
    loss_weighting: str = "none"  # or "inverse_variance" (needs label_err)
    error_floor: float = 0.02  # smallest label error in scaled units, so no row gets unbounded weight
    # > 0: each training row weighs density^-density_weighting, its local density in label space from
    # its density_neighbours nearest rows, at most density_cap times the mean (density_weights).
    density_weighting: float = 0.0
    density_neighbours: int = 10
    density_cap: float = 5.0
    # > 0: each label's loss weighs (its validation MSE of the epoch before)^-label_balance, normalised
    # to mean 1 over the labels (label_balance_weights): the label with the largest scaled error
    # ([Al/Fe], mostly noise where its lines vanish) no longer sets the shared layers' gradient alone.
    label_balance: float = 0.0
    seed: int = 0
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(
            noise=True, snr_range=(10.0, 150.0), rv_shift_kms=3.0, continuum_tilt=0.01
        )
    )

    def __post_init__(self) -> None:
        if isinstance(self.augment, Mapping):
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))
        problems = []
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            problems.append("epochs, batch_size and patience must be >= 1")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            problems.append(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if not self.error_floor > 0:
            problems.append("error_floor must be > 0")
        if self.density_weighting < 0 or self.density_neighbours < 1 or not self.density_cap >= 1:
            problems.append("density_weighting must be >= 0, density_neighbours >= 1 and density_cap >= 1")
        if not 0 <= self.label_balance <= 2:
            problems.append(f"label_balance must be in [0, 2], got {self.label_balance}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.plateau_patience < 1 or not 0 < self.plateau_factor < 1 or not 0 < self.lr_floor <= 1:
            problems.append("plateau_patience must be >= 1, plateau_factor in (0, 1) and lr_floor in (0, 1]")
        if problems:
            raise ConfigError("training configuration: " + "; ".join(problems))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["augment"]["snr_range"] = list(self.augment.snr_range)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainConfig:
        return dataclass_from_dict(cls, data, what="training")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# -- data ------------------------------------------------------------------------------------------


class TrainingData(Protocol):
    def batches(self, epoch: int, batch_size: int, shuffle_seed: int | None) -> Iterable[Mapping]: ...


@dataclass
class ArrayData:
    """Training or validation rows held in memory as numpy arrays (see the module docstring)."""

    flux: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    label_err: np.ndarray | None = None
    ivar: np.ndarray | None = None
    flux_clean: np.ndarray | None = None
    sample_weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.flux.shape[0]
        for name in BATCH_KEYS[1:]:
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise InputError(f"training array {name} has {value.shape[0]} rows, flux has {n}")

    def __len__(self) -> int:
        return self.flux.shape[0]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], rows: np.ndarray | None = None) -> ArrayData:
        """The rows (a boolean mask or indices) of a :func:`training_arrays` dict."""
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])
        return cls(**{k: pick(arrays[k]) if arrays.get(k) is not None else None for k in BATCH_KEYS})

    def batches(
        self, epoch: int, batch_size: int, shuffle_seed: int | None
    ) -> Iterator[dict[str, np.ndarray]]:
        order = (
            np.random.default_rng(shuffle_seed).permutation(len(self))
            if shuffle_seed is not None
            else np.arange(len(self))
        )
        for start in range(0, len(self), batch_size):
            rows = np.sort(order[start : start + batch_size])  # sorted: contiguous reads, same batch
            yield {name: value[rows] for name in BATCH_KEYS if (value := getattr(self, name)) is not None}


@dataclass
class BatchStream:
    """Batches from a factory ``epoch -> iterable of batches`` (e.g. Ray Data ``iter_torch_batches``).

    The factory owns batching and shuffling; for exact resume it must give the same batches for the
    same epoch, as Ray Data does with a seeded ``random_shuffle`` or ``local_shuffle_seed``.
    """

    factory: Callable[[int], Iterable[Mapping]]

    def batches(self, epoch: int, batch_size: int, shuffle_seed: int | None) -> Iterable[Mapping]:
        return self.factory(epoch)


@dataclass
class Shard:
    """Worker ``rank`` of ``world_size``'s part of every batch of ``data``: rows rank, rank + W, ...

    Every worker draws the same batches (the same shuffle seed) and keeps its rows of each, so the
    workers of one step together hold exactly the batch one worker would train on: with
    :class:`DataParallel` the averaged gradient is that batch's gradient.
    """

    data: TrainingData
    rank: int
    world_size: int

    def batches(self, epoch: int, batch_size: int, shuffle_seed: int | None) -> Iterator[Mapping]:
        for batch in self.data.batches(epoch, batch_size, shuffle_seed):
            yield {key: value[self.rank :: self.world_size] for key, value in batch.items()}


@dataclass(frozen=True)
class DataParallel:
    """This process is worker ``rank`` of ``world_size`` that train one member data-parallel.

    ``torch.distributed`` is initialised by the caller (the job's Ray Train workers); ``wrap`` turns
    the network into its gradient-averaging form (``ray.train.torch.prepare_model``: DDP). Each
    worker's training data are its own rows (a :class:`Shard` or a Ray Data shard). The validation
    data are every validation row on every worker: all workers compute the same validation loss and
    so take the same early-stopping and schedule decisions, which they must (a worker that stopped
    alone would leave the others waiting in the next all-reduce).
    """

    rank: int
    world_size: int
    wrap: Callable[[nn.Module], nn.Module]
    device: str = "cpu"  # where the process group's collectives run (NCCL: the GPU)

    def all_sum(self, values: Iterable[float]) -> list[float]:
        totals = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(totals)
        return totals.tolist()

    def step_loss(self, sq: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This worker's share of the step's loss, and the step's rows over all workers.

        DDP averages gradients over the workers, so each worker's loss is W x its part of the
        whole step's (weighted, masked) mean: the average is then the gradient of
        :func:`masked_mean` over every row of the step, however the rows were split (unequal parts
        included).
        """
        (part,), rows = self.step_losses((sq, weights))
        return part, rows

    def step_losses(
        self, *terms: tuple[torch.Tensor, torch.Tensor], label_weights: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], float]:
        """:meth:`step_loss` of several ``(values, weights)`` terms of one step (the labels' loss
        and a variance head's), their totals summed over the workers in one all-reduce;
        ``label_weights`` (:func:`label_balance_weights`) weigh the first term's labels."""
        totals = self.all_sum(
            [float(terms[0][0].shape[0]), *(t for _, weights in terms for t in weights.sum(0).tolist())]
        )
        parts, start = [], 1
        for values, weights in terms:
            end = start + weights.shape[1]
            denominator = torch.as_tensor(totals[start:end], dtype=values.dtype, device=values.device)
            weighting = label_weights if not parts else None
            parts.append(masked_mean(values, weights, denominator, weighting) * self.world_size)
            start = end
        return parts, totals[0]


# -- augmentation ----------------------------------------------------------------------------------


def rv_shift(flux: torch.Tensor, mask: torch.Tensor, setup: Setup, velocity_kms: torch.Tensor):
    """Spectra seen at radial velocity ``velocity_kms`` [B]: f'(lambda) = f(lambda / (1 + v/c)).

    Linear interpolation on each arm's grid; pixels beyond an arm's end take its edge value, and a
    pixel interpolated from a masked one is masked.
    """
    beta = (velocity_kms.to(torch.float64) / SPEED_OF_LIGHT_KMS)[:, None]
    out_flux, out_mask = torch.empty_like(flux), torch.empty_like(mask)
    for arm, part in zip(setup.arms, setup.arm_slices.values(), strict=True):
        wave = torch.as_tensor(arm.wave, dtype=torch.float64)[None, :]
        index = ((wave / (1.0 + beta) - arm.wave_start) / arm.wave_step).clamp(0, arm.n_pixels - 1)
        lo = index.floor().long().clamp(max=arm.n_pixels - 2)
        weight = (index - lo).to(flux.dtype)
        f, m = flux[:, part], mask[:, part]
        out_flux[:, part] = f.gather(1, lo) * (1 - weight) + f.gather(1, lo + 1) * weight
        out_mask[:, part] = m.gather(1, lo) & m.gather(1, lo + 1)
    return out_flux, out_mask


def continuum_tilt(flux: torch.Tensor, mask: torch.Tensor, setup: Setup, tilt: torch.Tensor) -> torch.Tensor:
    """Spectra with arm ``a`` multiplied by 1 + tilt[:, a] x, x the arm's wavelength mapped to [-1, 1]
    (``tilt`` [B, n_arms], fractional); masked pixels keep their flux."""
    out = flux.clone()
    for a, (arm, part) in enumerate(zip(setup.arms, setup.arm_slices.values(), strict=True)):
        x = torch.as_tensor(arm.wave_unit)[None, :]
        factor = (1.0 + tilt[:, a : a + 1].to(torch.float64) * x).to(flux.dtype)
        out[:, part] = torch.where(mask[:, part], flux[:, part] * factor, flux[:, part])
    return out


def augment(
    batch: Mapping[str, torch.Tensor], config: AugmentConfig, setup: Setup, generator: torch.Generator
):
    """(flux, mask) of a training batch after augmentation; masked pixels end at 1.0."""
    mask = batch["mask"]
    clean = batch.get("flux_clean")
    flux = clean if (config.noise and clean is not None) else batch["flux"]
    n = flux.shape[0]
    if config.rv_shift_kms > 0:
        velocity = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * config.rv_shift_kms
        flux, mask = rv_shift(flux, mask, setup, velocity)
    if config.continuum_tilt > 0:
        tilt = torch.rand((n, len(setup.arms)), generator=generator, dtype=torch.float64) * 2 - 1
        flux = continuum_tilt(flux, mask, setup, tilt * config.continuum_tilt)
    if config.noise:
        lo, hi = config.snr_range
        snr = torch.exp(
            math.log(lo)
            + torch.rand(n, generator=generator, dtype=torch.float64) * (math.log(hi) - math.log(lo))
        ).to(flux.dtype)[:, None]
        noise = torch.randn(flux.shape, generator=generator, dtype=flux.dtype)
        ivar = batch.get("ivar")
        if ivar is not None:
            ivar = ivar.to(flux.dtype)
            good = mask & (ivar > 0)
            # The spectrum's own S/N: the median of 1/sigma over its good pixels. Noise keeps the
            # spectrum's own pattern (arm to arm, pixel to pixel), rescaled to the drawn S/N.
            own = torch.where(good, ivar.sqrt(), torch.nan).nanmedian(dim=1).values[:, None]
            inv_sigma = ivar.clamp(min=1e-30).sqrt()
        if clean is not None:
            sigma = 1.0 / snr if ivar is None else torch.where(good, own / snr / inv_sigma, 0.0)
            flux = flux + noise * sigma
        elif ivar is not None:
            # Only extra noise: sigma_new = sigma * own / drawn, when the drawn S/N is the lower one.
            factor = ((own / snr) ** 2 - 1).clamp(min=0).nan_to_num(0.0).sqrt()
            flux = flux + noise * torch.where(good, factor / inv_sigma, 0.0)
        else:
            raise InputError("noise augmentation needs ivar or noise-free twins (flux_clean) in the batches")
    return torch.where(mask, flux, torch.ones_like(flux)), mask


# -- the loop --------------------------------------------------------------------------------------


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one purpose of one epoch, independent of every other (seed, keys)."""
    return int(np.random.SeedSequence([int(seed), *keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# keys of derived_seed
_INIT, _DROPOUT, _AUGMENT, _SHUFFLE = 0, 1, 2, 3


@dataclass
class EpochMetrics:
    epoch: int  # 1-based count of completed epochs
    train_loss: float
    val_loss: float
    best_val_loss: float
    best_epoch: int
    seconds: float
    learning_rate: float
    n_train: int
    val_rmse: dict[str, float]  # physical units

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainingState:
    """Everything needed to continue training exactly where an epoch ended."""

    epoch: int
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict | None
    best_val_loss: float
    best_epoch: int
    epochs_since_best: int
    stopped: bool
    history: list[dict]
    config: dict
    arch: dict

    def save(self, folder: str | Path) -> None:
        """``state.safetensors`` (all tensors) + ``state.json`` (the rest) in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.model.items()}
        tensors |= {f"best.{k}": v for k, v in self.best_model.items()}
        optim_meta = {}
        for index, slots in self.optimizer["state"].items():
            optim_meta[str(index)] = sorted(slots)
            tensors |= {f"optim.{index}.{name}": torch.as_tensor(v) for name, v in slots.items()}
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(folder / "state.safetensors"))
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            **{k: getattr(self, k) for k in ("epoch", "scheduler", "best_val_loss", "best_epoch")},
            **{k: getattr(self, k) for k in ("epochs_since_best", "stopped", "history", "config", "arch")},
            "optimizer_param_groups": self.optimizer["param_groups"],
            "optimizer_slots": optim_meta,
        }
        (folder / "state.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, folder: str | Path) -> TrainingState:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "state.json").read_text())
            tensors = load_file(str(folder / "state.safetensors"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read a training state from {folder}: {exc}") from exc
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise InputError(f"{folder} does not hold a {STATE_FORMAT} version {STATE_VERSION}")

        def section(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        optim_state = {
            int(index): {name: tensors[f"optim.{index}.{name}"] for name in names}
            for index, names in meta["optimizer_slots"].items()
        }
        return cls(
            epoch=meta["epoch"],
            model=section("model."),
            best_model=section("best."),
            optimizer={"state": optim_state, "param_groups": meta["optimizer_param_groups"]},
            scheduler=meta["scheduler"],
            best_val_loss=meta["best_val_loss"],
            best_epoch=meta["best_epoch"],
            epochs_since_best=meta["epochs_since_best"],
            stopped=meta["stopped"],
            history=meta["history"],
            config=meta["config"],
            arch=meta["arch"],
        )


@dataclass
class MemberResult:
    network: nn.Module  # with the best weights
    seed: int
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict]
    n_train: int
    n_val: int
    val_metrics: dict[str, dict[str, float]]  # per label: bias, scatter, ... (metrics.label_metrics)


def _cpu_copy(state):
    """A detached CPU copy of a (nested) state dict: later steps update the live tensors in place."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_copy(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_cpu_copy(v) for v in state)
    return copy.deepcopy(state)


def _tensors(batch: Mapping) -> dict[str, torch.Tensor]:
    out = {}
    for key in BATCH_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        if key == "mask":
            tensor = tensor.bool()
        elif key in ("labels", "label_err"):
            tensor = tensor.to(torch.float64)
        else:
            tensor = tensor.to(torch.float32)
        out[key] = tensor
    return out


def _scaled(labels: torch.Tensor, scaler: LabelScaler) -> torch.Tensor:
    offset = torch.as_tensor(scaler.offset)
    scale = torch.as_tensor(scaler.scale)
    return ((labels - offset) / scale).to(torch.float32)


def loss_targets(
    batch: dict[str, torch.Tensor], scaler: LabelScaler, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled targets and per-entry loss weights ``[B, L]`` of a batch.

    A missing label (NaN) gets weight 0 and a finite placeholder target, so that it adds nothing to
    the loss nor, through a NaN times zero, to the gradient. Present labels weigh 1, or
    1 / (scaled error)^2 with ``inverse_variance`` weighting (a missing error counts as the floor:
    such a row weighs as much as the best-measured ones).
    """
    labels = batch["labels"]
    present = torch.isfinite(labels)
    target = _scaled(torch.where(present, labels, torch.as_tensor(scaler.offset, dtype=labels.dtype)), scaler)
    weights = present.to(torch.float32) * _sample_weight(batch, config)
    if config.loss_weighting == "none":
        return target, weights
    err = batch.get("label_err")
    if err is None:
        raise InputError(
            "loss_weighting='inverse_variance' needs label_err (<label>_err columns) in the batches"
        )
    scaled_err = (err / torch.as_tensor(scaler.scale)).to(torch.float32)
    scaled_err = torch.nan_to_num(scaled_err, nan=config.error_floor).clamp(min=config.error_floor)
    return target, weights / scaled_err**2


def _sample_weight(batch: Mapping[str, torch.Tensor], config: TrainConfig) -> torch.Tensor | float:
    """The batch's per-row factor on the loss weights, ``[B, 1]`` (1.0 without a ``sample_weight``)."""
    weight = batch.get("sample_weight")
    if weight is None:
        if config.density_weighting > 0:
            raise InputError(
                "density_weighting > 0 needs a sample_weight per training row (model.fit.sample_weights)"
            )
        return 1.0
    return weight.to(torch.float32)[:, None]


def density_weights(labels: np.ndarray, names: Sequence[str], config: TrainConfig) -> np.ndarray:
    """Per row of ``labels`` [N, L] (columns ``names``): the inverse of its local density in label
    space to the power ``config.density_weighting``, normalised to mean 1 and capped.

    The density is that of the rows in (Teff, log g, [Fe/H]) (:data:`DENSITY_LABELS`), each label
    standardised over these rows: with ``d`` the distance to a row's ``density_neighbours``-th
    nearest other row, density ~ d^-3, so the raw weight is d^(3 beta). The weights are
    min(c raw, ``density_cap``), c such that their mean is 1: a lone star weighs at most
    ``density_cap`` times the average row. A row lacking one of the labels weighs 1 and is nobody's
    neighbour.
    """
    missing = [n for n in DENSITY_LABELS if n not in names]
    if missing:
        raise ConfigError(f"density_weighting needs the labels {missing}, which the model does not have")
    points = labels[:, [list(names).index(n) for n in DENSITY_LABELS]]
    complete = np.isfinite(points).all(axis=1)
    out = np.ones(len(labels))
    n = int(complete.sum())
    if n < 2 or config.density_weighting == 0:
        return out
    points = points[complete]
    points = (points - points.mean(0)) / np.where(points.std(0) > 0, points.std(0), 1.0)
    k = min(config.density_neighbours, n - 1)
    distance = cKDTree(points).query(points, k=k + 1)[0][:, k]  # [:, 0] is the row itself
    raw = np.maximum(distance, 1e-6) ** (points.shape[1] * config.density_weighting)
    out[complete] = _capped_mean_one(raw, config.density_cap)
    return out


def _capped_mean_one(raw: np.ndarray, cap: float) -> np.ndarray:
    """min(c raw, cap) with c > 0 such that the mean is 1 (cap >= 1); the m largest are capped, m the
    fewest for which the rest, scaled to fill the mean, stay at or below the cap."""
    order = np.sort(raw)[::-1]
    n = len(raw)
    capped = np.arange(n)
    rest = np.cumsum(order[::-1])[::-1]  # rest[m]: the sum of all but the m largest
    scale = (n - capped * cap) / rest
    m = int(np.argmax(scale * order <= cap * (1 + 1e-12)))
    return np.minimum(scale[m] * raw, cap)


def masked_mean(
    sq: torch.Tensor,
    weights: torch.Tensor,
    totals: torch.Tensor | None = None,
    label_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss: per label, the weighted mean of ``sq`` over the rows that have the label,
    then the mean over the labels that some row has, each times its ``label_weights`` entry
    (default 1). ``totals``: the weight sums per label, when the rows of the step are spread over
    several workers (default: ``weights.sum(0)``)."""
    totals = weights.sum(0) if totals is None else totals
    has = totals > 0
    per_label = (sq * weights).sum(0)[has] / totals[has]
    if label_weights is not None:
        per_label = per_label * label_weights.to(per_label)[has]
    return per_label.mean()


def label_balance_weights(
    history: Sequence[Mapping], scaler: LabelScaler, config: TrainConfig
) -> torch.Tensor | None:
    """The per-label loss weights ``[L]`` of the next epoch under ``config.label_balance`` (None when 0).

    Each label's validation MSE of the last epoch in ``history`` (scaled units, at least
    ``error_floor``^2, so that no label gets unbounded weight) to the power ``-label_balance``,
    normalised to mean 1 over the labels that have one; a label without a validation error, and
    every label in the first epoch, weighs 1. Because it is read from the recorded history, a resumed
    run and every data-parallel worker (each validates on all the rows) compute the same weights.
    """
    if config.label_balance == 0:
        return None
    if not history:
        return torch.ones(len(scaler.names))
    rmse = np.array([history[-1]["val_rmse"][name] for name in scaler.names], dtype=np.float64) / scaler.scale
    known = np.isfinite(rmse)
    if not known.any():
        return torch.ones(len(scaler.names))
    raw = np.maximum(rmse[known], config.error_floor) ** (-2.0 * config.label_balance)
    weights = np.ones(len(scaler.names))
    weights[known] = raw / raw.mean()
    return torch.as_tensor(weights, dtype=torch.float32)


def variance_loss(log_var: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """Gaussian negative log-likelihood ``[B, L]`` (constant dropped) of squared residuals ``sq`` under
    predicted log-variances ``log_var`` (scaled units). Clamped to e^-12 .. e^8 of the label's
    training variance, where no real error lies, so that one near-zero residual cannot drive the
    variance to zero and the loss to -inf."""
    log_var = log_var.clamp(*LOG_VARIANCE_RANGE)
    return 0.5 * (log_var + sq * torch.exp(-log_var))


def per_label_mse(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean squared error per label over the rows whose target is present (NaN for a label none has)."""
    present = np.isfinite(target)
    sums = np.where(present, (predicted - np.where(present, target, 0.0)) ** 2, 0.0).sum(axis=0)
    counts = present.sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def predict_scaled(
    network: nn.Module, data: TrainingData, scaler: LabelScaler, batch_size: int, device: str = "cpu"
):
    """Scaled predictions and scaled true labels ``[N, L]`` of every row of ``data`` (eval mode)."""
    network.eval()
    predictions, targets = [], []
    with torch.inference_mode():
        for raw in data.batches(0, batch_size, None):
            batch = _tensors(raw)
            out = network(batch["flux"].to(device), batch["mask"].to(device))
            predictions.append(out.double().cpu())
            targets.append(_scaled(batch["labels"], scaler).double())
    if not predictions:
        raise InputError("the validation data are empty")
    return torch.cat(predictions).numpy(), torch.cat(targets).numpy()


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.epochs, eta_min=config.learning_rate * config.lr_floor
        )
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=config.plateau_factor, patience=config.plateau_patience
        )
    return None


def input_reference(*datas: TrainingData, batch_size: int = 256) -> np.ndarray:
    """The mean spectrum of the rows of ``datas`` over their good pixels (1.0 where no row is good).

    An ensemble passes its whole training pool (one member's train + val rows), so that every member
    measures its input from the same spectrum and the fused engine can read one input for all.
    """
    total, count = None, None
    for raw in (raw for data in datas for raw in data.batches(0, batch_size, None)):
        batch = _tensors(raw)
        good = batch["mask"].to(torch.float64)
        flux = batch["flux"].to(torch.float64) * good
        total = flux.sum(0) if total is None else total + flux.sum(0)
        count = good.sum(0) if count is None else count + good.sum(0)
    if total is None:
        raise InputError("the training data are empty")
    return torch.where(count > 0, total / count.clamp(min=1), 1.0).numpy()


def train_member(
    arch: ArchConfig,
    setup: Setup,
    scaler: LabelScaler,
    config: TrainConfig,
    train: TrainingData,
    val: TrainingData,
    *,
    resume: TrainingState | None = None,
    on_epoch: Callable[[EpochMetrics, TrainingState], None] | None = None,
    device: str = "cpu",
    reference: np.ndarray | None = None,
    parallel: DataParallel | None = None,
) -> MemberResult:
    """Train one member from scratch (or from ``resume``) and return it with its best weights.

    ``device`` (e.g. ``"cuda"``) runs the network there; batches are drawn and augmented on the
    CPU, so the random draws are the same on every device, and the states passed to ``on_epoch``
    and the returned network are on the CPU. ``reference`` is the input reference of a
    ``center_input`` architecture (default: the mean of ``train``; ensembles pass their pool's).
    ``parallel``: this process is one of several workers training the member data-parallel (see
    :class:`DataParallel`); the epoch metrics are those of all workers together.
    """
    seed = config.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, _INIT))
        network = build_network(arch, setup)
    if arch.center_input and resume is None:
        if reference is None:
            reference = input_reference(train, batch_size=max(config.batch_size, 256))
        network.set_reference(reference)
    network = network.to(device)
    optimizer = torch.optim.Adam(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = _scheduler(optimizer, config)
    best_state = _cpu_copy(network.state_dict())
    best_val, best_epoch, since_best, start, history, stopped = math.inf, 0, 0, 0, [], False
    if resume is not None:
        if resume.config != config.to_dict() or resume.arch != arch.to_dict():
            raise ConfigError("the training state was made with another configuration or architecture")
        network.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        if scheduler is not None and resume.scheduler is not None:
            scheduler.load_state_dict(resume.scheduler)
        best_state = {k: v.clone() for k, v in resume.best_model.items()}
        best_val, best_epoch, since_best = resume.best_val_loss, resume.best_epoch, resume.epochs_since_best
        start, history, stopped = resume.epoch, list(resume.history), resume.stopped
    # Wrapped after any resume: DDP hands every worker rank 0's weights when it is built.
    trained = network if parallel is None else parallel.wrap(network)

    for epoch in range(start, config.epochs):
        if stopped:
            break
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(derived_seed(seed, _AUGMENT, epoch))
        network.train()
        loss_sum, n_train = 0.0, 0
        label_weights = label_balance_weights(history, scaler, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(seed, _DROPOUT, epoch))
            for raw in train.batches(epoch, config.batch_size, derived_seed(seed, _SHUFFLE, epoch)):
                batch = _tensors(raw)
                flux, mask = (
                    augment(batch, config.augment, setup, generator)
                    if config.augment.active
                    else (batch["flux"], batch["mask"])
                )
                target, weights = loss_targets(batch, scaler, config)
                out = trained(flux.to(device), mask.to(device), log_variance=arch.variance_head)
                predicted, log_var = out if arch.variance_head else (out, None)
                sq = (predicted - target.to(device)) ** 2
                weights = weights.to(device)
                terms = [(sq, weights)]
                if log_var is not None:
                    # Its parameters are the variance head's alone (detached input, detached
                    # residuals): the labels' gradients, and so their weights, are unchanged.
                    terms.append((variance_loss(log_var, sq.detach()), (weights > 0).to(sq.dtype)))
                if parallel is None:
                    losses = [
                        masked_mean(v, w, label_weights=label_weights if i == 0 else None)
                        for i, (v, w) in enumerate(terms)
                    ]
                    step_rows = flux.shape[0]
                else:  # one all-reduce for both terms
                    losses, step_rows = parallel.step_losses(*terms, label_weights=label_weights)
                loss = losses[0]
                total = loss if len(losses) == 1 else loss + losses[1]
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                # Summed over the workers this is the step's mean loss times its rows (one worker: W = 1).
                loss_sum += float(loss.detach()) * step_rows / (parallel.world_size if parallel else 1)
                n_train += flux.shape[0]
        if parallel is not None:
            loss_sum, n_train = parallel.all_sum([loss_sum, n_train])
            n_train = int(n_train)
        if n_train == 0:
            raise InputError("the training data are empty")
        predicted, target = predict_scaled(network, val, scaler, max(config.batch_size, 256), device)
        per_label = per_label_mse(predicted, target)
        val_loss, val_rmse = float(np.nanmean(per_label)), np.sqrt(per_label) * scaler.scale
        if not math.isfinite(val_loss):
            stopped = True  # diverged: keep the best weights so far; selection will drop this member
        elif val_loss < best_val - config.min_delta:
            best_val, best_epoch, since_best = val_loss, epoch + 1, 0
            best_state = _cpu_copy(network.state_dict())
        else:
            since_best += 1
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if math.isfinite(val_loss):
                scheduler.step(val_loss)
        elif scheduler is not None:
            scheduler.step()
        stopped = stopped or since_best >= config.patience
        metrics = EpochMetrics(
            epoch=epoch + 1,
            train_loss=loss_sum / n_train,
            val_loss=val_loss,
            best_val_loss=best_val,
            best_epoch=best_epoch,
            seconds=time.perf_counter() - began,
            learning_rate=optimizer.param_groups[0]["lr"],
            n_train=n_train,
            val_rmse={name: float(v) for name, v in zip(scaler.names, val_rmse, strict=True)},
        )
        history.append(metrics.to_dict())
        if on_epoch is not None:
            on_epoch(
                metrics,
                TrainingState(
                    epoch=epoch + 1,
                    model=_cpu_copy(network.state_dict()),
                    best_model=best_state,
                    # Copies: the optimiser updates its moment tensors in place in later epochs.
                    optimizer=_cpu_copy(optimizer.state_dict()),
                    scheduler=copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
                    best_val_loss=best_val,
                    best_epoch=best_epoch,
                    epochs_since_best=since_best,
                    stopped=stopped,
                    history=list(history),
                    config=config.to_dict(),
                    arch=arch.to_dict(),
                ),
            )
    network.load_state_dict(best_state)
    network.cpu()
    predicted, target = predict_scaled(network, val, scaler, max(config.batch_size, 256))
    return MemberResult(
        network=network,
        seed=seed,
        best_val_loss=best_val,
        best_epoch=best_epoch,
        epochs_run=len(history),
        stopped_early=stopped,
        history=history,
        n_train=history[-1]["n_train"] if history else 0,
        n_val=len(target),
        val_metrics=label_metrics(scaler.inverse(predicted), scaler.inverse(target), scaler.names),
    )
