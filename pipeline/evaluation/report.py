"""The validation report: ``metrics.json`` with every number, ``report.md`` and its PNG figures.

:func:`evaluation_document` computes every number of the report from an :class:`~.inputs.Evaluation`
(``model.metrics`` for accuracy and calibration, the saliency sums for where labels are read);
:func:`render_markdown` writes ``report.md`` from that document alone, so the report can show no
number that ``metrics.json`` lacks; :func:`write_report` draws the figures and publishes the folder
atomically (a reader sees the previous report or the new one, never a mix).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass

import numpy as np

from speclabel.core.errors import InputError
from speclabel.core.flags import Flag
from speclabel.core.labels import LABELS
from speclabel.core.storage import exists, filesystem_and_path, join, read_json, write_folder_atomic
from speclabel.model.metrics import (
    GAUSSIAN_WITHIN_1_SIGMA,
    GAUSSIAN_WITHIN_2_SIGMA,
    label_metrics,
    metrics_by_snr,
)

from . import embedding_map, plots
from .inputs import Evaluation

FORMAT = "speclabel-evaluation"
FORMAT_VERSION = 1
METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
QUARANTINE = "quarantine.parquet"
UNITS = {label.name: label.unit for label in LABELS}


@dataclass(frozen=True)
class ReportOptions:
    """S/N selections of the report: ``snr_cuts`` (rows at or above each) and the inner edges of the
    S/N bins (``snr_edges`` 20 50 100 gives <20, 20-50, 50-100, >=100)."""

    snr_cuts: tuple[float, ...] = (50.0,)
    snr_edges: tuple[float, ...] = (20.0, 50.0, 100.0)


def evaluation_document(ev: Evaluation, options: ReportOptions = ReportOptions()) -> dict:
    """Every number of the report (NaN where a number is undefined, e.g. the scatter of one row)."""
    from speclabel.model.io import speclabel_version

    snr = ev.snr if ev.snr is not None and np.isfinite(ev.snr).any() else None
    metrics = metrics_by_snr(
        ev.predicted,
        ev.true,
        ev.labels,
        snr,
        std=ev.std,
        err=calibrated_err(ev),
        snr_cuts=options.snr_cuts,
        snr_edges=options.snr_edges,
    )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "speclabel_version": speclabel_version(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": ev.source,
        "rows": ev.rows,
        "labels": list(ev.labels),
        "units": {n: UNITS.get(n, "") for n in ev.labels},
        "snr": {
            "available": snr is not None,
            "cuts": list(options.snr_cuts),
            "edges": list(options.snr_edges),
            "selections": [k for k in metrics if k != "all"],
        },
        "metrics": metrics,
        "calibration_reference": {
            "frac_within_std_gaussian": GAUSSIAN_WITHIN_1_SIGMA,
            "frac_within_2std_gaussian": GAUSSIAN_WITHIN_2_SIGMA,
        },
        "saliency": saliency_section(ev),
        "ood": ood_section(ev),
        "screening": screening_section(ev),
        "refinement": refinement_section(ev, snr, options),
        "embedding_map": embedding_map.map_section(ev),
        "figures": {},
    }


def calibrated_err(ev: Evaluation) -> np.ndarray | None:
    """The evaluation's calibrated err where any row has one (a catalogue labelled by a model
    without a calibration has all-null ``<label>_err``: nothing to report)."""
    return ev.err if ev.err is not None and np.isfinite(ev.err).any() else None


def ood_section(ev: Evaluation) -> dict | None:
    """How the evaluated spectra score against the training set (model/ood.py): uniform on 0-100 and
    about 1 % above a 99th-percentile threshold for spectra like the training spectra."""
    if ev.ood_score is None or not np.isfinite(ev.ood_score).any():
        return None
    scores = ev.ood_score[np.isfinite(ev.ood_score)]
    flagged = int(((ev.flags & Flag.OUT_OF_DISTRIBUTION) != 0).sum()) if ev.flags is not None else None
    return {
        "n": int(scores.size),
        "mean_score": float(scores.mean()),
        "percentiles": {str(p): float(np.percentile(scores, p)) for p in (10, 50, 90, 99)},
        "flagged_out_of_distribution": flagged,
        "flagged_fraction": flagged / scores.size if flagged is not None else None,
    }


def refinement_section(ev: Evaluation, snr: np.ndarray | None, options: ReportOptions) -> dict | None:
    """The refined labels against the network's on the same spectra (model/refine.py): per refined
    label the metrics of both, over all rows and at each S/N cut. None where nothing was refined."""
    if ev.network is None:
        return None
    refined = [k for k, _ in enumerate(ev.labels) if np.isfinite(ev.network[:, k]).any()]
    names = [ev.labels[k] for k in refined]
    selections = {"all": np.ones(ev.n, dtype=bool)}
    if snr is not None:
        selections |= {f"snr>={cut:g}": snr >= cut for cut in options.snr_cuts}
    return {
        "labels": names,
        "refined": {
            key: label_metrics(ev.predicted[rows][:, refined], ev.true[rows][:, refined], names)
            for key, rows in selections.items()
        },
        "network": {
            key: label_metrics(ev.network[rows][:, refined], ev.true[rows][:, refined], names)
            for key, rows in selections.items()
        },
    }


# The flags of the screening (issue: a spectrum that is itself odd): what a defect should raise.
SCREENING_FLAGS = Flag.ANOMALOUS_SPECTRUM | Flag.OUT_OF_DISTRIBUTION
FLAGGED_EXAMPLES = 5


def screening_section(ev: Evaluation) -> dict | None:
    """How many spectra the screening flagged (anomalous_spectrum, out_of_distribution), a few of
    their ids to open with ``speclabel show``, and, where the truth says which spectra were given a
    defect (``speclabel simulate --defects``), the share of each kind flagged and the false-flag
    rate on the clean ones. None for rows without flags."""
    if ev.flags is None:
        return None
    anomalous = (ev.flags & Flag.ANOMALOUS_SPECTRUM) != 0
    screened = (ev.flags & SCREENING_FLAGS) != 0
    section = {
        "n": ev.n,
        "anomalous_spectrum": int(anomalous.sum()),
        "out_of_distribution": int(((ev.flags & Flag.OUT_OF_DISTRIBUTION) != 0).sum()),
        "examples": [str(i) for i in ev.spectrum_id[screened][:FLAGGED_EXAMPLES]],
        "defects": None,
    }
    if ev.defect is not None:
        kind = np.array(["clean" if k is None else str(k) for k in ev.defect], dtype=object)
        order = [*sorted(set(kind) - {"clean"}), "clean"]
        section["defects"] = {
            name: {
                "n": int((kind == name).sum()),
                "anomalous_spectrum": int((anomalous & (kind == name)).sum()),
                "flagged": int((screened & (kind == name)).sum()),
            }
            for name in order
        }
    return section


def saliency_section(ev: Evaluation) -> dict | None:
    """Share of |d label / d flux| in each line-window group and in each label's own lines.

    From population sums: (sum over stars and window pixels of |gradient|) / (sum over stars and all
    pixels). From catalogue summary columns only: the mean over stars of each star's share. Beside
    each share, the share of the grid's pixels the windows cover: what a label blind to lines gets.
    """
    setup = ev.setup
    masks = setup.window_masks()
    pixel_fractions = {g: float(m.mean()) for g, m in masks.items()}
    if ev.saliency is not None:
        sum_abs = ev.saliency.sum_abs
        method = "population"
        method_text = f"population sums over {ev.saliency.count} spectra"
    elif ev.saliency_row_shares:
        method = "row_mean"
        method_text = "mean of per-spectrum shares (catalogue summary columns)"
    else:
        return None
    labels = {}
    for k, label in enumerate(ev.labels):
        own = list(setup.label_lines.get(label, ()))
        own_mask = setup.label_line_mask(label)
        entry: dict = {"own_groups": own, "own_pixel_fraction": float(own_mask.mean()) if own else None}
        if method == "population":
            entry["group_shares"] = {g: _share(sum_abs[k], m) for g, m in masks.items()}
            entry["own_share"] = _share(sum_abs[k], own_mask) if own else None
            entry["peak_wave"] = float(setup.wave[int(np.argmax(ev.saliency.mean_abs[k]))])
        else:
            shares = ev.saliency_row_shares.get(label)
            if shares is None:
                continue
            entry["group_shares"] = dict(shares)
            # Own groups' windows do not overlap in the shipped setups, so their shares add up.
            entry["own_share"] = sum(shares.get(g, math.nan) for g in own) if own else None
        entry["own_enrichment"] = (
            entry["own_share"] / entry["own_pixel_fraction"] if own and entry["own_pixel_fraction"] else None
        )
        labels[label] = entry
    return {
        "method": method,
        "method_text": method_text,
        "n_spectra": ev.saliency.count if ev.saliency is not None else ev.n,
        "setup": setup.name,
        "pixel_fractions": pixel_fractions,
        "labels": labels,
    }


def _share(magnitude: np.ndarray, mask: np.ndarray) -> float:
    total = magnitude.sum()
    return float(magnitude[mask].sum() / total) if total > 0 else math.nan


def draw_figures(ev: Evaluation, document: dict) -> dict[str, bytes]:
    """The PNGs of the report by file name; ``document["figures"]`` lists them by role."""
    metrics = document["metrics"]
    bins = [
        k
        for k in document["snr"]["selections"]
        if not any(k == f"snr>={c:g}" for c in document["snr"]["cuts"])
    ]
    saliency = document["saliency"]
    figures = {
        "one_to_one": plots.one_to_one(ev, metrics),
        "snr": plots.snr_trends(ev, metrics, bins) if document["snr"]["available"] else None,
        "calibration": plots.calibration(ev, metrics),
        "error_calibration": plots.error_calibration(ev, metrics) if calibrated_err(ev) is not None else None,
        "kiel": plots.kiel(ev),
        "abundances": plots.abundances(ev),
        "saliency": plots.saliency_maps(ev, saliency) if saliency else None,
        "saliency_shares": plots.saliency_shares(ev, saliency) if saliency else None,
        "embedding_map": embedding_map.embedding_map(ev, plots.png, plots.axis_label),
    }
    out = {}
    for role, data in figures.items():
        if data is not None:
            document["figures"][role] = f"{role}.png"
            out[f"{role}.png"] = data
    return out


def json_text(document: dict) -> str:
    """JSON with NaN as null (strict JSON readers refuse NaN); floats keep full precision."""
    return json.dumps(_finite(document), indent=1, allow_nan=False) + "\n"


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_report(ev: Evaluation, out: str, options: ReportOptions = ReportOptions()) -> dict:
    """Compute, draw and publish the report folder at ``out`` (local path or URI); returns the
    document as written to metrics.json. An existing report there is replaced; any other
    non-empty folder is refused, so a mistyped --out never deletes someone's data."""
    _check_out(out)
    document = evaluation_document(ev, options)
    files = draw_figures(ev, document)
    if ev.quarantine is not None and ev.quarantine.num_rows:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(ev.quarantine, sink)
        files[QUARANTINE] = sink.getvalue().to_pybytes()
        document["quarantine_file"] = QUARANTINE
    text = json_text(document)
    document = json.loads(text)
    files[REPORT_MD] = render_markdown(document).encode()
    files[METRICS_JSON] = text.encode()  # last: the file that says a report is complete
    write_folder_atomic(out, files)
    return document


def _check_out(out: str) -> None:
    fs, root = filesystem_and_path(out)
    root = root.rstrip("/")
    if not exists(fs, root):
        return
    from pyarrow import fs as pafs

    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    if not entries:
        return
    marker = join(root, METRICS_JSON)
    if exists(fs, marker):
        try:
            if read_json(fs, marker).get("format") == FORMAT:
                return
        except (ValueError, OSError):
            pass
    raise InputError(
        f"--out {out} is a folder that holds something other than a speclabel evaluation report; "
        "choose a new or empty folder (an existing report is replaced)"
    )


# -- report.md --------------------------------------------------------------------------------------


def render_markdown(doc: dict) -> str:
    """``report.md`` from the metrics document alone (as read back from metrics.json)."""
    labels = doc["labels"]
    units = doc["units"]
    metrics = doc["metrics"]
    figures = doc["figures"]
    source, rows = doc["source"], doc["rows"]
    lines = [f"# speclabel evaluation: {_title(source)}", ""]
    lines += [
        f"Written {doc['created_at']} by speclabel {doc['speclabel_version']}. Every number here is in "
        "`metrics.json` at full precision.",
        "",
        "## What was evaluated",
        "",
    ]
    lines += _source_lines(source, rows, doc.get("quarantine_file"))
    lines += [
        "",
        "## Accuracy",
        "",
        "Residual = predicted - true over every evaluated spectrum: bias = mean residual, scatter = "
        "sample standard deviation (ddof = 1), robust scatter = 1.4826 x median absolute deviation, "
        "rmse = root mean square residual.",
        "",
        "| label | unit | n | bias | scatter | robust scatter | rmse |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in labels:
        m = metrics["all"][name]
        lines.append(
            f"| {name} | {units[name]} | {m['n']} | {_n(m['bias'])} | {_n(m['scatter'])} | "
            f"{_n(m['robust_scatter'])} | {_n(m['rmse'])} |"
        )
    lines += ["", *_figure(figures, "one_to_one", "Predicted against true labels, residuals below")]
    lines += _refinement_lines(doc.get("refinement"), units)
    selections = doc["snr"]["selections"]
    if selections:
        lines += ["", "### By S/N", "", "Scatter (robust scatter) [bias] and n per S/N selection.", ""]
        lines += ["| label | " + " | ".join(_snr_text(s) for s in selections) + " |"]
        lines += ["|---|" + "---:|" * len(selections)]
        for name in labels:
            cells = [
                f"{_n(metrics[s][name]['scatter'])} ({_n(metrics[s][name]['robust_scatter'])}) "
                f"[{_n(metrics[s][name]['bias'])}] n={metrics[s][name]['n']}"
                for s in selections
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", *_figure(figures, "snr", "Bias, scatter and robust scatter per S/N bin")]
    elif not doc["snr"]["available"]:
        lines += ["", "No S/N is known for these spectra, so there are no S/N bins."]
    lines += ["", "## Internal precision: ensemble std against the actual error", ""]
    if "std_ratio" in metrics["all"][labels[0]]:
        reference = doc["calibration_reference"]["frac_within_std_gaussian"]
        lines += [
            "std ratio = rms(ensemble std) / rms(predicted - true): 1 when the ensemble std is the actual "
            "error, below 1 when it is over-confident. Within std = the fraction of spectra with "
            f"|predicted - true| < ensemble std ({_n(reference)} for Gaussian errors of exactly that "
            "std). The ensemble std measures how much the members disagree, not the noise of the "
            "spectrum, so a ratio below 1 is expected; it says how to read the catalogue's `<label>_std`.",
            "",
            "| label | selection | rms std | rms error | std ratio | within std |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name in labels:
            for s in ["all", *selections]:
                m = metrics[s][name]
                lines.append(
                    f"| {name} | {_snr_text(s)} | {_n(m['rms_std'])} | {_n(m['rmse'])} | "
                    f"{_n(m['std_ratio'])} | {_n(m['frac_within_std'])} |"
                )
        lines += ["", *_figure(figures, "calibration", "|predicted - true| against the ensemble std")]
    else:
        lines += ["No ensemble std is available (a one-member model, or a catalogue without `<label>_std`)."]
    lines += ["", "## Calibrated total error: `<label>_err` against the actual error", ""]
    lines += _error_calibration_lines(doc, ["all", *selections])
    lines += ["", "## Science views", ""]
    lines += _figure(figures, "kiel", "Kiel diagram coloured by [Fe/H], predicted next to true") or [
        "The Kiel diagram needs teff, logg and feh."
    ]
    lines += [""]
    lines += _figure(figures, "abundances", "[Mg/Fe] and [Al/Fe] against [Fe/H], predicted next to true") or [
        "The abundance planes need feh and mgfe or alfe."
    ]
    lines += ["", "## Saliency: where each label is read", ""]
    lines += _saliency_lines(doc["saliency"], figures)
    lines += ["", "## Out of distribution: the spectra against the training set", ""]
    lines += _ood_lines(doc.get("ood"), doc.get("embedding_map"), figures)
    lines += ["", "## Screening: spectra flagged as odd", ""]
    lines += _screening_lines(doc.get("screening"), source)
    return "\n".join(lines) + "\n"


# The columns of the calibrated-error table after label and selection, as the metrics name them.
ERROR_CALIBRATION_COLUMNS = (
    "rms_std",
    "rms_err",
    "rmse",
    "std_ratio",
    "err_ratio",
    "frac_within_std",
    "frac_within_err",
    "frac_within_2std",
    "frac_within_2err",
)


def _error_calibration_lines(doc: dict, selections: list[str]) -> list[str]:
    labels, metrics = doc["labels"], doc["metrics"]
    if "err_ratio" not in metrics["all"][labels[0]]:
        return [
            "No calibrated error is available (a model without a calibration, or a catalogue without "
            "`<label>_err` values)."
        ]
    reference = doc["calibration_reference"]
    out = [
        "err = the calibrated total 1-sigma error (`<label>_err`: ensemble std, the forward model's "
        "bound, the members' own predicted error where they have a variance head, the std scaled by "
        "the spectrum's distance from the training set where the model has an embedding reference, "
        "and a floor, fitted on the model's test split). Before = the ensemble std, after = err. "
        "Ratio = rms(uncertainty) / rms(predicted - true), 1 when it is the actual error; within 1 (2) = "
        "the fraction of spectra with |predicted - true| below 1 (2) x the uncertainty "
        f"({_n(reference['frac_within_std_gaussian'])} ({_n(reference['frac_within_2std_gaussian'])}) "
        "for Gaussian errors of exactly that size).",
    ]
    if doc["source"].get("calibration") and doc["source"].get("data") == doc["source"].get("training_data"):
        out += [
            "",
            "These are the rows the calibration was fitted on, so the numbers after calibration are "
            "in-sample; `bench/trust_calibration.py` scores it cross-fitted.",
        ]
    out += [
        "",
        "| label | selection | rms std | rms err | rms error | ratio before | ratio after | "
        "within 1 before | within 1 after | within 2 before | within 2 after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in labels:
        for s in selections:
            m = metrics[s][name]
            cells = [m.get(k) for k in ERROR_CALIBRATION_COLUMNS]
            out.append(f"| {name} | {_snr_text(s)} | " + " | ".join(_n(c) for c in cells) + " |")
    caption = "(predicted - true) / uncertainty, before and after calibration"
    out += ["", *_figure(doc["figures"], "error_calibration", caption)]
    return out


def _title(source: dict) -> str:
    if source["mode"] == "model":
        return f"model {source['model_id']} on its test split"
    releases = ", ".join(source.get("releases") or []) or "no release"
    return f"catalogue {source['catalogue']} ({releases}) against {source['truth']}"


def _source_lines(source: dict, rows: dict, quarantine_file: str | None) -> list[str]:
    if source["mode"] == "model":
        out = [
            f"- Model: `{source['model']}` (model_id `{source['model_id']}`, {source['n_members']} members).",
            f"- Data: `{source['data']}`"
            + (
                ""
                if source["data"] == source["training_data"]
                else " (not the data the model was trained on)"
            )
            + ".",
            f"- Rows: {rows['read']} read, {rows['test_split']} in the common test split "
            f"(test fraction {source['split']['test_fraction']}), {rows['evaluated']} evaluated, "
            f"{rows['quarantined']} refused by the data contract.",
        ]
        if rows["quarantined"]:
            reasons = ", ".join(f"{k}: {v}" for k, v in rows["quarantine_reasons"].items())
            out.append(f"- Refused rows by reason: {reasons} (listed in `{quarantine_file}`).")
        return out
    runs = ", ".join(f"{r['release']} run {r['run_id']} (model {r['model_id']})" for r in source["runs"])
    out = [
        f"- Catalogue: `{source['catalogue']}`: {runs or 'no run'}"
        + (f", rows where `{source['where']}`" if source.get("where") else "")
        + ".",
        f"- Truth: `{source['truth']}`, joined on spectrum_id.",
        f"- Rows: {rows['catalogue']} catalogue rows, {rows['truth']} truth rows, {rows['matched']} matched; "
        f"{rows['unmatched_catalogue']} catalogue rows without truth, {rows['unmatched_truth']} truth rows "
        "not in the catalogue selection.",
    ]
    return out


def _saliency_lines(saliency: dict | None, figures: dict) -> list[str]:
    if saliency is None:
        return ["No saliency is available for these spectra."]
    out = [
        f"Saliency = d label / d flux of the ensemble mean ({saliency['method_text']}, setup "
        f"`{saliency['setup']}`). Gradient share = the share of |d label / d flux| that falls in a "
        "group of line windows; own lines = the groups each label is expected to be read from; pixel share "
        "= the share of the grid's pixels they cover; enrichment = gradient share / pixel share (1 = no "
        "preference for those lines); peak = the wavelength of the largest mean |gradient|.",
        "",
        "| label | own lines | gradient share in own lines | pixel share | enrichment | peak (Å) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, entry in saliency["labels"].items():
        own = ", ".join(entry["own_groups"]) or "–"
        out.append(
            f"| {name} | {own} | {_n(entry['own_share'])} | {_n(entry['own_pixel_fraction'])} | "
            f"{_n(entry['own_enrichment'])} | {_n(entry.get('peak_wave'), digits=6)} |"
        )
    groups = list(saliency["pixel_fractions"])
    out += [
        "",
        "Gradient share per line-window group (last row: pixel share):",
        "",
        "| label | " + " | ".join(groups) + " |",
        "|---|" + "---:|" * len(groups),
    ]
    for name, entry in saliency["labels"].items():
        out.append(f"| {name} | " + " | ".join(_n(entry["group_shares"].get(g)) for g in groups) + " |")
    out.append("| pixels | " + " | ".join(_n(saliency["pixel_fractions"][g]) for g in groups) + " |")
    out += [""]
    out += _figure(figures, "saliency", "Population-averaged d label / d flux with the line windows shaded")
    out += [""]
    out += _figure(figures, "saliency_shares", "Share of |gradient| per line-window group")
    return out


def _refinement_lines(section: dict | None, units: dict) -> list[str]:
    if not section:
        return []
    lines = [
        "",
        "### Refined labels against the network's",
        "",
        f"{', '.join(section['labels'])} are refined after the network by a fit of each spectrum "
        "against the model's noise-free reference spectra; the table above is of the refined labels. "
        "Scatter [bias] of both on the same spectra:",
        "",
        "| label | unit | selection | n | refined | network |",
        "|---|---|---|---:|---:|---:|",
    ]
    for key, per_label in section["refined"].items():
        for name, m in per_label.items():
            net = section["network"][key][name]
            selection = _snr_text(key) if key != "all" else "all"
            lines.append(
                f"| {name} | {units.get(name, '')} | {selection} | {m['n']} | "
                f"{_n(m['scatter'])} [{_n(m['bias'])}] | {_n(net['scatter'])} [{_n(net['bias'])}] |"
            )
    return lines


def _ood_lines(ood: dict | None, mapped: dict | None, figures: dict) -> list[str]:
    out = []
    if ood is None:
        out.append("No ood_score: the model has no embedding reference (or the catalogue no ood_score).")
    else:
        p = ood["percentiles"]
        out += [
            "ood_score = the distance of a spectrum's penultimate-layer embedding to its nearest training "
            "spectra, as a percentile of the training spectra's own distances: uniform on 0-100 for "
            "spectra like the training set, 100 for spectra unlike any of them.",
            "",
            f"{ood['n']} spectra: mean score {_n(ood['mean_score'])}, percentiles 10/50/90/99 "
            f"{_n(p['10'])} / {_n(p['50'])} / {_n(p['90'])} / {_n(p['99'])}; flagged out_of_distribution: "
            f"{ood['flagged_out_of_distribution']} ({_n(ood['flagged_fraction'])}).",
        ]
    if mapped is not None:
        flagged = ", ".join(f"{k} {v}" for k, v in mapped["flagged"].items())
        out += [
            "",
            f"Map: {mapped['method']}, perplexity {_n(mapped['perplexity'])}, {mapped['rows']} of "
            f"{mapped['of_rows']} spectra; flagged rows ringed in red ({flagged}).",
            "",
            *_figure(figures, "embedding_map", "t-SNE of the embeddings, coloured by each label"),
        ]
    return out


def _screening_lines(screening: dict | None, source: dict) -> list[str]:
    if screening is None:
        return ["No flags: the evaluated rows carry no quality flags."]
    out = [
        f"Of {screening['n']} spectra, {screening['anomalous_spectrum']} are flagged anomalous_spectrum "
        "(chi^2 against the model spectrum at their labels beyond the model's threshold) and "
        f"{screening['out_of_distribution']} out_of_distribution.",
    ]
    if screening["examples"]:
        where = source.get("catalogue", "CATALOGUE")
        out += [
            "",
            "Flagged, to look at first: "
            + ", ".join(f"`{i}`" for i in screening["examples"])
            + f" (`speclabel show {where} SPECTRUM_ID --spectra STORE` draws one against its model "
            "spectrum).",
        ]
    defects = screening["defects"]
    if defects:
        out += [
            "",
            "The truth says which spectra were given a defect (`speclabel simulate --defects`): the share "
            "of each kind the screening flagged (anomalous_spectrum or out_of_distribution); for clean "
            "spectra, the false-flag rate.",
            "",
            "| spectra | n | anomalous_spectrum | flagged | share flagged |",
            "|---|---:|---:|---:|---:|",
        ]
        for kind, d in defects.items():
            share = d["flagged"] / d["n"] if d["n"] else None
            out.append(f"| {kind} | {d['n']} | {d['anomalous_spectrum']} | {d['flagged']} | {_n(share, 3)} |")
    return out


def _figure(figures: dict, role: str, caption: str) -> list[str]:
    return [f"![{caption}]({figures[role]})"] if role in figures else []


def _snr_text(selection: str) -> str:
    return (
        selection.replace("snr", "S/N").replace("<=", " ≤ ").replace(">=", " ≥ ").replace("<", " < ").strip()
    )


def _n(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"
