"""The ensemble: N member networks over one setup, one architecture and one label scaling.

:meth:`Ensemble.predict` is the single prediction entry point. This is the reference
implementation: member by member, with autograd for saliency, easy to check by eye. A fused fast
path may replace its inside later; it must give the same numbers.

The ensemble label is the mean over members; its internal precision is the standard deviation over
members with ``ddof = 1`` (the sample standard deviation: with 8 members the population formula
would understate the spread by 7 %). With a single member the std is NaN (unknown), not 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..pipeline.errors import ConfigError, InputError
from ..pipeline.setups import Setup
from .arch import ArchConfig, build_network
from .saliency import SaliencyAccumulator, SaliencySummary, member_gradients, summarise
from .scaling import LabelScaler

STD_DDOF = 1
SALIENCY_MODES = (None, "summary", "full")


@dataclass
class Prediction:
    """Physical-unit labels of a batch; columns follow ``Ensemble.label_names``."""

    mean: np.ndarray  # [B, L] float64
    std: np.ndarray  # [B, L] float64, ddof = 1 across members
    members: np.ndarray | None = None  # [M, B, L] float64, when asked for
    saliency: SaliencySummary | None = None  # when saliency is "summary" or "full"
    saliency_maps: np.ndarray | None = None  # [B, L, P] float32, when saliency is "full"
    outside_training_range: np.ndarray | None = field(default=None)  # [B, L] bool


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
    def dtype(self) -> torch.dtype:
        return next(self.networks[0].parameters()).dtype

    def predict(
        self,
        flux: np.ndarray,
        mask: np.ndarray | None = None,
        *,
        members: bool = False,
        saliency: str | None = None,
        accumulator: SaliencyAccumulator | None = None,
        batch_size: int = 256,
    ) -> Prediction:
        """Labels for spectra on the setup's grid.

        ``flux [B, P]`` and ``mask [B, P]`` (True = good pixel) as ``pipeline.contract.model_inputs``
        returns them: masked pixels already set to 1.0. ``members=True`` adds each member's
        prediction; ``saliency="summary"`` adds the per-spectrum saliency summary, ``"full"`` also
        the full maps ``[B, L, P]``; an ``accumulator`` receives every map for population averages.
        """
        if saliency not in SALIENCY_MODES:
            raise ConfigError(f"saliency must be one of {SALIENCY_MODES}, not {saliency!r}")
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
                "(pipeline.contract.model_inputs does this)"
            )
        need_maps = saliency is not None or accumulator is not None
        parts = [
            self._predict_batch(
                flux[i : i + batch_size], None if mask is None else mask[i : i + batch_size], need_maps
            )
            for i in range(0, flux.shape[0], batch_size)
        ]
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

    def _predict_batch(
        self, flux: np.ndarray, mask: np.ndarray | None, need_maps: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Member predictions ``[M, b, L]`` (physical) and ensemble-mean gradients ``[b, L, P]``."""
        x = torch.as_tensor(flux, dtype=self.dtype)
        good = None if mask is None else torch.as_tensor(np.asarray(mask, dtype=bool))
        scale = torch.as_tensor(self.scaler.scale, dtype=self.dtype)
        scaled, grad_sum = [], None
        for network in self.networks:
            if need_maps:
                out, grads = member_gradients(network, x, good)
                grads = grads * scale[None, :, None]
                grad_sum = grads if grad_sum is None else grad_sum.add_(grads)
            else:
                with torch.inference_mode():
                    out = network(x, good)
            scaled.append(out.double().numpy())
        physical = self.scaler.inverse(np.stack(scaled))
        if not need_maps:
            return physical, None
        maps = grad_sum / self.n_members
        if good is not None:
            maps = maps * good[:, None, :].to(maps.dtype)
        return physical, maps.numpy().astype(np.float32 if self.dtype == torch.float32 else np.float64)


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
