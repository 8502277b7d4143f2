"""Accuracy of predicted labels: bias and scatter per label, and how well the ensemble std tracks the error.

``bias`` = mean(predicted - true); ``scatter`` = standard deviation of (predicted - true) (ddof 1);
``rmse``; ``robust_scatter`` = 1.4826 x median absolute deviation (insensitive to a few outliers).

Calibration of the internal precision, when the ensemble std is given (rows where both the error
and the std are finite): ``std_ratio`` = rms(ensemble std) / rms(predicted - true), 1 when the
internal precision tracks the actual error and < 1 when the ensemble is over-confident; ``rms_std``;
``frac_within_std`` = the fraction of rows with |predicted - true| < std, 0.683 for Gaussian errors
whose std is exactly the ensemble std; ``frac_within_2std`` the same within 2 std (0.954). Given the
calibrated total error ``err`` (``model.calibration``), the same four numbers of it: ``err_ratio``,
``rms_err``, ``frac_within_err``, ``frac_within_2err``.

:func:`metrics_by_snr` repeats all of this over S/N cuts (``snr>=50``) and S/N bins
(``20<=snr<50``), the two views survey papers quote.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

# The fraction of a Gaussian within one standard deviation of its mean: erf(1 / sqrt(2)).
GAUSSIAN_WITHIN_1_SIGMA = 0.6826894921370859
GAUSSIAN_WITHIN_2_SIGMA = 0.9544997361036416  # erf(2 / sqrt(2))


def label_metrics(
    predicted: np.ndarray,
    true: np.ndarray,
    names: Sequence[str],
    *,
    std: np.ndarray | None = None,
    err: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Per label: n, bias, scatter, rmse, robust_scatter, and the calibration numbers given ``std``
    (ensemble std) and ``err`` (calibrated total error)."""
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
        if err is not None:
            entry.update(calibration(residual[:, k], np.asarray(err, dtype=np.float64)[:, k], "err"))
        out[name] = entry
    return out


def calibration(residual: np.ndarray, sigma: np.ndarray, name: str = "std") -> dict[str, float]:
    """``<name>_ratio``, ``rms_<name>``, ``frac_within_<name>`` and ``frac_within_2<name>`` of one
    label's uncertainty ``sigma`` (``std`` or ``err``; see the module docstring), over the rows where
    both it and the residual are finite."""
    keys = (f"{name}_ratio", f"rms_{name}", f"frac_within_{name}", f"frac_within_2{name}")
    ok = np.isfinite(sigma) & np.isfinite(residual)
    if not ok.any():
        return dict.fromkeys(keys, float("nan"))
    rms_error = np.sqrt((residual[ok] ** 2).mean())
    rms_sigma = np.sqrt((sigma[ok] ** 2).mean())
    error = np.abs(residual[ok])
    values = (
        float(rms_sigma / rms_error) if rms_error > 0 else float("nan"),
        float(rms_sigma),
        float((error < sigma[ok]).mean()),
        float((error < 2 * sigma[ok]).mean()),
    )
    return dict(zip(keys, values, strict=True))


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
    err: np.ndarray | None = None,
    snr_cuts: Sequence[float] = (50.0,),
    snr_edges: Sequence[float] = (),
) -> dict[str, dict]:
    """Metrics for all rows (``"all"``), rows with S/N >= each cut (``"snr>=50"``) and, given inner
    ``snr_edges`` (e.g. 20, 50, 100), each S/N bin (``"snr<20"``, ``"20<=snr<50"``, ...). Rows with an
    unknown S/N count in ``"all"`` only."""
    out = {"all": label_metrics(predicted, true, names, std=std, err=err)}
    if snr is None:
        return out
    snr = np.asarray(snr, dtype=np.float64)
    selections = [(f"snr>={cut:g}", snr >= cut) for cut in snr_cuts]
    selections += [(snr_bin_name(lo, hi), (snr >= lo) & (snr < hi)) for lo, hi in snr_bins(snr_edges)]
    for key, rows in selections:
        if key not in out:  # a cut equal to the last edge selects the same rows as the last bin
            out[key] = label_metrics(
                predicted[rows],
                true[rows],
                names,
                std=None if std is None else std[rows],
                err=None if err is None else err[rows],
            )
    return out
