"""Network architectures: a configuration dataclass, named presets and the network built from them.

Every network is the same simple shape, so that a fused multi-member implementation (grouped
convolutions over N members) can be written from the same weights:

    input [B, C, P]  C = 1 (reference - flux, 0 at masked pixels) or 2 (that, good-pixel mask)
      -> one conv stack per branch: (Conv1d -> LeakyReLU -> MaxPool1d) x len(conv_channels)
         branches: one over the concatenated grid ("joined"), or one per arm ("per_arm")
      -> flatten each branch, concatenate
      -> head: (Dropout -> Linear -> LeakyReLU) x len(dense_units) -> Dropout -> Linear(n_labels)
    output [B, n_labels]  scaled labels (see scaling.py)

With ``variance_head`` a second output layer reads the same penultimate activations, detached, and
predicts each label's log-variance (scaled units): the member's own estimate of its error on this
spectrum (``SpectrumCNN.log_variance_of``), trained with a Gaussian negative log-likelihood on the
mean's residuals (``training.variance_loss``). The detach keeps the labels exactly what they are
without it: the head learns how far to trust them, not how to move them.

The network reads ``reference - flux`` with a per-pixel ``reference`` (a buffer saved with the
weights), and zero at masked pixels. Without centring the reference is 1.0, so the input is the
absorption depth and the continuum is zero; with "valid" convolutions that is the same family of
functions as feeding flux (the first bias absorbs the offset), so the ``paper`` preset is still the
published network. With ``center_input`` the reference is the mean spectrum of the ensemble's
training pool (``training.input_reference``, one for all members): the network then sees how a star
differs from the average star, which conditions the optimisation far better (measured in
BENCHMARKS.md), and a masked pixel reads as "average".
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from speclabel.core.config import dataclass_from_dict
from speclabel.core.errors import ConfigError
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import Setup

ARM_LAYOUTS = ("joined", "per_arm")
# Where a variance head's log-variance (scaled units: the label's training variance is e^0) is taken
# to lie, in training and in prediction: no real error lies outside.
LOG_VARIANCE_RANGE = (-12.0, 8.0)


@dataclass(frozen=True)
class ArchConfig:
    """Every size of the network. Stored in ``model.json``; presets in :data:`PRESETS`."""

    name: str = "custom"
    conv_channels: tuple[int, ...] = (8, 4, 2)
    kernel_size: int = 10
    pool_size: int = 2
    dense_units: tuple[int, ...] = (32,)
    dropout: float = 0.2
    leaky_slope: float = 0.3
    arms: str = "joined"
    mask_channel: bool = False
    center_input: bool = False
    n_outputs: int = len(LABEL_NAMES)
    variance_head: bool = False
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        object.__setattr__(self, "dense_units", tuple(int(u) for u in self.dense_units))
        problems = []
        if not self.conv_channels or min(self.conv_channels) < 1:
            problems.append(f"conv_channels must be positive integers, got {self.conv_channels}")
        if min(self.dense_units, default=1) < 1:
            problems.append(f"dense_units must be positive integers, got {self.dense_units}")
        if self.kernel_size < 1 or self.pool_size < 1:
            problems.append("kernel_size and pool_size must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.leaky_slope < 0.0:
            problems.append(f"leaky_slope must be >= 0, got {self.leaky_slope}")
        if self.arms not in ARM_LAYOUTS:
            problems.append(f"arms must be one of {ARM_LAYOUTS}, got {self.arms!r}")
        if self.n_outputs < 1:
            problems.append("n_outputs must be >= 1")
        if problems:
            raise ConfigError(f"architecture {self.name!r}: " + "; ".join(problems))

    @property
    def in_channels(self) -> int:
        return 2 if self.mask_channel else 1

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["conv_channels"] = list(self.conv_channels)
        out["dense_units"] = list(self.dense_units)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ArchConfig:
        return dataclass_from_dict(cls, data, what="architecture")

    def replace(self, **changes) -> ArchConfig:
        return dataclasses.replace(self, **changes)

    def branch_lengths(self, setup: Setup) -> list[int]:
        """Input pixels of each branch (the arm lengths, or the whole grid when joined)."""
        if self.arms == "joined":
            return [setup.n_pixels]
        return [arm.n_pixels for arm in setup.arms]

    def conv_output_length(self, n_pixels: int) -> int:
        """Length after the conv stack ("valid" convolutions, floor pooling), as torch computes it."""
        length = n_pixels
        for _ in self.conv_channels:
            length = (length - self.kernel_size + 1) // self.pool_size
        return length

    def flat_features(self, setup: Setup) -> int:
        lengths = [self.conv_output_length(n) for n in self.branch_lengths(setup)]
        if min(lengths) < 1:
            raise ConfigError(
                f"architecture {self.name!r} reduces an input of {min(self.branch_lengths(setup))} pixels "
                "to nothing: fewer conv layers, a smaller kernel or smaller pooling"
            )
        return self.conv_channels[-1] * sum(lengths)

    def embedding_units(self, setup: Setup) -> int:
        """Width of one member's penultimate layer (``SpectrumCNN.embed``)."""
        return self.dense_units[-1] if self.dense_units else self.flat_features(setup)


# The paper preset is the network of Guiglion et al. (2020) as used by Ambrosch et al. (2023):
# Conv1D 8/4/2 filters of width 10, LeakyReLU (Keras' default slope 0.3), max-pooling 2 after each
# convolution, dropout 0.2 before a dense layer of 32 and a linear output.
PAPER = ArchConfig(
    name="paper",
    conv_channels=(8, 4, 2),
    kernel_size=10,
    pool_size=2,
    dense_units=(32,),
    dropout=0.2,
    leaky_slope=0.3,
    arms="joined",
    mask_channel=False,
    notes="Guiglion et al. 2020 / Ambrosch et al. 2023",
)

# The default measured best on the shared GIRAFFE file (BENCHMARKS.md): wider and shallower than the
# paper's network (16 + 16 filters, pooling 4, so the dense layer still sees 993 positions per arm),
# one conv stack per arm, centred input and no dropout (dropout noise swamps 0.02-dex signals). The
# variance head changes no label and lets the calibrated error see the stars whose lines vanish.
DEFAULT = ArchConfig(
    name="default",
    conv_channels=(16, 16),
    kernel_size=10,
    pool_size=4,
    dense_units=(64,),
    dropout=0.0,
    leaky_slope=0.3,
    arms="per_arm",
    mask_channel=False,
    center_input=True,
    variance_head=True,
    notes="speclabel default: measured best on the shared GIRAFFE file (BENCHMARKS.md)",
)

PRESETS: dict[str, ArchConfig] = {"paper": PAPER, "default": DEFAULT}
DEFAULT_ARCH = "default"


def get_arch(name_or_path: str = DEFAULT_ARCH, **overrides) -> ArchConfig:
    """A preset by name or an architecture TOML file by path, with optional field overrides.

    A TOML file holds the fields of :class:`ArchConfig` at top level, or under ``[arch]``; it may
    name a ``preset`` to start from and change only some fields.
    """
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.exists():
            raise ConfigError(f"architecture file {name_or_path!r} does not exist")
        arch = arch_from_toml(path)
    elif name_or_path in PRESETS:
        arch = PRESETS[name_or_path]
    else:
        raise ConfigError(
            f"unknown architecture {name_or_path!r}: presets are {sorted(PRESETS)}, or give a .toml file"
        )
    return arch.replace(**overrides) if overrides else arch


def arch_from_toml(path: str | Path) -> ArchConfig:
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"architecture file {path} is not valid TOML: {exc}") from exc
    data = dict(data.get("arch", data))
    base = data.pop("preset", None)
    if base is not None:
        if base not in PRESETS:
            raise ConfigError(f"{path}: unknown preset {base!r}; presets are {sorted(PRESETS)}")
        data = {**PRESETS[base].to_dict(), "name": Path(path).stem, **data}
    data.setdefault("name", Path(path).stem)
    return ArchConfig.from_dict(data)


def conv_stack(arch: ArchConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = arch.in_channels
    for out in arch.conv_channels:
        layers += [
            nn.Conv1d(channels, out, arch.kernel_size),
            nn.LeakyReLU(arch.leaky_slope),
            nn.MaxPool1d(arch.pool_size),
        ]
        channels = out
    return nn.Sequential(*layers)


def dense_head(arch: ArchConfig, n_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for units in arch.dense_units:
        layers += [nn.Dropout(arch.dropout), nn.Linear(n_features, units), nn.LeakyReLU(arch.leaky_slope)]
        n_features = units
    layers += [nn.Dropout(arch.dropout), nn.Linear(n_features, arch.n_outputs)]
    return nn.Sequential(*layers)


class SpectrumCNN(nn.Module):
    """``forward(flux [B, P], mask [B, P] | None) -> scaled labels [B, n_outputs]``.

    The input is ``reference - flux``, zero where ``mask`` (True = good pixel) is False;
    ``branch_slices`` are the pixel ranges each conv stack in ``branches`` reads; ``head`` is the
    dense part. ``mask`` also feeds the mask channel when the architecture has one; without a mask
    every pixel counts as good.
    """

    def __init__(self, arch: ArchConfig, setup: Setup):
        super().__init__()
        self.arch = arch
        self.n_pixels = setup.n_pixels
        if arch.arms == "joined":
            self.branch_slices = [(0, setup.n_pixels)]
        else:
            self.branch_slices = [(s.start, s.stop) for s in setup.arm_slices.values()]
        self.branches = nn.ModuleList(conv_stack(arch) for _ in self.branch_slices)
        self.head = dense_head(arch, arch.flat_features(setup))
        self.register_buffer("reference", torch.ones(setup.n_pixels))
        # Built last, so that the other layers' initial weights are those of a network without it.
        self.variance = nn.Linear(arch.embedding_units(setup), arch.n_outputs) if arch.variance_head else None

    def set_reference(self, reference) -> None:
        """The per-pixel spectrum the input is measured from (``center_input``: the training mean)."""
        reference = torch.tensor(reference, dtype=self.reference.dtype)  # a copy: the input may be read-only
        if reference.shape != self.reference.shape or not torch.isfinite(reference).all():
            raise ValueError(f"reference must be {tuple(self.reference.shape)} finite values")
        self.reference.copy_(reference)

    def forward(
        self, flux: torch.Tensor, mask: torch.Tensor | None = None, *, log_variance: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scaled labels ``[B, n_outputs]``; with ``log_variance`` (a ``variance_head`` network) also
        their predicted log-variances ``[B, n_outputs]``, in one pass (as data-parallel training needs)."""
        embedded = self.embed(flux, mask)
        labels = self.head[-1](embedded)
        return (labels, self.log_variance_of(embedded)) if log_variance else labels

    def log_variance_of(self, embedded: torch.Tensor) -> torch.Tensor:
        """The variance head on penultimate activations ``[B, units]`` (from :meth:`embed`), detached
        from the network below it: log-variance of each scaled label ``[B, n_outputs]``."""
        if self.variance is None:
            raise ValueError(f"architecture {self.arch.name!r} has no variance head")
        return self.variance(embedded.detach())

    def embed(self, flux: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The penultimate-layer activations ``[B, units]``: what the output layer reads (the last
        dense layer's LeakyReLU output; the flattened conv features when there is no dense layer)."""
        if flux.shape[-1] != self.n_pixels:
            raise ValueError(f"expected {self.n_pixels} pixels per spectrum, got {flux.shape[-1]}")
        x = self.reference - flux
        if mask is not None:
            x = torch.where(mask, x, torch.zeros((), dtype=x.dtype))
        x = x.unsqueeze(1)
        if self.arch.mask_channel:
            good = torch.ones_like(flux) if mask is None else mask.to(flux.dtype)
            x = torch.cat([x, good.unsqueeze(1)], dim=1)
        features = [
            branch(x[:, :, start:stop]).flatten(1)
            for branch, (start, stop) in zip(self.branches, self.branch_slices, strict=True)
        ]
        return self.head[:-1](torch.cat(features, dim=1) if len(features) > 1 else features[0])


def build_network(arch: ArchConfig, setup: Setup) -> SpectrumCNN:
    return SpectrumCNN(arch, setup)


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def forward_flops(arch: ArchConfig, setup: Setup) -> int:
    """Floating-point operations of one forward pass for one spectrum (2 per multiply-add).

    Counts convolutions and dense layers, the work that dominates; activations and pooling are
    a few percent and left out. Used by the throughput benchmark to report GFLOP/s.
    """
    flops = 0
    for n in arch.branch_lengths(setup):
        channels, length = arch.in_channels, n
        for out in arch.conv_channels:
            length = length - arch.kernel_size + 1
            flops += 2 * channels * out * arch.kernel_size * length
            length //= arch.pool_size
            channels = out
    n_features = arch.flat_features(setup)
    for units in (*arch.dense_units, arch.n_outputs):
        flops += 2 * n_features * units
        n_features = units
    if arch.variance_head:
        flops += 2 * arch.embedding_units(setup) * arch.n_outputs
    return flops
