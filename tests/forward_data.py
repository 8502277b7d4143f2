"""Simulated spectra on two narrow windows of the GIRAFFE setup and a forward model fitted on them,
shared by the forward-model, defect and label-job tests (simulating and fitting the full 16k-pixel
setup would take tens of seconds; these windows keep real lines of every label: Fe I, Mg I 5528,
Al I 5557, the Ca II triplet's 8498 and 8542 with their Paschen neighbours)."""

from __future__ import annotations

import tomllib
from functools import cache

from speclabel.core.arrays import training_arrays
from speclabel.core.labels import LABEL_NAMES
from speclabel.core.setups import Setup
from speclabel.model.forward import ForwardModel, fit_forward_model
from speclabel.pipeline.simulate import SurveyConfig, simulate_chunk

# As TOML text, so that a test can hand the setup to a command (--setup FILE).
WINDOW_SETUP_TOML = """
name = "giraffe-windows"
[label_lines]
teff = ["H I", "Fe I"]
logg = ["Ca II", "Mg I"]
feh = ["Fe I"]
mgfe = ["Mg I"]
alfe = ["Al I"]

[[arms]]
name = "hr10"
wave_start = 5524.0
wave_step = 0.05
n_pixels = 760
resolution = 19800.0

[[arms]]
name = "hr21"
wave_start = 8490.0
wave_step = 0.05
n_pixels = 1100
resolution = 16200.0

[line_windows]
"Mg I" = [[5527.90, 5528.90]]
"Al I" = [[5556.56, 5557.56]]
"Fe I" = [[5525.24, 5525.84], [5543.64, 5544.24], [5546.21, 5546.81], [5554.60, 5555.20]]
"Ca II" = [[8496.52, 8499.52], [8540.59, 8543.59]]
"H I" = [[8500.98, 8503.98]]
"""
WINDOW_SETUP = Setup.from_dict(tomllib.loads(WINDOW_SETUP_TOML))
ARM_NAMES = tuple(a.name for a in WINDOW_SETUP.arms)
ARM_PIXELS = tuple(a.n_pixels for a in WINDOW_SETUP.arms)


@cache
def survey(n: int, seed: int, snr: tuple[float, float] = (30.0, 150.0)):
    """``n`` simulated stars on the window setup: (table, training arrays)."""
    table = simulate_chunk(WINDOW_SETUP, SurveyConfig(n=n, seed=seed, chunk_size=n, snr_range=snr), 0)
    return table, training_arrays(table, WINDOW_SETUP)


@cache
def window_forward_model() -> ForwardModel:
    """The forward model of 400 simulated training stars (S/N 30-150), fitted once per session."""
    _, arrays = survey(400, 101)
    return fit_forward_model(
        arrays["flux"], arrays["ivar"], arrays["mask"], arrays["labels"], LABEL_NAMES, ARM_NAMES, ARM_PIXELS
    )


@cache
def noise_free_survey(n: int, seed: int):
    """The stars of :func:`survey` ``(n, seed)`` as noise-free reference spectra (no ivar columns)."""
    config = SurveyConfig(n=n, seed=seed, chunk_size=n, snr_range=(30.0, 150.0), noise_free=True)
    return simulate_chunk(WINDOW_SETUP, config, 0)
