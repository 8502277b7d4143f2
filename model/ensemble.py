"""The ensemble: N member networks over one setup, one architecture and one label scaling.

:meth:`Ensemble.predict` is the single prediction entry point. This is the reference
implementation: member by member, with autograd for saliency, easy to check by eye. A fused fast
path may replace its inside later; it must give the same numbers.

The ensemble label is the mean over members; its internal precision is the standard deviation over
members with ``ddof = 1`` (the sample standard deviation: with 8 members the population formula
would understate the spread by 7 %). With a single member the std is NaN (unknown), not 0.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from speclabel.core.errors import ConfigError, InputError
from speclabel.core.flags import Flag
from speclabel.core.labels import Label, label_set, labels_from_dicts
from speclabel.core.setups import Setup

from .arch import LOG_VARIANCE_RANGE, ArchConfig, build_network
from .forward import ForwardModel
from .fused import PRECISIONS, FusedEnsemble, fusable_ensemble
from .ood import EmbeddingReference
from .refine import Refinement
from .saliency import SaliencyAccumulator, SaliencySummary, member_gradients, summarise
from .scaling import LabelScaler

log = logging.getLogger(__name__)

STD_DDOF = 1
SALIENCY_MODES = (None, "summary", "full")
ENGINES = ("fused", "reference")
# The fused engine must reproduce the reference to these fractions (issue 10): labels of each
# label's training range, saliency of the largest |gradient|.
LABEL_MATCH = 1e-5
SALIENCY_MATCH = 1e-4
EMBEDDING_MATCH = 1e-4  # of the largest |penultimate activation|
PROBE_SPECTRA = 2  # synthetic spectra the fused engine is checked on against the reference
PRECISION_PROBE_SPECTRA = 16  # input spectra a reduced precision is checked on against float32
# Saliency values allowed outside the tolerance in those checks. Where the two values of a max-pool
# window are equal to within float rounding, two implementations that round differently pick
# different positions, both valid subgradients; the gradient of that unit then lands one
# pixel over, in a patch of up to ~100 pixels per such near-tie. On real spectra, whose continuum
# makes neighbouring activations close, this happens in a fair fraction of spectra; an error in the
# fused engine would be off almost everywhere.
NEAR_TIE_FRACTION = 0.01
# precision="auto" tries these, fastest first, and keeps the first within tolerance of float32.
AUTO_PRECISIONS = {"cuda": ("bf16", "tf32"), "cpu": ()}


@dataclass(frozen=True)
class InferenceOptions:
    """How :meth:`Ensemble.predict` computes; configuration as data (jobs set it from their options).

    ``device``: where the fused engine computes (``"cpu"``, ``"cuda:1"``); None: where the member
    networks are. ``precision``: ``float32``; ``tf32`` (CUDA) or ``bf16``, refused unless the labels
    of the first spectra labelled stay within ``label_tolerance`` of each label's training range of
    the float32 labels and the saliency within ``saliency_tolerance`` of the largest |gradient|; or
    ``auto``, the fastest of those that passes on the device, else float32. A ``torch.autocast``
    to bfloat16 around ``predict`` also selects bf16 (unchecked: the caller chose it, as it would for
    the reference engine). ``tile``: spectra per fused step (None: sized to the device's caches or
    memory).
    """

    engine: str = "fused"
    device: str | None = None
    precision: str = "float32"
    tile: int | None = None
    label_tolerance: float = 1e-3
    saliency_tolerance: float = 1e-2

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        if self.precision not in (*PRECISIONS, "auto"):
            raise ConfigError(f"precision must be one of {(*PRECISIONS, 'auto')}, not {self.precision!r}")
        if self.tile is not None and self.tile < 1:
            raise ConfigError(f"tile must be >= 1, got {self.tile}")
        if self.precision != "float32" and self.engine != "fused":
            raise ConfigError(f"precision {self.precision!r} needs the fused engine")
        if self.device is None:
            return
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {self.device!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for, but this torch sees no CUDA device")

    def replace(self, **changes) -> InferenceOptions:
        return dataclasses.replace(self, **changes)


@dataclass
class Prediction:
    """Physical-unit labels of a batch; columns follow ``Ensemble.label_names``."""

    mean: np.ndarray  # [B, L] float64
    std: np.ndarray  # [B, L] float64, ddof = 1 across members
    members: np.ndarray | None = None  # [M, B, L] float64, when asked for
    saliency: SaliencySummary | None = None  # when saliency is "summary" or "full"
    saliency_maps: np.ndarray | None = None  # [B, L, P] float32, when saliency is "full"
    outside_training_range: np.ndarray | None = field(default=None)  # [B, L] bool
    # The members' penultimate-layer activations side by side, [B, M * U] float32, when asked for.
    embedding: np.ndarray | None = None
    # With ood=True and a model that has an embedding reference (model/ood.py): the score [B]
    # (0-100) and whether it is beyond the model's threshold [B] bool; None otherwise.
    ood_score: np.ndarray | None = None
    out_of_distribution: np.ndarray | None = None
    # With the score: the same kNN distance relative to the training spectra's median [B] float64
    # (EmbeddingReference.relative_distance: ~1 like the training set, unbounded), a term of <label>_err.
    ood_distance: np.ndarray | None = None
    # With a variance-head model (ArchConfig.variance_head): sqrt of the mean of the members' own
    # predicted variances [B, L] float64, physical units: the error the members expect on this
    # spectrum, which their disagreement (std) cannot show. Deep ensembles' total predictive
    # variance is aleatoric**2 + std**2; model/calibration.py fits how much of each to take.
    aleatoric: np.ndarray | None = None
    # After Refinement.apply (model/refine.py): the network's own labels [B, L] (``mean`` then holds
    # the refined ones) and the fit's posterior std [B, L] (NaN for labels it did not change).
    network_mean: np.ndarray | None = None
    refined_std: np.ndarray | None = None

    def model_flags(self) -> np.ndarray:
        """The quality flags ``[B]`` (int32, core.flags) that the model decides alone: labels
        outside its training range, spectra out of its training distribution."""
        flags = np.zeros(self.mean.shape[0], dtype=np.int32)
        if self.outside_training_range is not None:
            flags[self.outside_training_range.any(axis=1)] |= Flag.EXTRAPOLATED
        if self.out_of_distribution is not None:
            flags[self.out_of_distribution] |= Flag.OUT_OF_DISTRIBUTION
        return flags


class Ensemble:
    def __init__(
        self,
        setup: Setup,
        arch: ArchConfig,
        scaler: LabelScaler,
        networks: Sequence[nn.Module],
        *,
        member_info: Sequence[dict] | None = None,
        info: dict | None = None,
        inference: InferenceOptions | None = None,
    ):
        if not networks:
            raise ConfigError("an ensemble needs at least one member network")
        if len(scaler.names) != arch.n_outputs:
            raise ConfigError(f"label scaling for {scaler.names} does not fit {arch.n_outputs} outputs")
        self.setup = setup
        self.arch = arch
        self.scaler = scaler
        self.networks = list(networks)
        for network in self.networks:
            network.eval()
            # Saliency needs input gradients only; weights without grad make each backward cheaper.
            network.requires_grad_(False)
        self.member_info = list(member_info) if member_info is not None else [{} for _ in self.networks]
        self.info = dict(info or {})
        self.model_id: str | None = None  # set when saved or loaded (model/io.py)
        # The data-driven forward model fitted on the same training rows (model/forward.py), or
        # None: a model without one still labels, its rows get no chi^2.
        self.forward: ForwardModel | None = None
        # The training set in the penultimate layer, for out-of-distribution scores (model/ood.py);
        # None for a model without one (fitted by `speclabel train`, stored by model/io.py).
        self.ood: EmbeddingReference | None = None
        # Noise-free reference spectra and the fit that refines the labels after the
        # network (model/refine.py); None: the network's labels are the model's.
        self.refinement: Refinement | None = None
        self.inference = inference or InferenceOptions()
        # Fused engines by (options, device, autocast, weight versions): a job that switches between
        # float32 and a bf16 autocast keeps both. None: the reference is used for that key.
        self._fused: dict[tuple, FusedEnsemble | None] = {}

    def __getstate__(self) -> dict:
        # Ray ships ensembles to workers by pickling: the fused engine (thread-local buffers, maybe
        # on a GPU) is rebuilt where it runs.
        return {**self.__dict__, "_fused": {}}

    @classmethod
    def from_state_dicts(
        cls,
        setup: Setup,
        arch: ArchConfig,
        scaler: LabelScaler,
        state_dicts: Sequence[dict[str, torch.Tensor]],
        **kwargs,
    ) -> Ensemble:
        networks = []
        for state in state_dicts:
            network = build_network(arch, setup)
            network.load_state_dict(state)
            networks.append(network)
        return cls(setup, arch, scaler, networks, **kwargs)

    @property
    def n_members(self) -> int:
        return len(self.networks)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.scaler.names

    @property
    def label_definitions(self) -> tuple[Label, ...]:
        """The model's labels with units and descriptions (model.json ``label_definitions``; a model
        written before labels were declared gets the standard definitions of its label names)."""
        declared = self.info.get("label_definitions")
        if declared and [d["name"] for d in declared] == list(self.label_names):
            return labels_from_dicts(declared)
        return label_set(self.label_names)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.networks[0].parameters()).dtype

    def fused_engine(
        self, flux: np.ndarray | None = None, mask: np.ndarray | None = None
    ) -> FusedEnsemble | None:
        """The fused engine for the current weights and :attr:`inference`, built and checked on first
        use; None when it does not cover the architecture or disagrees with the reference.

        The engine is checked against the reference on synthetic spectra (the same check for the
        same model, whatever it labels first). A reduced precision is checked against float32 on
        the first spectra of ``flux``/``mask``, the data about to be labelled. Changing
        :attr:`inference`, moving the networks or changing any weight in place rebuilds the engine.
        """
        device = torch.device(self.inference.device or next(self.networks[0].parameters()).device)
        autocast_bf16 = (
            torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16
        )
        key = (
            self.inference,
            device,
            autocast_bf16,
            tuple((id(p), p._version) for network in self.networks for p in network.parameters()),
        )
        if key not in self._fused:
            if len(self._fused) >= 4:  # engines for older weights or options
                self._fused.clear()
            # The checks compare against float32 and the reference: no autocast around them.
            with torch.autocast(device.type, enabled=False):
                self._fused[key] = self._build_fused(device, autocast_bf16, flux, mask)
        return self._fused[key]

    def _build_fused(
        self, device: torch.device, autocast_bf16: bool, flux: np.ndarray | None, mask: np.ndarray | None
    ) -> FusedEnsemble | None:
        options = self.inference
        reason = fusable_ensemble(self.networks)
        if reason:
            log.warning("the fused engine does not cover this ensemble (%s): using the reference", reason)
            return None
        exact = FusedEnsemble(self.networks, device=device, tile=options.tile)
        problem = self._disagreement(exact, None, *self._synthetic_probe(), LABEL_MATCH, SALIENCY_MATCH)
        if problem:
            log.warning("the fused engine disagrees with the reference (%s): using the reference", problem)
            return None
        if autocast_bf16:
            return FusedEnsemble(self.networks, device=device, precision="bf16", tile=options.tile)
        if options.precision == "float32":
            return exact
        candidates = AUTO_PRECISIONS[device.type] if options.precision == "auto" else (options.precision,)
        if flux is not None and len(flux):
            probe = (
                np.asarray(flux[:PRECISION_PROBE_SPECTRA]),
                None if mask is None else mask[:PRECISION_PROBE_SPECTRA],
            )
        else:
            probe = self._synthetic_probe()
        for precision in candidates:
            reduced = FusedEnsemble(self.networks, device=device, precision=precision, tile=options.tile)
            problem = self._disagreement(
                reduced, exact, *probe, options.label_tolerance, options.saliency_tolerance
            )
            if problem is None:
                log.info("fused engine in %s on %s (checked against float32)", precision, device)
                return reduced
            if options.precision != "auto":
                raise ConfigError(
                    f"check 'precision': {precision} is not within tolerance of float32 for this model: "
                    f"{problem}; use precision 'float32' or 'auto', or loosen the tolerance"
                )
            log.info("precision %s not within tolerance of float32 (%s)", precision, problem)
        return exact

    def _synthetic_probe(self) -> tuple[np.ndarray, np.ndarray]:
        """Absorption-like random spectra with scattered masked pixels and one masked run."""
        rng = np.random.default_rng(0)
        flux = rng.uniform(0.5, 1.0, (PROBE_SPECTRA, self.setup.n_pixels))
        mask = rng.random(flux.shape) > 0.02
        mask[0, : min(40, self.setup.n_pixels // 4)] = False
        return np.where(mask, flux, 1.0), mask

    def _disagreement(
        self,
        engine: FusedEnsemble,
        baseline: FusedEnsemble | None,
        flux: np.ndarray,
        mask: np.ndarray | None,
        label_tolerance: float,
        saliency_tolerance: float,
    ) -> str | None:
        """How far ``engine`` is from ``baseline`` (None: the reference) on ``flux``; None when within
        tolerance: every label within ``label_tolerance`` of its training range, and all but
        :data:`NEAR_TIE_FRACTION` of the saliency values of each label within
        ``saliency_tolerance`` of that label's largest |gradient| (Teff gradients are ~1000x those
        of abundances). See :data:`NEAR_TIE_FRACTION` for why not all."""
        labels, maps, embedding = self._run_engine(engine, flux, mask, True, True)
        if baseline is None:
            want_labels, want_maps, want_embedding = self._reference_batch(flux, mask, True, True)
        else:
            want_labels, want_maps, want_embedding = self._run_engine(baseline, flux, mask, True, True)
        span = self.scaler.train_max - self.scaler.train_min
        span = np.where(span > 0, span, self.scaler.scale)
        label_error = (np.abs(labels.mean(axis=0) - want_labels.mean(axis=0)) / span).max(axis=0)
        peak = np.abs(want_maps).max(axis=(0, 2))
        outside = np.abs(maps - want_maps) > saliency_tolerance * peak[None, :, None]
        outside_fraction = outside.mean(axis=(0, 2))
        worst_label, worst_map = int(label_error.argmax()), int(outside_fraction.argmax())
        # The penultimate layer only where exactness is asked for: a reduced precision is judged
        # by what it changes in the labels and the saliency.
        embedding_error = 0.0
        if baseline is None:
            peak_activation = max(float(np.abs(want_embedding).max()), np.finfo(np.float32).tiny)
            embedding_error = float(np.abs(embedding - want_embedding).max()) / peak_activation
        if (
            label_error[worst_label] <= label_tolerance
            and outside_fraction[worst_map] <= NEAR_TIE_FRACTION
            and embedding_error <= EMBEDDING_MATCH
        ):
            return None
        names = self.label_names
        return (
            f"{names[worst_label]} off by {label_error[worst_label]:.2g} of its training range "
            f"(tolerance {label_tolerance:g}); {100 * outside_fraction[worst_map]:.2g}% of the saliency "
            f"values of {names[worst_map]} off by more than {saliency_tolerance:g} of its largest "
            f"|gradient| (at most {100 * NEAR_TIE_FRACTION:g}% may be); penultimate layer off by "
            f"{embedding_error:.2g} of its largest activation (tolerance {EMBEDDING_MATCH:g})"
        )

    def predict(
        self,
        flux: np.ndarray,
        mask: np.ndarray | None = None,
        *,
        members: bool = False,
        saliency: str | None = None,
        accumulator: SaliencyAccumulator | None = None,
        batch_size: int = 256,
        engine: str | None = None,
        embedding: bool = False,
        ood: bool = False,
    ) -> Prediction:
        """Labels for spectra on the setup's grid.

        ``flux [B, P]`` and ``mask [B, P]`` (True = good pixel) as ``core.arrays.model_inputs``
        returns them: masked pixels already set to 1.0. ``members=True`` adds each member's
        prediction; ``saliency="summary"`` adds the per-spectrum saliency summary, ``"full"`` also
        the full maps ``[B, L, P]``; an ``accumulator`` receives every map for population averages.
        ``engine`` overrides ``self.inference.engine`` for this call (``"reference"`` for checks).
        ``embedding=True`` adds the members' penultimate-layer activations; ``ood=True`` the
        out-of-distribution score and flag of each spectrum, where the model has an embedding
        reference (:attr:`ood`; None without one).
        """
        if saliency not in SALIENCY_MODES:
            raise ConfigError(f"saliency must be one of {SALIENCY_MODES}, not {saliency!r}")
        engine = engine or self.inference.engine
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, not {engine!r}")
        flux = np.asarray(flux)
        if flux.ndim != 2 or flux.shape[1] != self.setup.n_pixels:
            raise InputError(
                f"flux of shape {flux.shape} does not fit setup {self.setup.name!r} "
                f"([n_spectra, {self.setup.n_pixels}])"
            )
        if mask is not None and np.shape(mask) != flux.shape:
            raise InputError(f"mask of shape {np.shape(mask)} does not match flux {flux.shape}")
        if not np.isfinite(flux).all():
            raise InputError(
                "flux has NaN or inf values: masked pixels must be set to 1.0 first "
                "(core.arrays.model_inputs does this)"
            )
        need_maps = saliency is not None or accumulator is not None
        scored = ood and self.ood is not None
        need_embedding = embedding or scored or self.arch.variance_head
        fused = self.fused_engine(flux, mask) if engine == "fused" else None

        def run_batch(rows: slice) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
            part, part_mask = flux[rows], None if mask is None else mask[rows]
            if fused is None:
                return self._reference_batch(part, part_mask, need_maps, need_embedding)
            return self._run_engine(fused, part, part_mask, need_maps, need_embedding)

        parts = [run_batch(slice(i, i + batch_size)) for i in range(0, flux.shape[0], batch_size)]
        member_values = (
            np.concatenate([p[0] for p in parts], axis=1)
            if parts
            else np.zeros((self.n_members, 0, self.arch.n_outputs))
        )
        mean = member_values.mean(axis=0)
        std = (
            member_values.std(axis=0, ddof=STD_DDOF)
            if self.n_members > STD_DDOF
            else np.full_like(mean, np.nan)
        )
        out = Prediction(
            mean=mean,
            std=std,
            members=member_values if members else None,
            outside_training_range=self.scaler.outside_training_range(mean),
        )
        if need_embedding:
            width = self.n_members * self.arch.embedding_units(self.setup)
            out.embedding = (
                np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, width), np.float32)
            )
            if scored:
                distance = self.ood.distances(out.embedding)
                out.ood_score = self.ood.score_of_distance(distance)
                out.ood_distance = self.ood.relative_distance(distance)
                out.out_of_distribution = self.ood.beyond_threshold(out.ood_score)
            if self.arch.variance_head:
                out.aleatoric = self.aleatoric(out.embedding)
            if not embedding:
                out.embedding = None
        if need_maps:
            maps = (
                np.concatenate([p[1] for p in parts])
                if parts
                else np.zeros((0, self.arch.n_outputs, self.setup.n_pixels), np.float32)
            )
            if accumulator is not None:
                accumulator.add(maps)
            if saliency is not None:
                out.saliency = summarise(maps, self.setup)
            if saliency == "full":
                out.saliency_maps = maps
        return out

    def aleatoric(self, embedding: np.ndarray) -> np.ndarray:
        """:attr:`Prediction.aleatoric` from the members' penultimate activations side by side
        ``[B, M * U]`` (:attr:`Prediction.embedding`): each member's variance head, in physical units,
        averaged over the members as variances."""
        units = self.arch.embedding_units(self.setup)
        x = torch.as_tensor(np.asarray(embedding), dtype=self.dtype)
        variance = np.zeros((x.shape[0], self.arch.n_outputs))
        with torch.inference_mode():
            for m, network in enumerate(self.networks):
                log_var = network.log_variance_of(x[:, m * units : (m + 1) * units]).double().numpy()
                variance += np.exp(np.clip(log_var, *LOG_VARIANCE_RANGE))
        return np.sqrt(variance / self.n_members) * self.scaler.scale

    def _run_engine(
        self,
        engine: FusedEnsemble,
        flux: np.ndarray,
        mask: np.ndarray | None,
        need_maps: bool,
        need_embedding: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """As :meth:`_reference_batch`, through a fused engine."""
        x = torch.as_tensor(flux, dtype=self.dtype)
        good = None if mask is None else torch.as_tensor(np.asarray(mask, dtype=bool))
        # d(ensemble mean)/d(flux) in physical units: each member's scaled output times its scale / M.
        weights = torch.as_tensor(self.scaler.scale / self.n_members, dtype=self.dtype) if need_maps else None
        scaled, maps, penultimate = engine.run(x, good, weights, embed=need_embedding)
        physical = self.scaler.inverse(scaled.double().numpy())
        if maps is not None:
            maps = maps.numpy().astype(np.float32 if self.dtype == torch.float32 else np.float64)
        return physical, maps, None if penultimate is None else _side_by_side(penultimate)

    def _reference_batch(
        self, flux: np.ndarray, mask: np.ndarray | None, need_maps: bool, need_embedding: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Member predictions ``[M, b, L]`` (physical), ensemble-mean gradients ``[b, L, P]`` (or
        None) and the members' penultimate activations side by side ``[b, M * U]`` (or None)."""
        x = torch.as_tensor(flux, dtype=self.dtype)
        good = None if mask is None else torch.as_tensor(np.asarray(mask, dtype=bool))
        scale = torch.as_tensor(self.scaler.scale, dtype=self.dtype)
        scaled, grad_sum, penultimate = [], None, []
        for network in self.networks:
            if need_maps:
                out, grads = member_gradients(network, x, good)
                grads = grads * scale[None, :, None]
                grad_sum = grads if grad_sum is None else grad_sum.add_(grads)
            if need_embedding or not need_maps:
                with torch.inference_mode():
                    embedded = network.embed(x, good)
                    out = out if need_maps else network.head[-1](embedded)
                penultimate.append(embedded)
            scaled.append(out.double().numpy())
        physical = self.scaler.inverse(np.stack(scaled))
        embedding = _side_by_side(torch.stack(penultimate)) if need_embedding else None
        if not need_maps:
            return physical, None, embedding
        maps = grad_sum / self.n_members
        if good is not None:
            maps = maps * good[:, None, :].to(maps.dtype)
        return (
            physical,
            maps.numpy().astype(np.float32 if self.dtype == torch.float32 else np.float64),
            embedding,
        )


def _side_by_side(penultimate: torch.Tensor) -> np.ndarray:
    """Members' activations ``[M, b, U]`` as one embedding per spectrum ``[b, M * U]`` float32."""
    m, b, units = penultimate.shape
    return penultimate.permute(1, 0, 2).reshape(b, m * units).to(torch.float32).numpy()


def select_members(
    val_losses: Sequence[float], *, keep: int | None = None, percentile: float | None = None
) -> list[int]:
    """Indices of the members to keep, best validation loss first.

    ``keep``: the ``keep`` best. ``percentile``: those at or below that percentile of the losses
    (Guiglion et al. 2020 trained 10 and kept those under the 80th). Both: the stricter of the two.
    Neither: all of them. Members whose loss is not finite (diverged) are never kept.
    """
    losses = np.asarray(val_losses, dtype=np.float64)
    order = [int(i) for i in np.argsort(losses, kind="stable") if np.isfinite(losses[i])]
    if percentile is not None:
        if not 0 < percentile <= 100:
            raise ConfigError(f"percentile must be in (0, 100], got {percentile}")
        cut = np.percentile(losses[order], percentile) if order else np.inf
        order = [i for i in order if losses[i] <= cut]
    if keep is not None:
        if keep < 1:
            raise ConfigError(f"keep must be >= 1, got {keep}")
        order = order[:keep]
    if not order:
        raise ConfigError("no member has a finite validation loss: every member diverged")
    return order
