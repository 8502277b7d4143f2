"""Accuracy of predicted labels: bias and scatter per label, and how well the ensemble std tracks the error.

``bias`` = mean(predicted - true); ``scatter`` = standard deviation of (predicted - true) (ddof 1);
``rmse``; ``robust_scatter`` = 1.4826 x median absolute deviation (insensitive to a few outliers).

Calibration of the internal precision, when the ensemble std is given (rows where both the error
and the std are finite): ``std_ratio`` = rms(ensemble std) / rms(predicted - true), 1 when the
internal precision tracks the actual error and < 1 when the ensemble is over-confident; ``rms_std``;
``frac_within_std`` = the fraction of rows with |predicted - true| < std, 0.683 for Gaussian errors
whose std is exactly the ensemble std.

:func:`metrics_by_snr` repeats all of this over S/N cuts (``snr>=50``) and S/N bins
(``20<=snr<50``), the two views survey papers quote.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

# The fraction of a Gaussian within one standard deviation of its mean: erf(1 / sqrt(2)).
GAUSSIAN_WITHIN_1_SIGMA = 0.6826894921370859


def label_metrics(
    predicted: np.ndarray, true: np.ndarray, names: Sequence[str], *, std: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """Per label: n, bias, scatter, rmse, robust_scatter, and the calibration numbers given ``std``."""
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
            entry.update(calibration(residual[:, k], np.asarray(std, dtype=np.float64)[:, k]))
        out[name] = entry
    return out


def calibration(residual: np.ndarray, std: np.ndarray) -> dict[str, float]:
    """``std_ratio``, ``rms_std`` and ``frac_within_std`` of one label (see the module docstring)."""
    ok = np.isfinite(std) & np.isfinite(residual)
    if not ok.any():
        return {"std_ratio": float("nan"), "rms_std": float("nan"), "frac_within_std": float("nan")}
    rms_error = np.sqrt((residual[ok] ** 2).mean())
    rms_std = np.sqrt((std[ok] ** 2).mean())
    return {
        "std_ratio": float(rms_std / rms_error) if rms_error > 0 else float("nan"),
        "rms_std": float(rms_std),
        "frac_within_std": float((np.abs(residual[ok]) < std[ok]).mean()),
    }


def snr_bin_name(lo: float, hi: float) -> str:
    """``snr<20``, ``20<=snr<50`` or ``snr>=100`` for the bin [lo, hi)."""
    if np.isneginf(lo):
        return f"snr<{hi:g}"
    if np.isposinf(hi):
        return f"snr>={lo:g}"
    return f"{lo:g}<=snr<{hi:g}"


def snr_bins(edges: Sequence[float]) -> list[tuple[float, float]]:
    """The bins [-inf, e1), [e1, e2), ..., [ek, inf) of increasing inner ``edges``."""
    edges = [float(e) for e in edges]
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"S/N bin edges must increase, got {edges}")
    bounds = [-np.inf, *edges, np.inf]
    return list(itertools.pairwise(bounds))


def metrics_by_snr(
    predicted: np.ndarray,
    true: np.ndarray,
    names: Sequence[str],
    snr: np.ndarray | None,
    *,
    std: np.ndarray | None = None,
    snr_cuts: Sequence[float] = (50.0,),
    snr_edges: Sequence[float] = (),
) -> dict[str, dict]:
    """Metrics for all rows (``"all"``), rows with S/N >= each cut (``"snr>=50"``) and, given inner
    ``snr_edges`` (e.g. 20, 50, 100), each S/N bin (``"snr<20"``, ``"20<=snr<50"``, ...). Rows with an
    unknown S/N count in ``"all"`` only."""
    out = {"all": label_metrics(predicted, true, names, std=std)}
    if snr is None:
        return out
    snr = np.asarray(snr, dtype=np.float64)
    selections = [(f"snr>={cut:g}", snr >= cut) for cut in snr_cuts]
    selections += [(snr_bin_name(lo, hi), (snr >= lo) & (snr < hi)) for lo, hi in snr_bins(snr_edges)]
    for key, rows in selections:
        if key not in out:  # a cut equal to the last edge selects the same rows as the last bin
            out[key] = label_metrics(
                predicted[rows], true[rows], names, std=None if std is None else std[rows]
            )
    return out
