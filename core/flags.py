"""Quality flags of a label row: the bits of the catalogue's ``flags`` column (int32), in one place.

A row's ``flags`` is the bitwise OR of the flags that apply; 0 means none. The label job sets them,
``speclabel stats`` counts them, and ``--where "has_flag(low_snr)"`` selects on them. Bit values are
part of the catalogue format: never renumber a flag, only add new ones.
"""

from __future__ import annotations

import enum


class Flag(enum.IntFlag):
    # A label lies outside the range of the model's training labels (stored in model.json):
    # the network extrapolates there and its labels are not to be trusted.
    EXTRAPOLATED = 1 << 0
    # The spectrum's S/N is below the job's threshold.
    LOW_SNR = 1 << 1
    # The ensemble members disagree (a label's ensemble std above its threshold).
    HIGH_STD = 1 << 2
    # Too many pixels are masked (ivar = 0 or non-finite flux) for the labels to be reliable.
    HEAVILY_MASKED = 1 << 3
    # The spectrum does not look like the model spectrum at its labels: its chi^2 against the
    # model's forward model (total or one arm) exceeds the threshold stored in the model, chosen
    # from the training spectra's own chi^2. A binary, emission, a cosmic ray, a bad continuum or
    # an arm of another star: the labels of such a spectrum are not to be trusted.
    ANOMALOUS_SPECTRUM = 1 << 4
    # The spectrum lies far from every training spectrum in the network's penultimate layer
    # (ood_score above the model's threshold): the labels come from a kind of spectrum never seen.
    OUT_OF_DISTRIBUTION = 1 << 5


DESCRIPTIONS: dict[Flag, str] = {
    Flag.EXTRAPOLATED: "a label outside the training label range",
    Flag.LOW_SNR: "S/N below the threshold",
    Flag.HIGH_STD: "ensemble std above the threshold",
    Flag.HEAVILY_MASKED: "too many masked pixels",
    Flag.ANOMALOUS_SPECTRUM: "chi2 against the forward model above the model's threshold",
    Flag.OUT_OF_DISTRIBUTION: "unlike every training spectrum (ood_score above the model's threshold)",
}


def flag_names() -> list[str]:
    """Lower-case flag names, as used on the command line (``low_snr``)."""
    return [flag.name.lower() for flag in Flag]


def flag_by_name(name: str) -> Flag:
    """The flag called ``name`` (case-insensitive); KeyError when there is none."""
    return Flag[name.upper()]
