"""The built-in synthetic survey: stellar spectra on a setup's grids with true labels.

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

Labels come from a parametric Milky Way prior (thin disc, thick disc and halo [Mg/Fe]-[Fe/H]
sequences; giants, red clump, dwarfs and subgiants) or from a user's table of label sets.

Rows are made in fixed-size chunks, each from its own random stream keyed by (seed, chunk index), so
the same seed gives the same rows in the same order however many processes do the work.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.special import wofz

from .contract import LABEL_NAMES, arm_matrix, spectra_schema
from .errors import ConfigError, InputError
from .fits_formats import write_wcs1d
from .setups import SPEED_OF_LIGHT_KMS, Setup
from .storage import atomic_output, filesystem_and_path, join, write_bytes_atomic

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
    "Y": (6.217, 88.906, 2.21, "feh"),
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


# --------------------------------------------------------------------------------------------------
# Labels: a parametric Milky Way prior, or resampling of a user's table of label sets


def draw_labels(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Labels from a parametric Milky Way prior for a Gaia-ESO-like target selection.

    Populations: thin disc (68 %), thick disc (24 %), halo (8 %), each with its [Fe/H] distribution
    and [Mg/Fe]-[Fe/H] sequence (low-α thin disc, high-α thick disc with its knee near [Fe/H] = -0.6,
    α-enhanced halo); [Al/Fe] correlates with [Mg/Fe]. Evolutionary states: red giant branch (38 %),
    red clump (18 %), main sequence (32 %) and subgiants (12 %), with Teff shifting hotter at low
    metallicity as isochrones do.
    """
    population = rng.choice(3, size=n, p=[0.68, 0.24, 0.08])
    feh = np.select(
        [population == 0, population == 1],
        [rng.normal(-0.08, 0.22, n), rng.normal(-0.55, 0.25, n)],
        rng.normal(-1.35, 0.40, n),
    )
    feh = np.clip(feh, -2.3, 0.5)
    knee = np.clip((feh + 0.6) / 0.7, 0.0, 1.0)
    mgfe = np.select(
        [population == 0, population == 1],
        [
            0.03 - 0.12 * np.clip(feh, -0.8, 0.4) + rng.normal(0, 0.035, n),
            0.31 - 0.15 * knee + rng.normal(0, 0.04, n),
        ],
        0.28 + rng.normal(0, 0.07, n),
    )
    alfe = 0.75 * mgfe - 0.02 + 0.08 * np.clip(feh, -1.0, 0.3) + rng.normal(0, 0.06, n)
    alfe = np.where(feh < -1.0, alfe - 0.12 * (-1.0 - feh), alfe)
    alpha = 0.8 * mgfe + rng.normal(0, 0.03, n)

    state = rng.choice(4, size=n, p=[0.38, 0.18, 0.32, 0.12])
    metal_shift = -220.0 * feh  # metal-poor isochrones are hotter
    rgb_logg = rng.uniform(1.0, 3.5, n)
    rgb_teff = 4600.0 + 330.0 * (rgb_logg - 2.5) + metal_shift + rng.normal(0, 70, n)
    clump_logg = rng.normal(2.45, 0.12, n)
    clump_teff = 4750.0 + 0.6 * metal_shift + rng.normal(0, 90, n)
    ms_teff = rng.uniform(4700.0, 6600.0, n) + 0.5 * metal_shift
    ms_logg = 4.62 - 2.4e-4 * (ms_teff - 4700.0) + rng.normal(0, 0.08, n)
    sg_logg = rng.uniform(3.5, 4.1, n)
    sg_teff = 5100.0 + 900.0 * (sg_logg - 3.5) + 0.5 * metal_shift + rng.normal(0, 120, n)
    teff = np.choose(state, [rgb_teff, clump_teff, ms_teff, sg_teff])
    logg = np.choose(state, [rgb_logg, clump_logg, ms_logg, sg_logg])
    teff, logg = np.clip(teff, 3900.0, 6900.0), np.clip(logg, 0.8, 4.9)

    vbroad = np.where(logg > 3.5, 4.0 + 4.0 * np.clip((teff - 5500.0) / 1000.0, 0, 1.5), 5.0)
    vbroad = np.clip(vbroad + rng.normal(0, 1.0, n), 2.0, 14.0)
    return {
        "teff": teff,
        "logg": logg,
        "feh": feh,
        "mgfe": mgfe,
        "alfe": alfe,
        "alpha": alpha,
        "vmic": microturbulence(teff, logg),
        "vbroad": vbroad,
    }


# Column names accepted in a label-prior table (case-insensitive), e.g. the APOGEE DR16 sets of
# Guiglion et al. (2020): Teff, logg, FeH, MgFe, AlFe, alphaM.
_PRIOR_COLUMNS = {
    "teff": "teff",
    "logg": "logg",
    "feh": "feh",
    "fe_h": "feh",
    "mgfe": "mgfe",
    "mg_fe": "mgfe",
    "alfe": "alfe",
    "al_fe": "alfe",
    "alpham": "alpha",
    "alpha_m": "alpha",
}
_PRIOR_JITTER = {"teff": 40.0, "logg": 0.08, "feh": 0.04, "mgfe": 0.03, "alfe": 0.04, "alpha": 0.03}


def load_label_prior(path: str) -> dict[str, np.ndarray]:
    """A table of label sets (CSV or Parquet) to resample labels from."""
    try:
        if path.endswith(".parquet"):
            table = pq.read_table(path).to_pydict()
        else:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            table = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    except (OSError, ValueError, IndexError) as exc:
        raise InputError(f"cannot read label prior {path!r}: {exc}") from exc
    prior = {}
    for column, values in table.items():
        key = _PRIOR_COLUMNS.get(column.lower())
        if key:
            prior[key] = np.asarray(values, dtype=np.float64)
    missing = [k for k in LABEL_NAMES if k not in prior]
    if missing:
        raise InputError(f"label prior {path!r} lacks columns for {missing} (has {list(table)})")
    good = np.all([np.isfinite(v) for v in prior.values()], axis=0)
    return {k: v[good] for k, v in prior.items()}


def resample_labels(rng: np.random.Generator, n: int, prior: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pick = rng.integers(0, prior["teff"].size, n)
    out = {k: prior[k][pick] + rng.normal(0, _PRIOR_JITTER[k], n) for k in prior}
    out.setdefault("alpha", 0.8 * out["mgfe"] + rng.normal(0, 0.03, n))
    out["teff"] = np.clip(out["teff"], 3500.0, 7500.0)
    out["logg"] = np.clip(out["logg"], 0.0, 5.2)
    out["vmic"] = microturbulence(out["teff"], out["logg"])
    out["vbroad"] = np.clip(rng.normal(5.0, 1.2, n), 2.0, 14.0)
    return out


# --------------------------------------------------------------------------------------------------
# The survey: footprint, noise, chunks


@dataclass(frozen=True)
class SurveyConfig:
    n: int
    seed: int = 0
    snr_range: tuple[float, float] = (10.0, 150.0)
    release: str = "SIM"
    chunk_size: int = 500
    masked_fraction: float = 0.003
    rv_residual_kms: float = 1.0
    continuum_error: float = 0.002
    n_fields: int = 60
    label_prior: str | None = None

    def __post_init__(self) -> None:
        if self.n < 0 or self.chunk_size < 1:
            raise ConfigError("n must be >= 0 and chunk_size >= 1")
        lo, hi = self.snr_range
        if not 0 < lo <= hi:
            raise ConfigError(f"snr range must satisfy 0 < A <= B, got {self.snr_range}")

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)


def survey_fields(seed: int, n_fields: int) -> tuple[np.ndarray, np.ndarray]:
    """Field centres (deg) of a southern-sky fibre survey: a fixed set per seed, denser near the plane."""
    rng = np.random.default_rng([seed, 0xF1E1D])
    ra = rng.uniform(0.0, 360.0, n_fields)
    dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-80.0)), np.sin(np.radians(15.0)), n_fields)))
    return ra, dec


def _cname(ra: float, dec: float) -> str:
    """Gaia-ESO style coordinate name, e.g. 12345678-1234567."""
    h = ra / 15.0
    hh, mm = int(h), int((h % 1) * 60)
    ss = ((h * 60) % 1) * 60
    sign = "-" if dec < 0 else "+"
    d = abs(dec)
    dd, dm = int(d), int((d % 1) * 60)
    ds = ((d * 60) % 1) * 60
    return f"{hh:02d}{mm:02d}{int(ss * 100):04d}{sign}{dd:02d}{dm:02d}{int(ds * 10):03d}"


def simulate_chunk(setup: Setup, config: SurveyConfig, chunk: int, prior: dict | None = None) -> pa.Table:
    """Rows ``chunk * chunk_size ...`` of the survey, always the same for the same (seed, chunk)."""
    start = chunk * config.chunk_size
    n = min(config.chunk_size, config.n - start)
    rng = np.random.default_rng([config.seed, chunk])
    labels = resample_labels(rng, n, prior) if prior is not None else draw_labels(rng, n)
    labels["rv"] = rng.normal(0.0, config.rv_residual_kms, n)
    flux = synthesize(setup, labels)

    lo, hi = config.snr_range
    snr = np.exp(rng.uniform(np.log(lo), np.log(hi), n))  # log-uniform, as survey S/N distributions
    columns: dict[str, pa.Array] = {}
    for i, (arm, part) in enumerate(zip(setup.arms, setup.arm_slices.values(), strict=True)):
        # The first arm has the catalogued S/N; red arms of fibre spectrographs scatter around it.
        arm_snr = snr if i == 0 else snr * rng.uniform(0.8, 1.6, n)
        x = np.linspace(-1.0, 1.0, arm.n_pixels)
        tilt = rng.normal(0, config.continuum_error, (n, 3))
        continuum = 1.0 + tilt[:, :1] + tilt[:, 1:2] * x + tilt[:, 2:3] * (x**2 - 1 / 3)
        model = np.maximum(flux[:, part] * continuum, 0.02)
        sigma = np.sqrt(model) / arm_snr[:, None]  # photon noise, continuum S/N = arm_snr
        observed = model + sigma * rng.standard_normal(model.shape, dtype=np.float32)
        ivar = (1.0 / sigma**2).astype(np.float32)
        ivar[rng.random(model.shape) < config.masked_fraction] = 0.0
        columns[arm.flux_column] = _fixed_list(observed.astype(np.float32))
        columns[arm.ivar_column] = _fixed_list(ivar)

    field_ra, field_dec = survey_fields(config.seed, config.n_fields)
    field = rng.integers(0, config.n_fields, n)
    radius = 0.2 * np.sqrt(rng.random(n))  # GIRAFFE/FLAMES field of view: 25 arcmin across
    angle = rng.uniform(0, 2 * np.pi, n)
    dec = np.clip(field_dec[field] + radius * np.sin(angle), -89.9, 89.9)
    ra = (field_ra[field] + radius * np.cos(angle) / np.cos(np.radians(dec))) % 360.0

    columns["spectrum_id"] = pa.array([f"{config.release}-{start + k:08d}" for k in range(n)], pa.string())
    columns["ra"] = pa.array(ra, pa.float64())
    columns["dec"] = pa.array(dec, pa.float64())
    columns["snr"] = pa.array(snr.astype(np.float32))
    columns["object"] = pa.array([_cname(r, d) for r, d in zip(ra, dec, strict=True)], pa.string())
    columns["release"] = pa.array([config.release] * n, pa.string())
    for name in LABEL_NAMES:
        columns[name] = pa.array(labels[name].astype(np.float32))
    schema = survey_schema(setup)
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def survey_schema(setup: Setup) -> pa.Schema:
    return spectra_schema(setup, labelled=True)


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _chunk_worker(args) -> pa.Table:
    setup, config, chunk, prior, then = args
    table = simulate_chunk(setup, config, chunk, prior)
    return table if then is None else then(table, chunk)


def iter_survey(
    setup: Setup,
    config: SurveyConfig,
    workers: int | None = None,
    then: Callable[[pa.Table, int], pa.Table] | None = None,
) -> Iterator[pa.Table]:
    """The survey's chunks in order; ``workers`` > 1 makes them in parallel processes.

    ``then(table, chunk)``, a picklable function, runs on each chunk in the worker that made it (the
    FITS writer uses it to write files in parallel) and its result is yielded instead.
    """
    prior = load_label_prior(config.label_prior) if config.label_prior else None
    tasks = [(setup, config, chunk, prior, then) for chunk in range(config.n_chunks)]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    if workers <= 1:
        yield from map(_chunk_worker, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        # map() keeps order, so output is identical to the serial path; at most 2x workers chunks
        # are in flight, which bounds memory whatever n is.
        pending = []
        for task in tasks:
            pending.append(pool.submit(_chunk_worker, task))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def write_parquet(location: str, setup: Setup, config: SurveyConfig, workers: int | None = None) -> int:
    """Write the survey as one Parquet file, one row group per chunk, published atomically.

    Memory stays flat whatever ``config.n``: chunks stream from the workers into the writer.
    """
    fs, path = filesystem_and_path(location)
    schema = survey_schema(setup)
    rows = 0
    with atomic_output(fs, path) as out, pq.ParquetWriter(out, schema) as writer:
        for table in iter_survey(setup, config, workers):
            writer.write_table(table, row_group_size=config.chunk_size)
            rows += table.num_rows
    return rows


# --------------------------------------------------------------------------------------------------
# FITS output: the Gaia-ESO-like 1-D image layout that ``speclabel ingest`` reads (fits_formats.wcs1d)

FITS_RV_DISPERSION_KMS = 40.0  # heliocentric radial velocities of disc and halo stars
FITS_TRUTH_FILE = "labels.parquet"
FITS_SPECTRA_DIR = "spectra"


def fits_truth_schema() -> pa.Schema:
    """The label table beside the FITS files, keyed by the id ingest gives each star (its CNAME)."""
    fields = [
        pa.field("spectrum_id", pa.string(), nullable=False),
        pa.field("object", pa.string()),
        pa.field("ra", pa.float64()),
        pa.field("dec", pa.float64()),
        pa.field("snr", pa.float32()),
        pa.field("vrad", pa.float64()),
        pa.field("release", pa.string()),
    ]
    return pa.schema(fields + [pa.field(name, pa.float32()) for name in LABEL_NAMES])


def write_fits_chunk(
    location: str, setup: Setup, config: SurveyConfig, table: pa.Table, chunk: int
) -> pa.Table:
    """Write one chunk as one FITS file per star and arm; return its rows of the truth table.

    Each spectrum is written in the observed (barycentric) frame of a drawn radial velocity: the
    rest-frame grid scaled by (1 + v/c), which is still linear, so the flux needs no resampling and
    ingest's rest-frame shift recovers the setup's grid exactly. The header's SNR is the catalogued
    S/N for the first arm and the median flux/σ of the others.
    """
    fs, root = filesystem_and_path(location)
    rng = np.random.default_rng([config.seed, chunk, 0xF175])
    vrad = rng.normal(0.0, FITS_RV_DISPERSION_KMS, table.num_rows)
    ids = table.column("spectrum_id").to_pylist()
    cnames = table.column("object").to_pylist()
    ra, dec = table.column("ra").to_pylist(), table.column("dec").to_pylist()
    snr = table.column("snr").to_pylist()
    for index, arm in enumerate(setup.arms):
        flux, _ = arm_matrix(table.column(arm.flux_column), arm.n_pixels)
        ivar, _ = arm_matrix(table.column(arm.ivar_column), arm.n_pixels)
        with np.errstate(divide="ignore"):
            sigma = np.where(ivar > 0, 1.0 / np.sqrt(ivar), 0.0)
        for k in range(table.num_rows):
            good = ivar[k] > 0
            arm_snr = snr[k] if index == 0 else float(np.median(flux[k][good] / sigma[k][good]))
            scale = 1.0 + vrad[k] / SPEED_OF_LIGHT_KMS
            cards = {
                "OBJECT": ids[k],
                "CNAME": cnames[k],
                "RA": (ra[k], "[deg] ICRS"),
                "DEC": (dec[k], "[deg] ICRS"),
                "SETUP": arm.name.upper(),
                "SNR": (round(float(arm_snr), 3), "median signal-to-noise"),
                "VRAD": (float(vrad[k]), "[km/s] heliocentric radial velocity"),
                "SPECSYS": "BARYCENT",
                "SPEC_RES": arm.resolution,
                "CONTNORM": (True, "continuum normalised"),
                "ORIGIN": "speclabel simulate",
            }
            data = write_wcs1d(
                flux[k],
                sigma[k],
                wave_start=arm.wave_start * scale,
                wave_step=arm.wave_step * scale,
                medium=setup.medium,
                cards=cards,
            )
            path = join(root, FITS_SPECTRA_DIR, f"{chunk:05d}", f"{ids[k]}_{arm.name}.fits")
            write_bytes_atomic(fs, path, data)
    columns = {
        "spectrum_id": table.column("object"),
        "object": table.column("spectrum_id"),
        "ra": table.column("ra"),
        "dec": table.column("dec"),
        "snr": table.column("snr"),
        "vrad": pa.array(vrad, pa.float64()),
        "release": table.column("release"),
        **{name: table.column(name) for name in LABEL_NAMES},
    }
    schema = fits_truth_schema()
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def write_fits(location: str, setup: Setup, config: SurveyConfig, workers: int | None = None) -> int:
    """Write the survey as FITS files under ``location/spectra/<chunk>/`` plus ``location/labels.parquet``.

    The workers write their chunks' FITS files themselves; only the small truth tables come back,
    so memory stays flat whatever ``config.n``.
    """
    fs, root = filesystem_and_path(location)
    writer_fn = partial(write_fits_chunk, location, setup, config)
    rows = 0
    with (
        atomic_output(fs, join(root, FITS_TRUTH_FILE)) as out,
        pq.ParquetWriter(out, fits_truth_schema()) as writer,
    ):
        for truth in iter_survey(setup, config, workers, then=writer_fn):
            writer.write_table(truth)
            rows += truth.num_rows
    return rows
