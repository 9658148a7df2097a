"""Point metrics of binned predictions (one table of bins -> one dict of numbers).

Every metric is NaN, never an exception, where it is undefined: too few bins, a constant
rating or prediction, or only one side of the median.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import mean_absolute_error, r2_score, roc_auc_score

from painnet.evaluation.protocol import EvalProtocol, as_protocol

MIN_BINS_FOR_R = 3
# spread below this fraction of the magnitude is float noise (e.g. bin means of a constant)
CONSTANT_RTOL = 1e-12
METRIC_NAMES = ("r", "auc", "within_run_r", "within_session_r", "r2", "mae", "n_bins")


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two 1-D arrays; NaN with fewer than 3 points or a constant input."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < MIN_BINS_FOR_R:
        return float("nan")
    if is_constant(x) or is_constant(y):
        return float("nan")
    dx = x - x.mean()
    dy = y - y.mean()
    denom = np.sqrt((dx @ dx) * (dy @ dy))
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0))


def is_constant(x: np.ndarray) -> bool:
    """True when all values are equal up to float noise (relative ``CONSTANT_RTOL``)."""
    x = np.asarray(x, dtype=np.float64)
    return bool(x.size == 0 or np.ptp(x) <= CONSTANT_RTOL * np.abs(x).max())


def median_labels(rating: np.ndarray, median_tie: str = "drop") -> tuple[np.ndarray, np.ndarray]:
    """(above, keep) of bins split at the median rating, both (n,) bool.

    ``above = rating > median``. ``median_tie="drop"``: bins exactly at the median are in
    neither class (``keep`` false); ``"low"``: they count as low, as the study's
    ``a > quantile(a(:), 0.5)`` does (analysis_visualize_model_test.m:61; MATLAB's
    ``quantile(a, 0.5)`` equals the median).
    """
    rating = np.asarray(rating, dtype=np.float64)
    if median_tie not in ("drop", "low"):
        raise ValueError(f"median_tie must be 'drop' or 'low', got {median_tie!r}")
    if rating.size == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    median = np.median(rating)
    above = rating > median
    keep = above | (rating < median) if median_tie == "drop" else np.ones(rating.size, bool)
    return above, keep


def median_split_auc(rating: np.ndarray, prediction: np.ndarray, median_tie: str = "drop") -> float:
    """ROC AUC of ``prediction`` for bins rated above vs below the median rating.

    Bins whose rating equals the median exactly are dropped (``median_tie="drop"``) or count
    as low (``"low"``, the study's rule; see :func:`median_labels`). Tied predictions count
    half (the trapezoid of MATLAB's ``perfcurve``). NaN when either class is empty.
    """
    rating = np.asarray(rating, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    if rating.size == 0:
        return float("nan")
    above, keep = median_labels(rating, median_tie)
    if above[keep].all() or not above[keep].any():
        return float("nan")
    return float(roc_auc_score(above[keep], prediction[keep]))


def mean_within_group_r(binned: pd.DataFrame, keys: list[str]) -> float:
    """Pearson r inside each group of bins, averaged over groups where it is defined.

    A group counts when it has >= 3 bins and neither its ratings nor predictions are constant.
    NaN when no group counts.
    """
    if binned.empty:
        return float("nan")
    rs = [
        pearson_r(group["rating"].to_numpy(), group["prediction"].to_numpy())
        for _, group in binned.groupby(keys, sort=False)
    ]
    rs = np.asarray(rs, dtype=np.float64)
    rs = rs[np.isfinite(rs)]
    return float(rs.mean()) if rs.size else float("nan")


def compute_metrics(binned: pd.DataFrame, protocol: EvalProtocol | None = None) -> dict[str, float]:
    """Metrics of a binned table (output of ``bin_predictions``).

    Returns ``r`` (pooled Pearson over all bins), ``auc`` (median-split ROC AUC; bins at the
    median follow ``protocol.median_tie``), ``within_run_r`` and ``within_session_r`` (mean
    per-run / per-session Pearson, as the study's analysis_visualize_model_test.m:171-172 and
    215-216), ``r2`` (R^2 of rating by prediction, sklearn ``r2_score``), ``mae`` and
    ``n_bins``.
    """
    protocol = as_protocol(protocol)
    missing = [c for c in ("subject", "session", "run", "rating", "prediction") if c not in binned]
    if missing:
        raise ValueError(f"binned table: missing column(s) {missing}; use bin_predictions()")
    rating = binned["rating"].to_numpy(dtype=np.float64)
    prediction = binned["prediction"].to_numpy(dtype=np.float64)
    n = rating.size
    nan = float("nan")
    constant_rating = is_constant(rating)
    return {
        "r": pearson_r(rating, prediction),
        "auc": median_split_auc(rating, prediction, protocol.median_tie),
        "within_run_r": mean_within_group_r(binned, ["subject", "session", "run"]),
        "within_session_r": mean_within_group_r(binned, ["subject", "session"]),
        # R^2 is undefined for a single bin or a constant rating (zero total variance)
        "r2": nan if n < 2 or constant_rating else float(r2_score(rating, prediction)),
        "mae": float(mean_absolute_error(rating, prediction)) if n else nan,
        "n_bins": int(n),
    }
