"""One star of a catalogue drawn against its model: ``speclabel show``.

What a scientist opens first when a label looks wrong: the observed spectrum, the model spectrum at
the row's labels (the model directory's forward model, ``model/forward.py``), the residual in units
of sigma, and the row's saliency maps where the run stored them, one block of panels per arm with
the setup's line windows shaded. The row's run manifest says where its model and its spectra were
(``model.location``, ``input.location``, written by the label job); ``model`` and ``spectra``
override them (a spectra store from ``speclabel ingest`` or contract Parquet files).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from speclabel.core.arrays import spectra_arrays
from speclabel.core.errors import InputError, IntegrityError
from speclabel.core.flags import Flag
from speclabel.core.setups import Setup

from ..catalogue import Catalogue
from ..labelling.batch import MAP_PREFIX
from ..labelling.inputs import input_files
from .plots import group_colours, png, symbol

PANELS = ("flux", "residual", "saliency")


@dataclass
class StarView:
    """Everything the figure shows of one catalogue row."""

    row: dict  # the catalogue row (labels, _std, _err, flags, chi2, model_id, release)
    setup: Setup
    flux: np.ndarray  # [P] observed flux on the setup's concatenated grid
    ivar: np.ndarray | None  # [P], None where the spectra carry no ivar
    model_flux: np.ndarray | None  # [P] ForwardModel.flux at the row's labels; None: no forward model
    label_names: tuple[str, ...]
    saliency: dict[str, np.ndarray] = field(default_factory=dict)  # label -> [P] map
    notes: list[str] = field(default_factory=list)  # what could not be drawn, and why

    @property
    def panels(self) -> tuple[str, ...]:
        shown = {"flux": True, "residual": self.model_flux is not None, "saliency": bool(self.saliency)}
        return tuple(p for p in PANELS if shown[p])

    def residual(self) -> np.ndarray:
        """observed - model, times sqrt(ivar) where ivar is known; NaN on masked pixels."""
        diff = self.flux.astype(np.float64) - self.model_flux
        if self.ivar is None:
            return diff
        good = (self.ivar > 0) & np.isfinite(self.ivar) & np.isfinite(self.flux)
        return np.where(good, diff * np.sqrt(np.where(good, self.ivar, 0.0)), np.nan)


def catalogue_row(
    cat: Catalogue, spectrum_id: str, release: str | None = None, model_id: str | None = None
) -> dict:
    """The one labelled row of ``spectrum_id`` (clear errors when it is absent, quarantined or in
    several releases and no ``release`` chooses)."""
    found = cat.lookup([spectrum_id], releases=[release] if release else None, model_id=model_id)
    rows = found.to_pylist()
    labelled = [r for r in rows if r["status"] == "labelled"]
    if not labelled:
        row = rows[0]
        if row["status"] == "quarantined":
            raise InputError(
                f"spectrum {spectrum_id!r} was quarantined in release {row['release']} "
                f"({row['reason']}: {row['detail']}), not labelled"
            )
        where = f"release {release}" if release else f"releases {cat.releases()}"
        raise InputError(f"no spectrum_id {spectrum_id!r} in the catalogue {cat.dataset.root} ({where})")
    if len(labelled) > 1:
        raise InputError(
            f"spectrum {spectrum_id!r} is labelled in releases {[r['release'] for r in labelled]}: "
            "choose one with --release"
        )
    return labelled[0]


def run_manifest(cat: Catalogue, release: str, model_id: str | None = None) -> dict:
    """The manifest of the run the row was read from (the live run, or the latest with ``model_id``)."""
    (run,) = cat.runs([release], model_id)
    return cat.dataset.manifest(release, run.run_id)


def read_spectrum(location: str, spectrum_id: str, setup: Setup) -> pa.Table:
    """The row of ``spectrum_id`` in a spectra store or contract Parquet file(s) at ``location``."""
    fs, files = input_files(location)
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    wanted = [c for a in setup.arms for c in (a.flux_column, a.ivar_column) if c in dataset.schema.names]
    missing = [a.flux_column for a in setup.arms if a.flux_column not in wanted]
    if missing:
        raise InputError(f"the spectra at {location} have no columns {missing} of setup {setup.name!r}")
    table = dataset.to_table(columns=["spectrum_id", *wanted], filter=pc.field("spectrum_id") == spectrum_id)
    if table.num_rows == 0:
        raise InputError(f"spectrum {spectrum_id!r} not found in the spectra at {location}")
    return table.slice(0, 1)


def star_view(
    catalogue: str,
    spectrum_id: str,
    *,
    spectra: str | None = None,
    model: str | None = None,
    release: str | None = None,
    model_id: str | None = None,
) -> StarView:
    """Gather a row, its spectrum, its model spectrum and its saliency maps (see the module docstring)."""
    from speclabel.model.io import load_model

    cat = Catalogue.open(catalogue)
    row = catalogue_row(cat, spectrum_id, release, model_id)
    manifest = run_manifest(cat, row["release"], model_id)
    recorded_model = model is None
    model = model or manifest.get("model", {}).get("location")
    if not model:
        raise InputError(
            f"the run {row['run_id']} of release {row['release']} does not record its model directory: "
            "pass --model DIR"
        )
    try:
        ensemble = load_model(model)
    except IntegrityError as exc:
        if not recorded_model:
            raise
        raise IntegrityError(f"{exc} (the model directory the label run recorded; --model DIR)") from exc
    if row.get("model_id") and ensemble.model_id != row["model_id"]:
        raise IntegrityError(
            f"the model at {model} is {ensemble.model_id}, but {spectrum_id!r} was labelled by "
            f"{row['model_id']}: pass the model directory it was labelled with (--model DIR)"
        )
    spectra_given = spectra is not None
    spectra = spectra or manifest.get("input", {}).get("location")
    if not spectra:
        raise InputError(
            f"the run {row['run_id']} of release {row['release']} does not record its input: pass --spectra"
        )
    setup = ensemble.setup
    try:
        table = read_spectrum(spectra, spectrum_id, setup)
    except InputError as exc:
        if spectra_given:
            raise
        raise InputError(f"{exc} (the input the label run recorded; --spectra STORE_OR_PARQUET)") from exc
    arrays = spectra_arrays(table, setup)
    flux = np.concatenate([arrays.flux[a.name][0] for a in setup.arms])
    has_ivar = all(arrays.ivar[a.name] is not None for a in setup.arms)
    ivar = np.concatenate([arrays.ivar[a.name][0] for a in setup.arms]) if has_ivar else None
    labels = np.array([[row[name] for name in ensemble.label_names]], dtype=np.float64)
    notes = []
    model_flux = None
    if ensemble.forward is None:
        notes.append(f"model {ensemble.model_id} has no forward model: no model spectrum or residual drawn")
    elif not np.isfinite(labels).all():
        notes.append("the row has null labels: no model spectrum or residual drawn")
    else:
        model_flux = ensemble.forward.flux(labels)[0]
    joined = cat.join_saliency(pa.Table.from_pylist([row]), model_id).to_pylist()[0]
    saliency = {
        name: np.asarray(joined[f"{MAP_PREFIX}{name}"], dtype=np.float64)
        for name in ensemble.label_names
        if joined.get(f"{MAP_PREFIX}{name}") is not None
        and len(joined[f"{MAP_PREFIX}{name}"]) == setup.n_pixels
    }
    return StarView(row, setup, flux, ivar, model_flux, tuple(ensemble.label_names), saliency, notes)


def title(view: StarView) -> str:
    row = view.row
    parts = []
    for name in view.label_names:
        text = f"{symbol(name)} = {_g(row.get(name))} ± {_g(row.get(f'{name}_std'))}"
        if row.get(f"{name}_err") is not None:
            text += f" (err {_g(row[f'{name}_err'])})"
        parts.append(text)
    flags = Flag(int(row.get("flags") or 0))
    names = [f.name.lower() for f in Flag if f in flags]
    arms = [f"{a.name} {_g(row[f'chi2_{a.name}'])}" for a in view.setup.arms if f"chi2_{a.name}" in row]
    chi2 = "no χ²"
    if "chi2" in row:
        chi2 = f"χ² {_g(row['chi2'])}" + (f" ({', '.join(arms)})" if arms else "")
    head = f"{row['spectrum_id']}  (release {row['release']}, model {row.get('model_id')})"
    lines = [head, "   ".join(parts), f"{chi2}   flags: {', '.join(names) or 'none'}", *view.notes]
    return "\n".join(lines)


def figure(view: StarView) -> Figure:
    """One block of panels (flux + model, residual, saliency) per arm, line windows shaded."""
    setup, panels = view.setup, view.panels
    heights = {"flux": 2.0, "residual": 1.0, "saliency": 1.0}
    colours = group_colours(setup.line_windows)
    ratios = [heights[p] for p in panels] * len(setup.arms)
    fig = Figure(figsize=(15, 1.6 * sum(ratios) + 1.6), layout="constrained")
    grid = fig.add_gridspec(len(ratios), 1, height_ratios=ratios)
    residual = view.residual() if view.model_flux is not None else None
    sigma_units = view.ivar is not None
    for a, (arm, part) in enumerate(zip(setup.arms, setup.arm_slices.values(), strict=True)):
        first = None
        for p, panel in enumerate(panels):
            ax = fig.add_subplot(grid[a * len(panels) + p, 0], sharex=first)
            first = first or ax
            for group, windows in setup.line_windows.items():
                for lo, hi in windows:
                    if lo <= arm.wave_end and hi >= arm.wave_start:
                        ax.axvspan(lo, hi, color=colours[group], alpha=0.25, lw=0)
            wave = arm.wave
            if panel == "flux":
                ax.plot(wave, view.flux[part], color="k", lw=0.6, label="observed", gid="observed")
                if view.model_flux is not None:
                    ax.plot(wave, view.model_flux[part], color="tab:red", lw=0.8, label="model", gid="model")
                ax.set_ylabel("flux")
                ax.set_title(f"{arm.name} (R = {arm.resolution:.0f})", fontsize=9, loc="left")
                ax.legend(loc="lower right", fontsize=7)
            elif panel == "residual":
                ax.plot(wave, residual[part], color="k", lw=0.5, gid="residual")
                ax.axhline(0.0, color="tab:red", lw=0.6)
                ax.set_ylabel("(obs − model)/σ" if sigma_units else "obs − model", fontsize=8)
            else:
                for name, values in view.saliency.items():
                    scale = np.nanmax(np.abs(values)) or 1.0
                    ax.plot(wave, values[part] / scale, lw=0.6, label=symbol(name), gid=f"saliency_{name}")
                ax.set_ylabel("saliency / max", fontsize=8)
                ax.legend(loc="lower right", fontsize=7, ncol=len(view.saliency))
            ax.set_xlim(arm.wave_start, arm.wave_end)
            if p < len(panels) - 1:
                ax.tick_params(labelbottom=False)
        ax.set_xlabel(f"wavelength ({setup.medium}, Å)")
    fig.suptitle(title(view), fontsize=9)
    handles = [Patch(color=colours[g], alpha=0.25, label=g) for g in setup.line_windows]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    return fig


def show_png(view: StarView) -> bytes:
    return png(figure(view))


def _g(value) -> str:
    return "null" if value is None or not np.isfinite(value) else f"{value:.4g}"
