"""The tables the train job prints at the end: one row per member, one per label."""

from __future__ import annotations

import math

import numpy as np

from speclabel.model.ensemble import Ensemble


def member_table(summaries: list) -> str:
    """One row per member (``run.MemberSummary``): status, epochs, best epoch and loss, where it ran."""
    lines = [
        "",
        f"{'member':>6} {'seed':>5} {'status':<9} {'epochs':>6} {'best@':>5} {'best val loss':>13} "
        f"{'early':>5} {'resumed@':>8} {'kept':>4} {'device':<6} node",
    ]
    for s in summaries:
        lines.append(
            f"{s.member:>6} {s.seed:>5} {s.status:<9} {s.epochs:>6} {s.best_epoch:>5} "
            f"{s.best_val_loss:>13.5g} "
            f"{'yes' if s.stopped_early else 'no':>5} {s.resumed_from_epoch or '-':>8} "
            f"{'yes' if s.kept else 'no':>4} {s.device:<6} {s.node[:12]}"
        )
    return "\n".join(lines)


def label_table(ensemble: Ensemble) -> str:
    """Per label: bias and scatter on the validation split (mean over kept members) and on the test split."""
    test = ensemble.info.get("metrics", {}).get("test", {}).get("all", {})
    refined = ensemble.info.get("metrics", {}).get("test_refined", {}).get("all")
    lines = [
        "",
        f"{'label':<6} {'val bias':>10} {'val scatter':>11} {'test n':>6} {'test bias':>10} "
        f"{'test scatter':>12} {'std ratio':>9}" + (f" {'refined scatter':>15}" if refined else ""),
    ]
    for name in ensemble.label_names:
        val = [m["validation"][name] for m in ensemble.member_info]
        t = test.get(name, {})
        bias = np.mean([_number(v["bias"]) for v in val])
        scatter = np.mean([_number(v["scatter"]) for v in val])
        lines.append(
            f"{name:<6} {bias:>10.4g} {scatter:>11.4g} "
            f"{t.get('n', 0):>6} {_number(t.get('bias')):>10.4g} {_number(t.get('scatter')):>12.4g} "
            f"{_number(t.get('std_ratio')):>9.3g}"
            + (f" {_number(refined[name].get('scatter')):>15.4g}" if refined else "")
        )
    lines.append(
        "validation: each kept member on its own validation rows, averaged; test: the ensemble mean on the "
        "common test split (std ratio = rms ensemble std / rms error)"
        + ("; refined: the labels after the refinement, the same rows" if refined else "")
    )
    return "\n".join(lines)


def label_rows_table(counts: dict[str, dict[str, int]]) -> str:
    """Per label: the used rows that have it and, of those, the rows that train it (outside the test
    split); a row lacking a label trains the others (``TrainingSet.label_counts``)."""
    lines = [f"{'label':<8} {'rows with it':>12} {'training it':>11}"]
    lines += [f"{name:<8} {c['rows']:>12} {c['trained']:>11}" for name, c in counts.items()]
    return "\n".join(lines)


def _number(value) -> float:
    """A metric as a float: model.json writes an undefined one (NaN) as null."""
    return math.nan if value is None else float(value)


def calibration_text(calibration) -> str:
    """The fitted terms and parameters of a calibration, as the train output shows them."""
    terms = ", ".join(
        ["std"]
        + (["forward-model bound"] if calibration.uses_bound else [])
        + (["variance head"] if calibration.uses_aleatoric else [])
        + (["std x distance from the training set"] if calibration.uses_distance else [])
        + ["floor"]
    )
    fitted = "; ".join(
        f"{n} a {m.a:.2g} b {m.b:.2g}"
        + (f" d {m.d:.2g}" if calibration.uses_aleatoric else "")
        + (f" e {m.e:.2g}" if calibration.uses_distance else "")
        + f" c {m.c:.2g}"
        for n, m in calibration.labels.items()
    )
    return f"({terms}) on {calibration.fitted_on['n_rows']} test rows: {fitted}"
