"""Not a radiative-transfer code, but a curve-of-growth simulator that responds to the labels the way
real spectra do, so that demos, tests and scale benchmarks exercise the real problem:

* absorption lines at laboratory air wavelengths (``data/lines.csv``) in every arm;
* line-centre optical depth from Boltzmann excitation and Saha ionisation against an H⁻ continuum:
  neutral lines of mostly-ionised metals scale as 10^(θ(χ_ion − χ_exc)) and barely with gravity,
  lines of ions and of mostly-neutral species (H I, S I) as 10^(−θχ_exc)/P_e with P_e ∝ g^(1/3);
  abundances [X/H] = [Fe/H] + [X/Fe] ([Mg/Fe], [Al/Fe] from the labels, Si/Ca/Ti/S follow an
  α-enhancement correlated with [Mg/Fe]);
* equivalent widths from a Voigt curve of growth (linear, saturated and damping parts), Doppler
  widths from temperature and microturbulence, pressure-broadened wings growing with log g;
* a Gaussian line core broadened by macroturbulence/rotation and the arm's resolving power, plus
  Lorentzian damping wings for strong lines (Ca II triplet, Paschen lines, strong Mg I and Fe I);
* radial-velocity residuals, a small continuum-normalisation error, photon noise at a drawn S/N
  with the matching inverse variance, and a few masked pixels (ivar = 0).

Labels come from a parametric Milky Way prior (thin disc, thick disc and halo [Mg/Fe]-[Fe/H]
sequences; giants, red clump, dwarfs and subgiants) or from a user's table of label sets.

Rows are made in fixed-size chunks, each from its own random stream keyed by (seed, chunk index), so
the same seed gives the same rows in the same order however many processes do the work.

Modules: :mod:`.spectra` (the physics), :mod:`.labels` (label prior), :mod:`.survey` (Parquet chunks),
:mod:`.fits` (the Gaia-ESO-like FITS layout), :mod:`.catalogue` (catalogue-scale label rows for
query benchmarks and tests).
"""

from .fits import FITS_SPECTRA_DIR, FITS_TRUTH_FILE, fits_truth_schema, write_fits, write_fits_chunk
from .labels import draw_labels, load_label_prior, resample_labels
from .spectra import LineList, load_line_list, microturbulence, synthesize
from .survey import SurveyConfig, iter_survey, simulate_chunk, survey_fields, survey_schema, write_parquet

__all__ = [
    "FITS_SPECTRA_DIR",
    "FITS_TRUTH_FILE",
    "LineList",
    "SurveyConfig",
    "draw_labels",
    "fits_truth_schema",
    "iter_survey",
    "load_label_prior",
    "load_line_list",
    "microturbulence",
    "resample_labels",
    "simulate_chunk",
    "survey_fields",
    "survey_schema",
    "synthesize",
    "write_fits",
    "write_fits_chunk",
    "write_parquet",
]
