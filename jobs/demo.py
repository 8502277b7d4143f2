"""The end-to-end demo: every stage of speclabel on a small built-in survey, in one process tree."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..pipeline import contract
from ..pipeline.setups import get_setup
from ..pipeline.simulate import SurveyConfig, write_parquet


def run_demo(out: str, *, n: int, seed: int) -> int:
    out_dir = Path(out)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    setup = get_setup()
    steps: list[tuple[str, float, str]] = []

    start = time.perf_counter()
    survey = out_dir / "survey.parquet"
    rows = write_parquet(str(survey), setup, SurveyConfig(n=n, seed=seed, release="DEMO"))
    steps.append(("simulate", time.perf_counter() - start, f"{rows} spectra -> {survey}"))

    start = time.perf_counter()
    table = pq.read_table(survey)
    reasons = contract.validate(table, setup, labelled=True)
    bad = int(sum(r is not None for r in reasons))
    steps.append(("validate", time.perf_counter() - start, f"{rows - bad} good, {bad} quarantined"))

    start = time.perf_counter()
    spectra_png = plots / "example_spectra.png"
    plot_example_spectra(table, setup, spectra_png)
    steps.append(("plot", time.perf_counter() - start, str(spectra_png)))

    print("\nspeclabel demo")
    print(f"{'step':<10} {'seconds':>8}  result")
    for name, seconds, result in steps:
        print(f"{name:<10} {seconds:>8.1f}  {result}")
    print("\nsurvey labels (5th / 50th / 95th percentile)")
    for label in contract.LABELS:
        values = table.column(label.name).to_numpy()
        p5, p50, p95 = np.percentile(values, [5, 50, 95])
        print(f"  {label.name:<5} {p5:9.2f} {p50:9.2f} {p95:9.2f}  {label.unit}")
    return 0


def plot_example_spectra(table, setup, path: Path) -> None:
    """A giant and a dwarf of the survey, both arms, line windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logg = table.column("logg").to_numpy()
    snr = table.column("snr").to_numpy()
    giant = int(np.argmax(np.where(logg < 3.0, snr, -1)))
    dwarf = int(np.argmax(np.where(logg > 4.0, snr, -1)))
    flux, _ = contract.model_inputs(contract.spectra_arrays(table.take([giant, dwarf]), setup), setup)
    colours = {
        "Mg I": "tab:green",
        "Al I": "tab:red",
        "Fe I": "0.85",
        "Ca II": "tab:purple",
        "H I": "tab:cyan",
    }
    fig, axes = plt.subplots(len(setup.arms), 1, figsize=(12, 3.2 * len(setup.arms)))
    for ax, arm, part in zip(np.atleast_1d(axes), setup.arms, setup.arm_slices.values(), strict=True):
        for group, windows in setup.line_windows.items():
            inside = [(lo, hi) for lo, hi in windows if arm.wave_start <= hi and lo <= arm.wave_end]
            for k, (lo, hi) in enumerate(inside):
                colour = colours.get(group, "0.9")
                ax.axvspan(lo, hi, color=colour, alpha=0.35, lw=0, label=group if k == 0 else None)
        for row, i, kind in ((flux[0], giant, "giant"), (flux[1], dwarf, "dwarf")):
            description = (
                f"{kind}: Teff {table.column('teff')[i].as_py():.0f} K, log g {logg[i]:.2f}, "
                f"[Fe/H] {table.column('feh')[i].as_py():+.2f}, S/N {snr[i]:.0f}"
            )
            ax.plot(arm.wave, row[part], lw=0.5, label=description)
        ax.set_xlim(arm.wave_start, arm.wave_end)
        ax.set_ylim(0.0, 1.15)
        ax.set_title(f"{setup.name}: {arm.name} (R = {arm.resolution:.0f})")
        ax.set_ylabel("normalised flux")
    axes[-1].set_xlabel(f"wavelength ({setup.medium}, Å)")
    for ax in np.atleast_1d(axes):
        ax.legend(loc="lower left", fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
