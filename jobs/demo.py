"""The end-to-end demo: the README's commands, one after the other, on a small built-in survey.

Every step is a ``speclabel`` subcommand run through the same entry point as the shell (each is
printed before it runs, so a reader can repeat any of them), on one local Ray instance that the
steps share instead of starting their own:

1. ``simulate`` a training survey (Parquet) with a Gaia-ESO-style label catalogue beside it (FITS:
   CNAME, TEFF, E_TEFF, ..., absolute MG1 and AL1, nulls, PECULI), the same stars' noise-free
   spectra (``--noise-free``: the reference spectra of the label refinement) and a delivered release of FITS
   files, a tenth of them with a defect (``--defects``) and one then corrupted on purpose: the run
   must account for it;
2. ``ingest`` the FITS release into a spectra store;
3. ``train`` an ensemble on the training spectra with the labels of the label catalogue, joined by
   CNAME through a ``[labels]`` mapping and ``[selection]`` cuts (members in parallel, one Ray Train
   run each), with the reference spectra stored in the model;
4. ``label`` the stored release into the catalogue (Ray Data, ensemble + saliency, then the
   refinement of the labels against the reference spectra);
5. ``query`` the catalogue with a filter, and ``show`` a spectrum the screening flagged;
6. ``evaluate`` the catalogue against the release's true labels (report.md, metrics.json, figures).
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from speclabel.core.arrays import model_inputs, spectra_arrays
from speclabel.core.errors import SpeclabelError, UsageError
from speclabel.core.setups import get_setup
from speclabel.pipeline.ray_session import ray_session
from speclabel.pipeline.simulate.label_catalogue import label_mapping_toml

# Written into the output folder so that a rerun may clear what an earlier demo left there, and
# nothing else.
MARKER = ".speclabel-demo"
# A tenth of the delivered release gets a defect (a binary, emission, cosmic rays, a bad continuum,
# an arm from another star) for the screening to find; the evaluation reports how many it flagged.
DEFECT_FRACTION = 0.1


def run_demo(out: str, *, n: int, seed: int, members: int = 8, epochs: int = 15) -> int:
    from .cli import main

    out_dir = _fresh_output(Path(out))
    training, reference = out_dir / "train.parquet", out_dir / "reference.parquet"
    survey_labels, config = out_dir / "ges_labels.fits", out_dir / "model.toml"
    delivered = out_dir / "delivered" / "DEMO"
    store, model, catalogue = out_dir / "store", out_dir / "model", out_dir / "catalogue"
    report = out_dir / "report"
    n_release = max(n // 3, 4)
    steps: list[tuple[str, float]] = []

    def step(name: str, *argv: str) -> None:
        print(f"\n$ {shlex.join(['speclabel', name, *argv])}", flush=True)
        began = time.perf_counter()
        code = main([name, *argv])
        if code != 0:
            raise SpeclabelError(f"demo step 'speclabel {name}' failed (exit {code}); its output is above")
        steps.append((name, time.perf_counter() - began))

    step(
        "simulate",
        *("--n", str(n), "--seed", str(seed), "--release", "TRAIN", "--out", str(training)),
        *("--label-catalogue", str(survey_labels)),
    )
    # The training stars' noise-free spectra (same --seed): the reference spectra the label step
    # refines the labels with, as a synthetic grid at the training labels would be.
    step(
        "simulate",
        *("--n", str(n), "--seed", str(seed), "--release", "TRAIN", "--out", str(reference)),
        "--noise-free",
    )
    config.write_text(label_mapping_toml())
    print(f"(demo: {config.name} maps the catalogue's columns to the labels)\n{config.read_text()}")
    step(
        "simulate",
        *("--n", str(n_release), "--seed", str(seed + 1), "--release", "DEMO"),
        *("--format", "fits", "--out", str(delivered), "--defects", str(DEFECT_FRACTION)),
    )
    corrupted = _corrupt_one_file(delivered)
    print(f"(demo: truncated {corrupted.relative_to(out_dir)} to show what happens to a corrupt file)")
    plot = out_dir / "example_spectra.png"
    plot_example_spectra(pq.read_table(training), get_setup(), plot)

    # A Ray instance of its own ("local"), even where `ray start` runs one on this machine.
    with ray_session("local", state_api=True):  # the train step runs Ray Train
        step("ingest", str(delivered / "spectra"), "--out", str(store), "--release", "DEMO")
        step(
            "train",
            *("--data", str(training), "--out", str(model), "--config", str(config)),
            *("--label-catalogue", str(survey_labels), "--id-column", "CNAME"),
            *("--reference-spectra", str(reference)),
            *("--members", str(members), "--epochs", str(epochs), "--storage", str(out_dir / "runs")),
        )
        step("label", "--spectra", str(store), "--model", str(model), "--out", str(catalogue), "--quiet")
    step(
        "query",
        str(catalogue),
        *("--where", "logg < 3.5 and feh < -0.5", "--limit", "5"),
        *("--columns", "spectrum_id,teff,teff_cnn,teff_err,logg,feh,mgfe,alfe,snr"),
    )
    flagged = _flagged_example(catalogue)
    if flagged is not None:
        print(f"(demo: {flagged} is flagged anomalous_spectrum; drawing it against its model spectrum)")
        step("show", str(catalogue), flagged, "--spectra", str(store), "--out", str(out_dir / "flagged.png"))
    step(
        "evaluate",
        "--catalogue",
        str(catalogue),
        "--truth",
        str(delivered / "labels.parquet"),
        "--out",
        str(report),
    )

    print("\nspeclabel demo: done")
    print(f"{'step':<10} {'seconds':>8}")
    for name, seconds in steps:
        print(f"{name:<10} {seconds:>8.1f}")
    print(_accounting(catalogue))
    print(f"\noutputs under {out_dir}/: report/report.md (accuracy, calibration, saliency figures, the")
    print("screening of the injected defects), catalogue/ (the label catalogue), model/ (the ensemble),")
    print(f"store/ (the spectra store), {plot.name} (a giant and a dwarf of the training survey with the")
    shown = ", flagged.png (a flagged spectrum against its model spectrum)" if flagged else ""
    print(f"line windows){shown}.")
    print(f"Next: speclabel stats {catalogue}; speclabel query {catalogue} --where 'alfe > 0.2' --limit 10")
    return 0


def _fresh_output(out_dir: Path) -> Path:
    """``out_dir``, empty: created, or cleared when an earlier demo made it; anything else is refused."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).exists():
            raise UsageError(f"{out_dir} exists and was not made by the demo; give an empty or new --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("made by speclabel demo; the next demo run clears this folder\n")
    return out_dir


def _flagged_example(catalogue: Path) -> str | None:
    """The first labelled spectrum flagged anomalous_spectrum (lowest spectrum_id), if any."""
    from speclabel.pipeline.catalogue import Catalogue

    rows = Catalogue.open(str(catalogue)).query("has_flag(anomalous_spectrum)", columns=["spectrum_id"])
    ids = sorted(rows.column("spectrum_id").to_pylist())
    return ids[0] if ids else None


def _corrupt_one_file(delivered: Path) -> Path:
    """Cut one delivered FITS file short, as an interrupted transfer would."""
    victim = sorted(delivered.rglob("*.fits"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    return victim


def _accounting(catalogue: Path) -> str:
    """The label run's own account of its input, from its manifest."""
    manifests = sorted((catalogue / "_manifests").rglob("*.json"))
    counts = json.loads(manifests[-1].read_text()).get("counts", {}) if manifests else {}
    if not counts:
        return "(no label manifest found)"
    return (
        f"\nlabel accounting: {counts.get('rows_in')} spectra in = {counts.get('labelled')} labelled + "
        f"{counts.get('quarantined')} quarantined (ingest quarantined the corrupt file's star before that)"
    )


def plot_example_spectra(table, setup, path: Path) -> None:
    """A giant and a dwarf of the survey, both arms, line windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logg = table.column("logg").to_numpy()
    snr = table.column("snr").to_numpy()
    giant = int(np.argmax(np.where(logg < 3.0, snr, -1)))
    dwarf = int(np.argmax(np.where(logg > 4.0, snr, -1)))
    flux, _ = model_inputs(spectra_arrays(table.take([giant, dwarf]), setup), setup)
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
