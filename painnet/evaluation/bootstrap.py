"""Hierarchical bootstrap of pooled r and AUC over sessions -> runs -> bins (vectorised).

One bootstrap draw resamples sessions with replacement, then (for each drawn session) as many
runs as it has, with replacement, from that session, then (for each drawn run) as many bins as it
has from that run. A draw is therefore a multiset of the observed bins, fully described by how
many times it took each bin: a row of a ``(n_draws, n_bins)`` count matrix. Pooled Pearson r
and the median-split AUC are weighted statistics of those counts, so all draws are computed
at once with matrix products and cumulative sums -- no Python loop over draws (only over
memory-bounded chunks of draws).

Sessions are keyed by (subject, session), so a table pooling several subjects resamples their
sessions together.

AUC choice: in every draw the median threshold is **recomputed** on the draw's own ratings (the
median of the resampled sample), i.e. each draw re-runs exactly the statistic that
``compute_metrics`` computes on the observed bins, instead of freezing the observed median.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from painnet.evaluation.metrics import is_constant

LEVELS = ("session", "run", "bin")
NULL_VALUES = {"r": 0.0, "auc": 0.5}
MAX_CELLS_PER_CHUNK = 2_000_000  # bounds each chunk's index/count arrays to a few tens of MB


@dataclass(frozen=True)
class BinHierarchy:
    """Nesting of bins in runs in sessions; bins are contiguous per run, runs per session.

    run_start/runs_per_session: (n_sessions,) first run id and run count of each session.
    bin_start/bins_per_run:     (n_runs,) first bin row and bin count of each run.
    session_of_bin/run_of_bin:  (n_bins,) session id and run id of each bin row.
    """

    run_start: np.ndarray
    runs_per_session: np.ndarray
    bin_start: np.ndarray
    bins_per_run: np.ndarray
    session_of_bin: np.ndarray
    run_of_bin: np.ndarray

    @property
    def n_sessions(self) -> int:
        return int(self.runs_per_session.size)

    @property
    def n_runs(self) -> int:
        return int(self.bins_per_run.size)

    @property
    def n_bins(self) -> int:
        return int(self.run_of_bin.size)


def sort_bins(binned: pd.DataFrame) -> pd.DataFrame:
    """Binned table ordered by subject, session, run, bin (the order the hierarchy assumes)."""
    missing = [c for c in ("subject", "session", "run", "rating", "prediction") if c not in binned]
    if missing:
        raise ValueError(f"binned table: missing column(s) {missing}; use bin_predictions()")
    order = ["subject", "session", "run"] + (["bin"] if "bin" in binned else [])
    return binned.sort_values(order, kind="stable").reset_index(drop=True)


def bin_hierarchy(binned: pd.DataFrame) -> BinHierarchy:
    """Hierarchy of a table already ordered by ``sort_bins``."""
    session_of_bin = binned.groupby(["subject", "session"], sort=False).ngroup().to_numpy()
    run_of_bin = binned.groupby(["subject", "session", "run"], sort=False).ngroup().to_numpy()
    bins_per_run = np.bincount(run_of_bin)
    bin_start = np.concatenate([[0], np.cumsum(bins_per_run)[:-1]])
    session_of_run = session_of_bin[bin_start]
    runs_per_session = np.bincount(session_of_run)
    run_start = np.concatenate([[0], np.cumsum(runs_per_session)[:-1]])
    return BinHierarchy(
        run_start=run_start,
        runs_per_session=runs_per_session,
        bin_start=bin_start,
        bins_per_run=bins_per_run,
        session_of_bin=session_of_bin,
        run_of_bin=run_of_bin,
    )


def resolve_level(hierarchy: BinHierarchy, level: str = "auto") -> str:
    """Deepest level to resample: ``session``, ``run`` or ``bin``.

    ``auto`` stops at the deepest level that has more than one member anywhere: ``bin`` for
    1-/2-minute bins, ``run`` for whole-run bins, ``session`` for whole-session bins.
    """
    if level in LEVELS:
        return level
    if level != "auto":
        raise ValueError(f"unknown bootstrap level {level!r}; choose 'auto' or one of {LEVELS}")
    if hierarchy.n_bins and hierarchy.bins_per_run.max() > 1:
        return "bin"
    if hierarchy.n_runs and hierarchy.runs_per_session.max() > 1:
        return "run"
    return "session"


def _row_bincount(index: np.ndarray, size: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-row counts: ``index`` (n_rows, ...) of ints in [0, size) -> (n_rows, size) float."""
    n_rows = index.shape[0]
    flat = index.reshape(n_rows, -1) + (np.arange(n_rows) * size)[:, None]
    if valid is not None:
        flat = flat[valid.reshape(n_rows, -1)]
    counts = np.bincount(flat.ravel(), minlength=n_rows * size)
    return counts.reshape(n_rows, size).astype(np.float64)


def draw_bin_counts(
    hierarchy: BinHierarchy, rng: np.random.Generator, n_draws: int, level: str
) -> np.ndarray:
    """Counts of each bin in ``n_draws`` hierarchical resamples: (n_draws, n_bins) float.

    Runs and bins are drawn into padded slots (max runs per session, max bins per run) and the
    slots beyond a session's/run's real size are masked out, so unequal sizes are exact.
    """
    h = hierarchy
    sessions = rng.integers(0, h.n_sessions, size=(n_draws, h.n_sessions))
    if level == "session":
        return _row_bincount(sessions, h.n_sessions)[:, h.session_of_bin]
    n_run = h.runs_per_session[sessions][..., None]  # (d, S, 1)
    max_runs = int(h.runs_per_session.max())
    local_run = rng.integers(0, n_run, size=(n_draws, h.n_sessions, max_runs))
    run_valid = np.arange(max_runs) < n_run
    runs = h.run_start[sessions][..., None] + local_run  # (d, S, R); padded slots stay in range
    if level == "run":
        return _row_bincount(runs, h.n_runs, run_valid)[:, h.run_of_bin]
    n_bin = h.bins_per_run[runs][..., None]  # (d, S, R, 1)
    max_bins = int(h.bins_per_run.max())
    local_bin = rng.integers(0, n_bin, size=(*runs.shape, max_bins))
    bin_valid = run_valid[..., None] & (np.arange(max_bins) < n_bin)
    bins = h.bin_start[runs][..., None] + local_bin
    return _row_bincount(bins, h.n_bins, bin_valid)


def iter_bin_counts(
    hierarchy: BinHierarchy, n_boot: int, seed: int, level: str
) -> Iterator[np.ndarray]:
    """Yield the (chunk, n_bins) count matrices of ``n_boot`` draws, in memory-bounded chunks."""
    h = hierarchy
    slots = {
        "session": h.n_sessions,
        "run": h.n_sessions * int(h.runs_per_session.max()),
        "bin": h.n_sessions * int(h.runs_per_session.max()) * int(h.bins_per_run.max()),
    }[level]
    chunk = max(1, MAX_CELLS_PER_CHUNK // max(slots, h.n_bins, 1))
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        n = min(chunk, n_boot - done)
        yield draw_bin_counts(h, rng, n, level)
        done += n


def weighted_pearson_rows(counts: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of (x, y) repeated ``counts[i]`` times, for each row i: (n_rows,) float.

    Equals ``pearsonr(np.repeat(x, c), np.repeat(y, c))``; NaN for < 3 samples or a constant.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if is_constant(x) or is_constant(y):
        return np.full(counts.shape[0], np.nan)
    x = x - x.mean()  # centring first keeps the sums-of-squares formula well conditioned
    y = y - y.mean()
    # all five weighted sums in one matrix product: (n_rows, n_bins) @ (n_bins, 6)
    sums = counts @ np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=1)
    n, sx, sy, sxx, syy, sxy = sums.T
    with np.errstate(divide="ignore", invalid="ignore"):
        vx = sxx - sx * sx / n
        vy = syy - sy * sy / n
        r = (sxy - sx * sy / n) / np.sqrt(vx * vy)
    # a draw of one repeated value leaves only rounding noise in vx / vy: call it constant
    tiny = 1e-10
    degenerate = (n < 3) | (vx <= tiny * sxx) | (vy <= tiny * syy) | (vx <= 0) | (vy <= 0)
    return np.where(degenerate, np.nan, np.clip(r, -1.0, 1.0))


def weighted_median(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.median`` of ``values`` repeated ``counts[i]`` times, for each row i: (n_rows,)."""
    order = np.argsort(values, kind="stable")
    sorted_values = np.asarray(values, dtype=np.float64)[order]
    cum = np.cumsum(counts[:, order], axis=1)
    n = cum[:, -1]
    lower = np.floor((n - 1) / 2)[:, None]  # 0-based positions of the two middle samples
    upper = np.floor(n / 2)[:, None]
    last = sorted_values.size - 1
    i_low = np.minimum((cum <= lower).sum(axis=1), last)
    i_up = np.minimum((cum <= upper).sum(axis=1), last)
    return np.where(n > 0, (sorted_values[i_low] + sorted_values[i_up]) / 2, np.nan)


def weighted_auc_rows(counts: np.ndarray, rating: np.ndarray, prediction: np.ndarray):
    """Median-split ROC AUC of ``prediction`` for each row of resample counts: (n_rows,).

    Per row: the threshold is the row's own median rating; samples above are positives, below
    negatives, at the median dropped. The AUC is the Mann-Whitney statistic
    P(pred_pos > pred_neg) + 0.5 P(tie), computed from cumulative negative counts over the
    predictions sorted once (ties grouped), so no per-row sort is needed.
    """
    rating = np.asarray(rating, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    median = weighted_median(counts, rating)[:, None]
    order = np.argsort(prediction, kind="stable")
    sorted_pred = prediction[order]
    tie_start = np.flatnonzero(np.r_[True, sorted_pred[1:] != sorted_pred[:-1]])
    c = counts[:, order]
    r = rating[order][None, :]
    pos = np.add.reduceat(c * (r > median), tie_start, axis=1)  # (n_rows, n_unique_predictions)
    neg = np.add.reduceat(c * (r < median), tie_start, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    u = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
    n_pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_pairs > 0, u / n_pairs, np.nan)


def bootstrap_draws(
    binned_tables: list[pd.DataFrame], n_boot: int = 10_000, seed: int = 0, level: str = "auto"
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Pooled r and AUC of each table under the **same** hierarchical resamples.

    All tables must share the bin hierarchy (same subject/session/run/bin rows); each is sorted
    with ``sort_bins`` first. Returns ([{"r": (n_boot,), "auc": (n_boot,)} per table], level).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    tables = [sort_bins(t) for t in binned_tables]
    hierarchy = bin_hierarchy(tables[0])
    level = resolve_level(hierarchy, level)
    draws = [{"r": np.full(n_boot, np.nan), "auc": np.full(n_boot, np.nan)} for _ in tables]
    if hierarchy.n_bins == 0:
        return draws, level
    arrays = [(t["rating"].to_numpy(float), t["prediction"].to_numpy(float)) for t in tables]
    start = 0
    for counts in iter_bin_counts(hierarchy, n_boot, seed, level):
        stop = start + counts.shape[0]
        for out, (rating, prediction) in zip(draws, arrays, strict=True):
            out["r"][start:stop] = weighted_pearson_rows(counts, rating, prediction)
            out["auc"][start:stop] = weighted_auc_rows(counts, rating, prediction)
        start = stop
    return draws, level


def summarize_draws(draws: np.ndarray, null: float, n_boot: int) -> dict[str, float]:
    """95% percentile CI, two-sided p against ``null`` and SE of bootstrap draws.

    p = 2 x the smaller fraction of (finite) draws at-or-below / at-or-above the null value,
    floored at 1 / (n_boot + 1) and capped at 1. All NaN when no draw is finite.
    """
    d = np.asarray(draws, dtype=np.float64)
    d = d[np.isfinite(d)]
    nan = float("nan")
    if d.size == 0:
        return {"ci_low": nan, "ci_high": nan, "p": nan, "se": nan}
    low, high = np.percentile(d, [2.5, 97.5])
    tail = min(np.mean(d <= null), np.mean(d >= null))
    p = float(np.clip(2.0 * tail, 1.0 / (n_boot + 1), 1.0))
    se = float(d.std(ddof=1)) if d.size > 1 else nan
    return {"ci_low": float(low), "ci_high": float(high), "p": p, "se": se}


def hierarchical_bootstrap(
    binned: pd.DataFrame, n_boot: int = 10_000, seed: int = 0, level: str = "auto"
) -> dict:
    """Bootstrap CIs and p-values of pooled r and AUC of one binned table.

    Returns ``{"r": {ci_low, ci_high, p, se}, "auc": {...}, "level": str, "n_boot": int}``
    (null values: r = 0, AUC = 0.5).
    """
    (draws,), level = bootstrap_draws([binned], n_boot=n_boot, seed=seed, level=level)
    result: dict = {
        name: summarize_draws(draws[name], null, n_boot) for name, null in NULL_VALUES.items()
    }
    result["level"] = level
    result["n_boot"] = int(n_boot)
    return result
