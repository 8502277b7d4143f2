"""Synthetic spectra: a curve-of-growth simulator that responds to the labels as real spectra do.

Not a radiative-transfer code, but a curve-of-growth simulator that responds to the labels the way
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
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np
from scipy.special import wofz

from speclabel.core.setups import SPEED_OF_LIGHT_KMS, Setup

# Elements: ionisation energy (eV), atomic mass (u), solar abundance A(X) (Grevesse et al. 2007),
# and which abundance ratio drives them.
ELEMENTS: dict[str, tuple[float, float, float, str]] = {
    "H": (13.598, 1.008, 12.00, "none"),
    "N": (14.534, 14.007, 7.78, "feh"),
    "Mg": (7.646, 24.305, 7.53, "mgfe"),
    "Al": (5.986, 26.982, 6.37, "alfe"),
    "Si": (8.152, 28.086, 7.51, "alpha"),
    "S": (10.360, 32.06, 7.14, "alpha"),
    "Ca": (6.113, 40.078, 6.31, "alpha"),
    "Sc": (6.561, 44.956, 3.17, "feh"),
    "Ti": (6.828, 47.867, 4.90, "alpha"),
    "Cr": (6.767, 51.996, 5.64, "feh"),
    "Mn": (7.434, 54.938, 5.39, "feh"),
    "Fe": (7.902, 55.845, 7.45, "feh"),
    "Ni": (7.640, 58.693, 6.23, "feh"),
    "Sr": (5.695, 87.62, 2.92, "feh"),
    "Y": (6.217, 88.906, 2.21, "feh"),
    "Ba": (5.212, 137.327, 2.17, "feh"),
}

# Zero points of log10(line-centre optical depth), one per line class, calibrated so that solar
# equivalent widths come out near observed ones (Fe I 5522 ~ 40 mA, Fe II 5534 ~ 60 mA,
# Ca II 8542 ~ 3.5 A, Paschen 12 ~ 0.2 A).
LOG_TAU_ZERO = {"neutral_of_ionised": 5.115, "ion": 6.058, "neutral_majority": 5.6}
SUN_THETA = 5040.0 / 5772.0
STARK_HWHM = 1.2  # Angstrom, Paschen lines of a log g = 4.4 dwarf
MAX_LINE_DEPTH = 0.85  # cores of saturated lines do not reach zero flux (source function > 0)
BOLTZMANN_KMS2 = 0.0165  # 2kT/m_u in (km/s)^2 per K, so v_th^2 = 0.0165 T / A


@dataclass(frozen=True)
class LineList:
    wave: np.ndarray
    species: np.ndarray
    chi_exc: np.ndarray
    loggf: np.ndarray
    log_damping: np.ndarray

    def within(self, lo: float, hi: float) -> LineList:
        keep = (self.wave >= lo) & (self.wave <= hi)
        return LineList(
            *(getattr(self, f)[keep] for f in ("wave", "species", "chi_exc", "loggf", "log_damping"))
        )


@cache
def load_line_list() -> LineList:
    text = (resources.files(__package__) / "data" / "lines.csv").read_text()
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    return LineList(
        wave=np.array([float(r["wave_air"]) for r in rows]),
        species=np.array([r["species"] for r in rows]),
        chi_exc=np.array([float(r["chi_exc"]) for r in rows]),
        loggf=np.array([float(r["loggf"]) for r in rows]),
        log_damping=np.array([float(r["damping"]) for r in rows]),
    )


@cache
def _curve_of_growth_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W / Δλ_D = ∫ (1 − exp(−τ0 H(a, v))) dv on a grid of log τ0 and log a (slab model)."""
    log_tau = np.linspace(-4.0, 9.0, 131)
    log_a = np.linspace(-4.0, 1.0, 26)
    v = np.concatenate([-np.logspace(4, -3, 700), [0.0], np.logspace(-3, 4, 700)])
    table = np.empty((log_a.size, log_tau.size))
    for i, a in enumerate(10.0**log_a):
        h = wofz(v + 1j * a).real
        h /= wofz(1j * a).real  # τ0 is the optical depth at line centre
        absorbed = -np.expm1(-np.outer(10.0**log_tau, h))
        table[i] = np.trapezoid(absorbed, v, axis=1)
    return log_tau, log_a, table


def curve_of_growth(log_tau0: np.ndarray, log_a: np.ndarray) -> np.ndarray:
    """Reduced equivalent width W/Δλ_D, bilinear in (log a, log τ0) on a precomputed table."""
    grid_tau, grid_a, table = _curve_of_growth_table()
    t = np.clip((log_tau0 - grid_tau[0]) / (grid_tau[1] - grid_tau[0]), 0, grid_tau.size - 1.000001)
    s = np.clip((log_a - grid_a[0]) / (grid_a[1] - grid_a[0]), 0, grid_a.size - 1.000001)
    ti, si = t.astype(int), s.astype(int)
    ft, fs = t - ti, s - si
    low = table[si, ti] * (1 - ft) + table[si, ti + 1] * ft
    high = table[si + 1, ti] * (1 - ft) + table[si + 1, ti + 1] * ft
    weak = np.sqrt(np.pi) * 10.0**log_tau0  # below the table the curve of growth is linear
    return np.where(log_tau0 < grid_tau[0], weak, low * (1 - fs) + high * fs)


def _line_class(species: str) -> tuple[str, str]:
    element, stage = species.split()
    chi_ion = ELEMENTS[element][0]
    if stage != "I":
        return element, "ion"
    return element, ("neutral_majority" if chi_ion > 10.0 else "neutral_of_ionised")


def log_electron_pressure(teff: np.ndarray, logg: np.ndarray, feh: np.ndarray) -> np.ndarray:
    """log P_e at continuum-forming depth, relative to the Sun: metals donate the electrons."""
    theta = 5040.0 / teff
    return (logg - 4.44) / 3.0 + 0.5 * feh - 3.75 * (theta - SUN_THETA)


def microturbulence(teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
    """km/s; a smooth Gaia-ESO-like relation: ~1 km/s in dwarfs, ~1.6 km/s in luminous giants."""
    return np.clip(1.05 + 2.5e-4 * (teff - 5500.0) - 0.15 * (logg - 4.0), 0.6, 2.2)


def line_parameters(
    lines: LineList, labels: dict[str, np.ndarray], resolution_of_line: np.ndarray
) -> dict[str, np.ndarray]:
    """Per (star, line): centre, equivalent widths of core and wings, core sigma, wing HWHM (Angstrom)."""
    teff, logg, feh = labels["teff"][:, None], labels["logg"][:, None], labels["feh"][:, None]
    theta = 5040.0 / teff
    log_pe = log_electron_pressure(teff, logg, feh)
    ratios = {
        "feh": np.zeros_like(feh),
        "mgfe": labels["mgfe"][:, None],
        "alfe": labels["alfe"][:, None],
        "alpha": labels["alpha"][:, None],
        "none": None,
    }
    n_lines = lines.wave.size
    log_tau0 = np.empty((teff.shape[0], n_lines))
    mass = np.empty(n_lines)
    for j, species in enumerate(lines.species):
        element, kind = _line_class(species)
        chi_ion, mass[j], a_sun, driver = ELEMENTS[element]
        x_h = 0.0 if driver == "none" else feh + ratios[driver]
        base = LOG_TAU_ZERO[kind] + lines.loggf[j] + a_sun - 7.45 + x_h
        # H⁻ continuum opacity ∝ P_e θ^2.5 10^(0.75θ); Saha puts the same P_e θ^2.5 into the neutral
        # fraction of a mostly-ionised element, so only ions and mostly-neutral species keep them.
        continuum = 0.75 * (theta - SUN_THETA)
        if kind == "neutral_of_ionised":
            log_tau0[:, j] = (base + (theta - SUN_THETA) * chi_ion - theta * lines.chi_exc[j] - continuum)[
                :, 0
            ]
        else:
            log_tau0[:, j] = (
                base - theta * lines.chi_exc[j] - log_pe - continuum - 2.5 * np.log10(theta / SUN_THETA)
            )[:, 0]
    vmic = labels["vmic"][:, None]
    doppler_kms = np.sqrt(BOLTZMANN_KMS2 * teff / mass[None, :] + vmic**2)
    centre = lines.wave[None, :] * (1.0 + labels["rv"][:, None] / SPEED_OF_LIGHT_KMS)
    doppler = lines.wave[None, :] * doppler_kms / SPEED_OF_LIGHT_KMS  # Δλ_D, Angstrom
    log_a = lines.log_damping[None, :] + 0.3 * (logg - 4.4)
    width_total = doppler * curve_of_growth(log_tau0, log_a)
    width_core = doppler * curve_of_growth(log_tau0, np.full_like(log_a, -4.0))
    width_core = np.minimum(width_core, width_total)
    # Hydrogen lines are Stark broadened far beyond their Doppler core: all of their width is wing,
    # a Lorentzian of ~1 A half width in dwarfs that narrows with the lower electron density of giants.
    hydrogen = lines.species == "H I"
    width_core[:, hydrogen] = 0.0
    # The intrinsic core widens as the line saturates (flat part of the curve of growth).
    core_intrinsic = (
        doppler / np.sqrt(2.0) * np.sqrt(np.maximum(1.0, np.log(np.maximum(10.0**log_tau0, 1.0))))
    )
    broadening = lines.wave[None, :] * labels["vbroad"][:, None] / SPEED_OF_LIGHT_KMS / 2.3548
    instrument = lines.wave[None, :] / resolution_of_line[None, :] / 2.3548
    sigma = np.sqrt(core_intrinsic**2 + broadening**2 + instrument**2)
    # Damping wings: where τ(Δλ) = τ0 a / (√π v²) falls to 1, a Lorentzian of that half width.
    wing_hwhm = doppler * np.sqrt(10.0 ** (log_tau0 + log_a) / np.sqrt(np.pi))
    wing_hwhm[:, hydrogen] = np.broadcast_to(STARK_HWHM * 10.0 ** (0.25 * (logg - 4.4)), wing_hwhm.shape)[
        :, hydrogen
    ]
    return {
        "centre": centre,
        "width_core": width_core,
        "width_wing": width_total - width_core,
        "sigma": sigma,
        "wing_hwhm": np.maximum(wing_hwhm, sigma),
    }


def synthesize(setup: Setup, labels: dict[str, np.ndarray]) -> np.ndarray:
    """Noise-free normalised flux, ``(n_stars, setup.n_pixels)`` float32.

    ``labels`` holds arrays for teff, logg, feh, mgfe, alfe, alpha (the [X/Fe] of Si, S, Ca, Ti),
    vmic, vbroad (km/s, Gaussian FWHM of macroturbulence/rotation) and rv (km/s, residual velocity).
    """
    n = labels["teff"].shape[0]
    out = np.empty((n, setup.n_pixels), dtype=np.float32)
    for arm, part in zip(setup.arms, setup.arm_slices.values(), strict=True):
        lines = load_line_list().within(arm.wave_start - 40.0, arm.wave_end + 40.0)
        if lines.wave.size == 0:
            out[:, part] = 1.0
            continue
        params = line_parameters(lines, labels, np.full(lines.wave.size, arm.resolution))
        transmission = np.ones((n, arm.n_pixels), dtype=np.float64)
        for j in range(lines.wave.size):
            reach = max(
                6.0 * params["sigma"][:, j].max(),
                30.0 * params["wing_hwhm"][:, j].max() * (params["width_wing"][:, j].max() > 1e-3),
            )
            lo = max(0, int(np.floor((lines.wave[j] - reach - arm.wave_start) / arm.wave_step)))
            hi = min(arm.n_pixels, int(np.ceil((lines.wave[j] + reach - arm.wave_start) / arm.wave_step)) + 1)
            if lo >= hi:
                continue
            dl = arm.wave[lo:hi][None, :] - params["centre"][:, j, None]
            sigma = params["sigma"][:, j, None]
            gamma = params["wing_hwhm"][:, j, None]
            depth = (
                params["width_core"][:, j, None]
                / (np.sqrt(2 * np.pi) * sigma)
                * np.exp(-0.5 * (dl / sigma) ** 2)
            )
            depth += params["width_wing"][:, j, None] * gamma / np.pi / (dl**2 + gamma**2)
            # Soft cap: weak lines add linearly, saturated cores level off below zero flux.
            depth = depth / (1.0 + (depth / MAX_LINE_DEPTH) ** 4) ** 0.25
            transmission[:, lo:hi] *= 1.0 - depth
        out[:, part] = transmission
    return out
