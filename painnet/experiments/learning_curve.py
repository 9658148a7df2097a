"""Training-size analysis: learning curve, smallest significant n, slope.

Input: the per-repeat table of :func:`painnet.experiments.aggregate.data_size_repeats` -- one
row per participant × model × mode × n (``n_train``) × repeat, each the pooled evaluation of
that repeat's held-out predictions over all outer folds (flat metrics ``r_<s>``, ``r_<s>_p``).

- A repeat is *significant* at bin size s when ``r_<s>_p < 0.05`` and ``r_<s> > 0`` (the
  study's ``rall_bootp < 0.05 & rall_r > 0``, analysis_visualize_model_trainsize.m:111).
- The study's "minimum sessions" statistic, reported exactly as its code computes it
  (analysis_visualize_model_trainsize.m:115-117): ``(number of n with fraction significant
  < 0.5) + 1`` (column ``min_sessions_study``). It is a count, so it equals an n only when the
  curve covers n = 1, 2, … without gaps, and on a non-monotone curve it can differ from the
  first n that reaches 50%. Beside it: ``first_n_half_significant``, the smallest n whose
  fraction significant is >= 0.5, and ``min_n_significant``, the smallest n where more than
  half of the repeats are significant (> 0.5, painnet's earlier statistic).
- The slope is the least-squares slope of r against n over all repeats (``scipy.stats.
  linregress``), with its 95% CI and p.
- The curve's band is the 95% CI of the mean r over repeats (t interval; NaN with 1 repeat).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

BIN_SIZES = ("1min", "2min", "run", "session")
GROUP = ["subject", "model", "mode"]
ALPHA = 0.05


def significant(repeats: pd.DataFrame, size: str) -> pd.Series:
    """Per repeat: bootstrap p < 0.05 and r > 0 at bin size ``size``."""
    r = repeats[f"r_{size}"].astype(float)
    p = repeats[f"r_{size}_p"].astype(float)
    return (p < ALPHA) & (r > 0)


def _sizes(repeats: pd.DataFrame, bin_sizes: Sequence[str]) -> list[str]:
    return [s for s in bin_sizes if f"r_{s}" in repeats.columns]


def learning_curve(repeats: pd.DataFrame, bin_sizes: Sequence[str] = BIN_SIZES) -> pd.DataFrame:
    """One row per subject × model × mode × n × bin size: mean r over repeats, its 95% CI,
    the spread of repeats (2.5/97.5 percentiles), mean AUC and the fraction significant."""
    rows = []
    for size in _sizes(repeats, bin_sizes):
        sig = significant(repeats, size)
        for key, group in repeats.groupby([*GROUP, "n_train"], sort=True):
            r = group[f"r_{size}"].astype(float).dropna().to_numpy()
            low, high = _mean_ci(r)
            rows.append(
                {
                    **dict(zip([*GROUP, "n_train"], key, strict=True)),
                    "bin_size": size,
                    "n_repeats": len(group),
                    "r_mean": float(r.mean()) if r.size else np.nan,
                    "r_ci_low": low,
                    "r_ci_high": high,
                    "r_q025": float(np.quantile(r, 0.025)) if r.size else np.nan,
                    "r_q975": float(np.quantile(r, 0.975)) if r.size else np.nan,
                    "auc_mean": float(group[f"auc_{size}"].astype(float).mean()),
                    "frac_significant": float(sig[group.index].mean()),
                }
            )
    return pd.DataFrame(rows)


def _mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """t interval of the mean; NaN with fewer than 2 values."""
    if values.size < 2:
        return np.nan, np.nan
    half = stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return float(values.mean() - half), float(values.mean() + half)


def size_summary(repeats: pd.DataFrame, bin_sizes: Sequence[str] = BIN_SIZES) -> pd.DataFrame:
    """One row per subject × model × mode × bin size: smallest significant n and the slope."""
    curve = learning_curve(repeats, bin_sizes)
    rows = []
    for size in _sizes(repeats, bin_sizes):
        for key, group in repeats.groupby(GROUP, sort=True):
            points = curve[
                (curve.bin_size == size)
                & np.logical_and.reduce([curve[c] == v for c, v in zip(GROUP, key, strict=True)])
            ]
            rows.append(
                {
                    **dict(zip(GROUP, key, strict=True)),
                    "bin_size": size,
                    "n_values": int(group["n_train"].nunique()),
                    **minimum_sessions(points["n_train"], points["frac_significant"]),
                    **_slope(group["n_train"].to_numpy(float), group[f"r_{size}"].to_numpy(float)),
                }
            )
    return pd.DataFrame(rows)


def minimum_sessions(n_train: pd.Series, frac_significant: pd.Series) -> dict[str, float]:
    """The study's minimum-sessions count and its two first-n variants for one curve.

    ``min_sessions_study`` = (number of n whose fraction significant is < 0.5) + 1, exactly as
    analysis_visualize_model_trainsize.m:116 (``sum(rall_bootsig < thr/100) + 1``, thr = 50);
    NaN fractions count as not below 0.5, as MATLAB's comparison with NaN is false.
    ``first_n_half_significant``: smallest n with fraction >= 0.5; ``min_n_significant``:
    smallest n with fraction > 0.5 (NaN when none).
    """
    n = np.asarray(n_train, dtype=float)
    frac = np.asarray(frac_significant, dtype=float)
    half = n[frac >= 0.5]
    more = n[frac > 0.5]
    return {
        "min_sessions_study": float(np.sum(frac < 0.5) + 1) if n.size else np.nan,
        "first_n_half_significant": float(half.min()) if half.size else np.nan,
        "min_n_significant": float(more.min()) if more.size else np.nan,
    }


def _slope(n: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """Least-squares slope of r on n (per added session) with 95% CI and p."""
    ok = np.isfinite(n) & np.isfinite(r)
    nan = {"slope": np.nan, "slope_ci_low": np.nan, "slope_ci_high": np.nan, "slope_p": np.nan}
    if ok.sum() < 3 or np.unique(n[ok]).size < 2:
        return nan
    fit = stats.linregress(n[ok], r[ok])
    half = stats.t.ppf(0.975, ok.sum() - 2) * fit.stderr
    return {
        "slope": float(fit.slope),
        "slope_ci_low": float(fit.slope - half),
        "slope_ci_high": float(fit.slope + half),
        "slope_p": float(fit.pvalue),
    }


def plot_learning_curves(
    repeats: pd.DataFrame, curve: pd.DataFrame, out_dir: Path, bin_sizes: Sequence[str] = BIN_SIZES
) -> list[Path]:
    """``learning_curve_sub-<s>_<model>_<mode>.png``: mean r against n with its 95% CI band,
    every repeat as a dot, one colour per bin size."""
    paths = []
    sizes = _sizes(repeats, bin_sizes)
    for key, group in repeats.groupby(GROUP, sort=True):
        subject, model, mode = key
        fig = Figure(figsize=(5.0, 3.8), layout="constrained")
        ax = fig.subplots()
        for i, size in enumerate(sizes):
            colour = f"C{i}"
            points = curve[
                (curve.subject == subject)
                & (curve.model == model)
                & (curve["mode"] == mode)
                & (curve.bin_size == size)
            ].sort_values("n_train")
            jitter = (i - (len(sizes) - 1) / 2) * 0.06
            ax.scatter(group.n_train + jitter, group[f"r_{size}"], s=8, alpha=0.35, color=colour)
            ax.plot(points.n_train, points.r_mean, "o-", color=colour, label=size)
            # r lives in [-1, 1]; a t interval over few repeats can reach beyond it
            low, high = points.r_ci_low.clip(-1, 1), points.r_ci_high.clip(-1, 1)
            ax.fill_between(points.n_train, low, high, color=colour, alpha=0.2)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("training sessions n")
        ax.set_ylabel("pooled held-out r")
        ax.set_title(f"sub-{subject} · {model} · {mode}")
        ax.legend(fontsize="small", title="bins")
        FigureCanvasAgg(fig)
        name = "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(k)) for k in key)
        path = out_dir / f"learning_curve_sub-{name}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths
