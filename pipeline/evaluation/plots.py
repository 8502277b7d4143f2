"""The report's figures, each a function of an :class:`~.inputs.Evaluation` returning PNG bytes.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through pyplot:
no global state, no display, safe in any process. Point clouds switch to density (hexbin) plots above
``DENSITY_ABOVE`` points, so a catalogue of millions of rows still gives a readable figure.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from speclabel.core.labels import LABELS

from .inputs import Evaluation

DENSITY_ABOVE = 3000
DPI = 110
SYMBOLS = {label.name: label.symbol for label in LABELS}
UNITS = {label.name: label.unit for label in LABELS}
# Line-window groups in the colours the demo's spectra use; other groups take the next free colour.
GROUP_COLOURS = {
    "Mg I": "tab:green",
    "Al I": "tab:red",
    "Fe I": "0.55",
    "Ca II": "tab:purple",
    "H I": "tab:cyan",
}
SPARE_COLOURS = ("tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:blue")


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def symbol(label: str) -> str:
    return SYMBOLS.get(label, label)


def axis_label(label: str, prefix: str = "") -> str:
    unit = UNITS.get(label)
    return f"{prefix}{symbol(label)}" + (f" ({unit})" if unit and unit != "dex" else "")


def group_colours(groups) -> dict[str, str]:
    spare = iter(SPARE_COLOURS * 4)
    return {g: GROUP_COLOURS.get(g) or next(spare) for g in groups}


def _cloud(ax, x, y, *, colour=None, cmap="viridis", vmin=None, vmax=None, density_log=True):
    """Points (coloured by ``colour``) or, for many points, a hexbin of counts or of mean colour."""
    ok = np.isfinite(x) & np.isfinite(y)
    if colour is not None:
        ok &= np.isfinite(colour)
    x, y = x[ok], y[ok]
    colour = None if colour is None else colour[ok]
    if x.size > DENSITY_ABOVE:
        if colour is None:
            return ax.hexbin(
                x, y, gridsize=70, mincnt=1, cmap="Greys", norm=LogNorm() if density_log else None
            )
        return ax.hexbin(
            x, y, C=colour, reduce_C_function=np.mean, gridsize=70, mincnt=1, cmap=cmap, vmin=vmin, vmax=vmax
        )
    size = 12 if x.size < 300 else 5
    if colour is None:
        return ax.scatter(x, y, s=size, color="k", alpha=0.7, lw=0)
    return ax.scatter(x, y, c=colour, s=size, cmap=cmap, vmin=vmin, vmax=vmax, lw=0)


def one_to_one(ev: Evaluation, metrics: dict) -> bytes:
    """Predicted against true per label with 1:1 line, residual panel below; colour = S/N."""
    n = len(ev.labels)
    fig = Figure(figsize=(3.4 * n, 5.2), layout="constrained")
    grid = fig.add_gridspec(2, n, height_ratios=(3, 1.2))
    colour = ev.snr if ev.snr is not None and np.isfinite(ev.snr).any() else None
    vmin, vmax = _limits(colour, 2, 98) if colour is not None else (None, None)
    mappable = None
    for k, label in enumerate(ev.labels):
        true, predicted = ev.true[:, k], ev.predicted[:, k]
        top = fig.add_subplot(grid[0, k])
        bottom = fig.add_subplot(grid[1, k], sharex=top)
        mappable = _cloud(top, true, predicted, colour=colour, vmin=vmin, vmax=vmax) or mappable
        lo, hi = _limits(np.concatenate([true, predicted]), 0.5, 99.5, pad=0.05)
        top.plot([lo, hi], [lo, hi], color="tab:red", lw=1)
        top.set_xlim(lo, hi)
        top.set_ylim(lo, hi)
        top.set_title(symbol(label))
        top.set_ylabel(axis_label(label, "predicted "))
        m = metrics["all"][label]
        top.text(
            0.04,
            0.96,
            f"n = {m['n']}\nbias = {_g(m['bias'])}\nscatter = {_g(m['scatter'])}\n"
            f"robust = {_g(m['robust_scatter'])}",
            transform=top.transAxes,
            va="top",
            fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
        )
        _cloud(bottom, true, predicted - true, colour=colour, vmin=vmin, vmax=vmax)
        bottom.axhline(0.0, color="tab:red", lw=1)
        if m["scatter"] is not None and np.isfinite(m["scatter"]):
            for sign in (-1, 1):
                bottom.axhline(m["bias"] + sign * m["scatter"], color="tab:red", lw=0.8, ls="--")
        r_lo, r_hi = _limits(predicted - true, 1, 99, pad=0.15, symmetric=True)
        bottom.set_ylim(r_lo, r_hi)
        bottom.set_xlabel(axis_label(label, "true "))
        bottom.set_ylabel("pred. - true")
    if colour is not None and mappable is not None:
        fig.colorbar(mappable, ax=fig.axes, shrink=0.6, label="S/N")
    return png(fig)


def calibration(ev: Evaluation, metrics: dict) -> bytes | None:
    """|predicted - true| against the ensemble std, with the rms error in bins of std: on the
    1:1 line the internal precision is the actual error."""
    if ev.std is None:
        return None
    n = len(ev.labels)
    fig = Figure(figsize=(3.4 * n, 3.6), layout="constrained")
    for k, label in enumerate(ev.labels):
        ax = fig.add_subplot(1, n, k + 1)
        error = np.abs(ev.predicted[:, k] - ev.true[:, k])
        std = ev.std[:, k]
        ok = np.isfinite(error) & np.isfinite(std) & (std > 0)
        floor = np.percentile(error[ok & (error > 0)], 1) if (ok & (error > 0)).any() else 1e-6
        error_plotted = np.maximum(error, floor)
        _cloud(ax, np.log10(std), np.log10(error_plotted), density_log=True)
        if ok.sum() >= 10:
            edges = np.quantile(std[ok], np.linspace(0, 1, 9))
            which = np.clip(np.searchsorted(edges, std[ok], side="right") - 1, 0, 7)
            centres, rms = [], []
            for b in range(8):
                sel = which == b
                if sel.sum() >= 3:
                    centres.append(np.sqrt(np.mean(std[ok][sel] ** 2)))
                    rms.append(np.sqrt(np.mean(error[ok][sel] ** 2)))
            ax.plot(np.log10(centres), np.log10(rms), "o-", color="tab:orange", label="rms error in std bins")
        lo, hi = _limits(np.concatenate([np.log10(std[ok]), np.log10(error_plotted[ok])]), 1, 99.5, pad=0.05)
        ax.plot([lo, hi], [lo, hi], color="tab:red", lw=1, label="error = std")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        m = metrics["all"][label]
        ax.set_title(f"{symbol(label)}: std/error = {_g(m.get('std_ratio'))}", fontsize=10)
        ax.set_xlabel(f"log10 ensemble std{_unit_suffix(label)}")
        ax.set_ylabel(f"log10 |pred. - true|{_unit_suffix(label)}")
        if k == 0:
            ax.legend(fontsize=7, loc="upper left")
    return png(fig)


# z-scores beyond this are drawn in the outermost bins (an over-confident std gives z of 10 or more).
Z_LIMIT = 5.0


def error_calibration(ev: Evaluation, metrics: dict) -> bytes | None:
    """Per label, the histogram of z = (predicted - true) / uncertainty for the ensemble std (before)
    and the calibrated err (after), on the unit Gaussian that a calibrated uncertainty follows."""
    if ev.err is None:
        return None
    n = len(ev.labels)
    fig = Figure(figsize=(3.4 * n, 3.4), layout="constrained")
    edges = np.linspace(-Z_LIMIT, Z_LIMIT, 41)
    grid = np.linspace(-Z_LIMIT, Z_LIMIT, 201)
    for k, label in enumerate(ev.labels):
        ax = fig.add_subplot(1, n, k + 1)
        residual = ev.predicted[:, k] - ev.true[:, k]
        m = metrics["all"][label]
        for sigma, colour, name, within in (
            (None if ev.std is None else ev.std[:, k], "0.6", "ensemble std", m.get("frac_within_std")),
            (ev.err[:, k], "tab:blue", "calibrated err", m.get("frac_within_err")),
        ):
            if sigma is None:
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                z = residual / sigma
            z = np.clip(z[np.isfinite(z)], -Z_LIMIT, Z_LIMIT)
            if z.size:
                ax.hist(
                    z,
                    bins=edges,
                    density=True,
                    histtype="step",
                    lw=1.5,
                    color=colour,
                    label=f"{name}: {_g(within)} within 1",
                )
        ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), color="tab:red", lw=1, label="N(0, 1)")
        ax.set_xlim(-Z_LIMIT, Z_LIMIT)
        ax.set_title(f"{symbol(label)}: err/error = {_g(m.get('err_ratio'))}", fontsize=10)
        ax.set_xlabel("(pred. - true) / uncertainty")
        ax.legend(fontsize=6, loc="upper left")
    return png(fig)


def snr_trends(ev: Evaluation, metrics: dict, bins: list[str]) -> bytes | None:
    """Bias, scatter and robust scatter per S/N bin, one panel per label."""
    if not bins:
        return None
    n = len(ev.labels)
    fig = Figure(figsize=(3.4 * n, 3.4), layout="constrained")
    x = np.arange(len(bins))
    for k, label in enumerate(ev.labels):
        ax = fig.add_subplot(1, n, k + 1)
        for key, style, name in (
            ("scatter", "o-", "scatter"),
            ("robust_scatter", "s--", "robust scatter"),
            ("bias", "^:", "bias"),
        ):
            values = [_nan(metrics[b][label][key]) for b in bins]
            ax.plot(x, values, style, label=name)
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_xticks(x, [b.replace("snr", "S/N") for b in bins], rotation=30, fontsize=8)
        ax.set_title(symbol(label))
        ax.set_ylabel(f"pred. - true{_unit_suffix(label)}")
        if k == 0:
            ax.legend(fontsize=7)
    return png(fig)


def kiel(ev: Evaluation) -> bytes | None:
    """Teff-log g coloured by [Fe/H]: predicted next to truth, on the same axes and colours."""
    if not {"teff", "logg", "feh"} <= set(ev.labels):
        return None
    t, g, f = (ev.labels.index(n) for n in ("teff", "logg", "feh"))
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    vmin, vmax = _limits(ev.true[:, f], 2, 98)
    x_lo, x_hi = _limits(np.concatenate([ev.true[:, t], ev.predicted[:, t]]), 0.5, 99.5, pad=0.05)
    y_lo, y_hi = _limits(np.concatenate([ev.true[:, g], ev.predicted[:, g]]), 0.5, 99.5, pad=0.05)
    mappable = None
    for i, (values, title) in enumerate(((ev.predicted, "predicted"), (ev.true, "true"))):
        ax = fig.add_subplot(1, 2, i + 1)
        mappable = _cloud(
            ax, values[:, t], values[:, g], colour=values[:, f], cmap="plasma", vmin=vmin, vmax=vmax
        )
        ax.set_xlim(x_hi, x_lo)  # hot stars on the left, giants at the top, as astronomers draw it
        ax.set_ylim(y_hi, y_lo)
        ax.set_xlabel(axis_label("teff"))
        ax.set_ylabel(axis_label("logg"))
        ax.set_title(f"{title} labels (n = {ev.n})")
    fig.colorbar(mappable, ax=fig.axes, shrink=0.8, label=symbol("feh"))
    return png(fig)


def abundances(ev: Evaluation) -> bytes | None:
    """[Mg/Fe] and [Al/Fe] against [Fe/H], predicted next to truth (density for large samples)."""
    ratios = [n for n in ("mgfe", "alfe") if n in ev.labels]
    if "feh" not in ev.labels or not ratios:
        return None
    f = ev.labels.index("feh")
    fig = Figure(figsize=(10, 3.9 * len(ratios)), layout="constrained")
    x_lo, x_hi = _limits(np.concatenate([ev.true[:, f], ev.predicted[:, f]]), 0.5, 99.5, pad=0.05)
    for row, name in enumerate(ratios):
        k = ev.labels.index(name)
        y_lo, y_hi = _limits(np.concatenate([ev.true[:, k], ev.predicted[:, k]]), 0.5, 99.5, pad=0.08)
        for col, (values, title) in enumerate(((ev.predicted, "predicted"), (ev.true, "true"))):
            ax = fig.add_subplot(len(ratios), 2, 2 * row + col + 1)
            _cloud(ax, values[:, f], values[:, k])
            ax.axhline(0.0, color="0.7", lw=0.8, zorder=0)
            ax.set_xlim(x_lo, x_hi)
            ax.set_ylim(y_lo, y_hi)
            ax.set_xlabel(symbol("feh"))
            ax.set_ylabel(symbol(name))
            ax.set_title(f"{title} labels")
    return png(fig)


def saliency_maps(ev: Evaluation, saliency: dict) -> bytes | None:
    """The population-averaged d label / d flux per label against wavelength, one panel per arm,
    with the line windows of the setup shaded (Mg I, Al I, Fe I, Ca II, Paschen H I)."""
    if ev.saliency is None:
        return None
    setup = ev.setup
    mean = ev.saliency.mean
    colours = group_colours(setup.line_windows)
    n_arms = len(setup.arms)
    widths = [arm.wave_end - arm.wave_start for arm in setup.arms]
    fig = Figure(figsize=(15, 2.3 * len(ev.labels) + 0.8), layout="constrained")
    grid = fig.add_gridspec(len(ev.labels), n_arms, width_ratios=widths)
    for k, label in enumerate(ev.labels):
        entry = saliency["labels"].get(label, {})
        scale = np.max(np.abs(mean[k])) or 1.0
        for a, (arm, part) in enumerate(zip(setup.arms, setup.arm_slices.values(), strict=True)):
            ax = fig.add_subplot(grid[k, a])
            for group, windows in setup.line_windows.items():
                for lo, hi in windows:
                    if lo <= arm.wave_end and hi >= arm.wave_start:
                        ax.axvspan(lo, hi, color=colours[group], alpha=0.3, lw=0)
            ax.plot(arm.wave, mean[k, part], color="k", lw=0.5)
            ax.set_xlim(arm.wave_start, arm.wave_end)
            ax.set_ylim(-1.08 * scale, 1.08 * scale)
            if a == 0:
                ax.set_ylabel(f"d{symbol(label)}/d flux", fontsize=9)
            else:
                ax.tick_params(labelleft=False)
            if k == 0:
                ax.set_title(f"{arm.name} (R = {arm.resolution:.0f})")
            if k == len(ev.labels) - 1:
                ax.set_xlabel(f"wavelength ({setup.medium}, Å)")
            if a == n_arms - 1 and entry.get("own_share") is not None:
                ax.text(
                    0.99,
                    0.92,
                    f"{_g(entry['own_share'])} of |gradient| in {', '.join(entry['own_groups'])}",
                    transform=ax.transAxes,
                    ha="right",
                    va="top",
                    fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
                )
    handles = [Patch(color=colours[g], alpha=0.3, label=g) for g in setup.line_windows]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    return png(fig)


def saliency_shares(ev: Evaluation, saliency: dict) -> bytes | None:
    """Per label, the share of |gradient| in each line-window group next to the share of pixels the
    group covers: a label read from its own lines has its own groups far above their pixel share."""
    labels = [n for n in ev.labels if n in saliency["labels"]]
    if not labels:
        return None
    groups = list(ev.setup.line_windows)
    colours = group_colours(groups)
    fig = Figure(figsize=(2.0 + 1.6 * len(labels), 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(groups)
    for g, group in enumerate(groups):
        x = np.arange(len(labels)) - 0.4 + (g + 0.5) * width
        shares = [_nan(saliency["labels"][n]["group_shares"].get(group)) for n in labels]
        ax.bar(x, shares, width, color=colours[group], label=group)
        fraction = saliency["pixel_fractions"].get(group)
        ax.plot(x, [_nan(fraction)] * len(labels), "_", color="k", ms=10, mew=1.5)
    ax.plot([], [], "_", color="k", ms=10, mew=1.5, label="share of pixels")
    ticks = [f"{symbol(n)}\nown: {', '.join(saliency['labels'][n]['own_groups']) or '-'}" for n in labels]
    ax.set_xticks(np.arange(len(labels)), ticks, fontsize=8)
    heights = [_nan(v) for n in labels for v in saliency["labels"][n]["group_shares"].values()]
    heights += list(saliency["pixel_fractions"].values())
    tallest = float(np.nanmax(heights)) if np.isfinite(heights).any() else 1.0
    ax.set_ylim(0, min(1.0, 1.15 * tallest) or 1.0)
    ax.set_ylabel("share of |d label / d flux|")
    ax.set_title(f"where each label is read ({saliency['method_text']})", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    return png(fig)


def _limits(values, lo_pct, hi_pct, *, pad=0.0, symmetric=False) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return -1.0, 1.0
    lo, hi = np.percentile(values, [lo_pct, hi_pct])
    if symmetric:
        hi = max(abs(lo), abs(hi))
        lo = -hi
    span = hi - lo or abs(hi) or 1.0
    return float(lo - pad * span), float(hi + pad * span)


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def _g(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.3g}"


def _unit_suffix(label: str) -> str:
    unit = UNITS.get(label)
    return f" ({unit})" if unit else ""
