"""Accuracy of predicted labels: bias and scatter per label, and how well the ensemble std tracks the error.

``bias`` = mean(predicted - true); ``scatter`` = standard deviation of (predicted - true) (ddof 1);
``rmse``; ``robust_scatter`` = 1.4826 x median absolute deviation (insensitive to a few outliers);
``std_ratio`` = rms(ensemble std) / rms(predicted - true): 1 when the internal precision tracks the
actual error, < 1 when the ensemble is over-confident.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def label_metrics(
    predicted: np.ndarray, true: np.ndarray, names: Sequence[str], *, std: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """Per label: n, bias, scatter, rmse, robust_scatter (and std_ratio when ``std`` is given)."""
    residual = np.asarray(predicted, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    out = {}
    for k, name in enumerate(names):
        r = residual[:, k]
        r = r[np.isfinite(r)]
        n = r.size
        entry = {
            "n": int(n),
            "bias": float(r.mean()) if n else float("nan"),
            "scatter": float(r.std(ddof=1)) if n > 1 else float("nan"),
            "rmse": float(np.sqrt((r**2).mean())) if n else float("nan"),
            "robust_scatter": float(1.4826 * np.median(np.abs(r - np.median(r)))) if n else float("nan"),
        }
        if std is not None:
            s = np.asarray(std, dtype=np.float64)[:, k]
            ok = np.isfinite(s) & np.isfinite(residual[:, k])
            rms_error = np.sqrt((residual[ok, k] ** 2).mean()) if ok.any() else float("nan")
            entry["std_ratio"] = (
                float(np.sqrt((s[ok] ** 2).mean()) / rms_error)
                if ok.any() and rms_error > 0
                else float("nan")
            )
        out[name] = entry
    return out


def metrics_by_snr(
    predicted: np.ndarray,
    true: np.ndarray,
    names: Sequence[str],
    snr: np.ndarray | None,
    *,
    std: np.ndarray | None = None,
    snr_cuts: Sequence[float] = (50.0,),
) -> dict[str, dict]:
    """Metrics for all rows (``"all"``) and for rows with S/N >= each cut (``"snr>=50"``)."""
    out = {"all": label_metrics(predicted, true, names, std=std)}
    if snr is not None:
        snr = np.asarray(snr, dtype=np.float64)
        for cut in snr_cuts:
            rows = snr >= cut
            out[f"snr>={cut:g}"] = label_metrics(
                predicted[rows], true[rows], names, std=None if std is None else std[rows]
            )
    return out
