"""pipeline.evaluation.plots: every figure is a PNG of the expected size with the expected panels."""

import io

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection

from speclabel.core.labels import LABEL_NAMES
from speclabel.model.saliency import SaliencyAccumulator
from speclabel.pipeline.evaluation import Evaluation, evaluation_document
from speclabel.pipeline.evaluation import plots as P

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _evaluation(
    setup, n=80, *, labels=LABEL_NAMES, std=True, snr=True, saliency=True, seed=0, err=False
) -> Evaluation:
    rng = np.random.default_rng(seed)
    centre = {"teff": 5000.0, "logg": 3.0, "feh": -0.4, "mgfe": 0.1, "alfe": 0.05}
    spread = {"teff": 600.0, "logg": 1.0, "feh": 0.5, "mgfe": 0.1, "alfe": 0.1}
    true = np.column_stack([rng.normal(centre[k], spread[k], n) for k in labels])
    noise = np.array([spread[k] for k in labels]) * 0.1
    predicted = true + rng.normal(0, 1, true.shape) * noise
    accumulator = None
    if saliency:
        accumulator = SaliencyAccumulator.empty(len(labels), setup.n_pixels)
        accumulator.add(rng.normal(0, 1, (5, len(labels), setup.n_pixels)))
    return Evaluation(
        labels=tuple(labels),
        spectrum_id=np.array([f"s{i}" for i in range(n)]),
        predicted=predicted,
        true=true,
        std=np.abs(rng.normal(0, 1, true.shape)) * noise if std else None,
        snr=rng.uniform(5, 150, n) if snr else None,
        setup=setup,
        source={"kind": "test"},
        rows={"matched": n},
        saliency=accumulator,
        err=np.full(true.shape, noise) if err else None,
    )


@pytest.fixture
def figures(monkeypatch):
    """Each Figure as it is rendered, so that its panels can be checked beside the PNG it became."""
    drawn = []
    render = P.png

    def keep(fig):
        drawn.append(fig)
        return render(fig)

    monkeypatch.setattr(P, "png", keep)
    return drawn


def _check_png(data: bytes, fig) -> None:
    """The bytes are a PNG that opens, of the figure's size at the report's resolution."""
    assert data[:8] == PNG_SIGNATURE
    image = mpimg.imread(io.BytesIO(data), format="png")
    width, height = fig.get_size_inches() * P.DPI
    assert image.shape == (round(height), round(width), 4)
    assert image[..., :3].std() > 0.05  # something was drawn


def _panels(fig):
    """The plotting axes (colour bars left out) and the colour bars."""
    colourbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    return [ax for ax in fig.axes if ax not in colourbars], colourbars


def test_one_to_one_has_a_panel_and_a_residual_panel_per_label(tiny_setup, figures):
    ev = _evaluation(tiny_setup)
    metrics = evaluation_document(ev)["metrics"]
    data = P.one_to_one(ev, metrics)
    (fig,) = figures
    _check_png(data, fig)
    panels, colourbars = _panels(fig)
    assert len(panels) == 2 * len(LABEL_NAMES) and len(colourbars) == 1
    assert colourbars[0].get_ylabel() == "S/N"
    tops, bottoms = panels[0::2], panels[1::2]
    assert [ax.get_title() for ax in tops] == [P.symbol(k) for k in LABEL_NAMES]
    assert (
        tops[0].get_ylabel() == r"predicted $T_\mathrm{eff}$ (K)"
        and tops[2].get_ylabel() == "predicted [Fe/H]"
    )
    assert [ax.get_xlabel() for ax in bottoms] == [P.axis_label(k, "true ") for k in LABEL_NAMES]
    assert all(ax.get_ylabel() == "pred. - true" for ax in bottoms)
    text = tops[1].texts[0].get_text()
    assert text.startswith(f"n = {ev.n}\n") and f"bias = {metrics['all']['logg']['bias']:.3g}" in text
    # Without S/N there is nothing to colour by: no colour bar.
    figures.clear()
    P.one_to_one(_evaluation(tiny_setup, snr=False), metrics)
    assert _panels(figures[0])[1] == []


def test_calibration_has_one_panel_per_label_and_needs_the_std(tiny_setup, figures):
    ev = _evaluation(tiny_setup)
    metrics = evaluation_document(ev)["metrics"]
    _check_png(P.calibration(ev, metrics), figures[0])
    panels, _ = _panels(figures[0])
    assert len(panels) == len(LABEL_NAMES)
    ratio = metrics["all"]["feh"]["std_ratio"]
    assert panels[2].get_title() == f"[Fe/H]: std/error = {ratio:.3g}"
    assert (
        panels[0].get_xlabel() == "log10 ensemble std (K)"
        and panels[2].get_ylabel() == "log10 |pred. - true| (dex)"
    )
    assert [t.get_text() for t in panels[0].get_legend().get_texts()] == [
        "rms error in std bins",
        "error = std",
    ]
    assert P.calibration(_evaluation(tiny_setup, std=False), metrics) is None


def test_error_calibration_histograms_z_before_and_after(tiny_setup, figures):
    ev = _evaluation(tiny_setup, err=True)
    metrics = evaluation_document(ev)["metrics"]
    _check_png(P.error_calibration(ev, metrics), figures[0])
    panels, _ = _panels(figures[0])
    assert len(panels) == len(LABEL_NAMES)
    m = metrics["all"]["feh"]
    assert panels[2].get_title() == f"[Fe/H]: err/error = {m['err_ratio']:.3g}"
    assert [t.get_text() for t in panels[2].get_legend().get_texts()] == [
        f"ensemble std: {m['frac_within_std']:.3g} within 1",
        f"calibrated err: {m['frac_within_err']:.3g} within 1",
        "N(0, 1)",
    ]
    # the "after" histogram is of (pred - true) / err: err = the noise, so z is unit Gaussian here
    heights, _ = np.histogram(
        np.clip((ev.predicted[:, 2] - ev.true[:, 2]) / ev.err[:, 2], -P.Z_LIMIT, P.Z_LIMIT),
        bins=np.linspace(-P.Z_LIMIT, P.Z_LIMIT, 41),
        density=True,
    )
    after = panels[2].patches[1].get_xy()  # the step outline: (edge, height) pairs
    np.testing.assert_allclose(np.unique(after[:, 1])[1:], np.unique(heights[heights > 0]), rtol=1e-6)
    assert P.error_calibration(_evaluation(tiny_setup), metrics) is None


def test_snr_trends_have_three_curves_per_label(tiny_setup, figures):
    ev = _evaluation(tiny_setup, n=300)
    document = evaluation_document(ev)
    cuts = {f"snr>={c:g}" for c in document["snr"]["cuts"]}  # the report's rule: bins, not cuts
    bins = [k for k in document["snr"]["selections"] if k not in cuts]
    assert bins == ["snr<20", "20<=snr<50", "50<=snr<100", "snr>=100"]
    _check_png(P.snr_trends(ev, document["metrics"], bins), figures[0])
    panels, _ = _panels(figures[0])
    assert len(panels) == len(LABEL_NAMES)
    assert [line.get_label() for line in panels[0].get_lines()[:3]] == ["scatter", "robust scatter", "bias"]
    scatter = panels[3].get_lines()[0].get_ydata()
    assert np.allclose(scatter, [document["metrics"][b]["mgfe"]["scatter"] for b in bins])
    assert [t.get_text() for t in panels[0].get_xticklabels()] == [b.replace("snr", "S/N") for b in bins]
    assert P.snr_trends(ev, document["metrics"], []) is None


def test_kiel_diagram_draws_predicted_and_true_with_hot_stars_left(tiny_setup, figures):
    ev = _evaluation(tiny_setup)
    _check_png(P.kiel(ev), figures[0])
    panels, colourbars = _panels(figures[0])
    assert [ax.get_title() for ax in panels] == [
        f"predicted labels (n = {ev.n})",
        f"true labels (n = {ev.n})",
    ]
    assert all(ax.get_xlabel() == r"$T_\mathrm{eff}$ (K)" and ax.get_ylabel() == r"$\log g$" for ax in panels)
    assert all(ax.get_xlim()[0] > ax.get_xlim()[1] and ax.get_ylim()[0] > ax.get_ylim()[1] for ax in panels)
    assert colourbars[0].get_ylabel() == "[Fe/H]"
    assert P.kiel(_evaluation(tiny_setup, labels=("teff", "feh"))) is None


def test_abundance_planes_per_ratio_present(tiny_setup, figures):
    _check_png(P.abundances(_evaluation(tiny_setup)), figures[0])
    panels, _ = _panels(figures[0])
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in panels] == [
        ("[Fe/H]", "[Mg/Fe]"),
        ("[Fe/H]", "[Mg/Fe]"),
        ("[Fe/H]", "[Al/Fe]"),
        ("[Fe/H]", "[Al/Fe]"),
    ]
    figures.clear()
    P.abundances(_evaluation(tiny_setup, labels=("feh", "mgfe")))
    assert len(_panels(figures[0])[0]) == 2
    assert P.abundances(_evaluation(tiny_setup, labels=("teff", "mgfe"))) is None


def test_saliency_maps_have_a_panel_per_label_and_arm(tiny_setup, figures):
    ev = _evaluation(tiny_setup)
    saliency = evaluation_document(ev)["saliency"]
    _check_png(P.saliency_maps(ev, saliency), figures[0])
    panels, _ = _panels(figures[0])
    arms = tiny_setup.arms
    assert len(panels) == len(LABEL_NAMES) * len(arms)
    assert [ax.get_title() for ax in panels[: len(arms)]] == [
        f"{a.name} (R = {a.resolution:.0f})" for a in arms
    ]
    assert [ax.get_ylabel() for ax in panels[:: len(arms)]] == [f"d{P.symbol(k)}/d flux" for k in LABEL_NAMES]
    # The plotted curve is the population mean of the label's maps over that arm's pixels.
    blue = tiny_setup.arm_slices[arms[0].name]
    np.testing.assert_allclose(panels[2 * len(arms)].get_lines()[0].get_ydata(), ev.saliency.mean[2, blue])
    assert [t.get_text() for t in figures[0].legends[0].get_texts()] == list(tiny_setup.line_windows)
    assert P.saliency_maps(_evaluation(tiny_setup, saliency=False), saliency) is None


def test_saliency_shares_draw_a_bar_per_group_and_label(tiny_setup, figures):
    ev = _evaluation(tiny_setup)
    saliency = evaluation_document(ev)["saliency"]
    _check_png(P.saliency_shares(ev, saliency), figures[0])
    (ax,) = _panels(figures[0])[0]
    groups = list(tiny_setup.line_windows)
    assert len(ax.patches) == len(groups) * len(LABEL_NAMES)
    heights = [p.get_height() for p in ax.patches[: len(LABEL_NAMES)]]  # the first group's bars
    assert np.allclose(heights, [saliency["labels"][k]["group_shares"][groups[0]] for k in LABEL_NAMES])
    assert ax.get_ylabel() == "share of |d label / d flux|"
    assert P.saliency_shares(ev, {**saliency, "labels": {}}) is None


def test_large_samples_are_drawn_as_density(tiny_setup, figures, monkeypatch):
    ev = _evaluation(tiny_setup, n=200, saliency=False)
    P.abundances(ev)
    assert isinstance(_panels(figures[0])[0][0].collections[0], PathCollection)
    monkeypatch.setattr(P, "DENSITY_ABOVE", 100)
    figures.clear()
    P.abundances(ev)
    assert isinstance(_panels(figures[0])[0][0].collections[0], PolyCollection)  # a hexbin
