"""Hierarchical bootstrap of pooled r, AUC and within-run / within-session r (vectorised).

One bootstrap draw resamples sessions with replacement, then (for each drawn session) as many
runs as it has, with replacement, from that session, then (for each drawn run) as many bins as it
has from that run -- the study's scheme (analysis_visualize_model_test.m:65-95). A draw is
therefore a multiset of the observed bins, fully described by how many times it took each bin:
a row of a ``(n_draws, n_bins)`` count matrix. Pooled Pearson r and the median-split AUC are
weighted statistics of those counts, so all draws are computed at once with matrix products and
cumulative sums -- no Python loop over draws (only over memory-bounded chunks of draws).

Within-run r (the mean of each run's r over its bins) is bootstrapped as the study does
(analysis_visualize_model_test.m:171-174): the per-run r values are fixed, and each draw averages
them over its session -> run resample; within-session r likewise over the session resample
(lines 215-218). Both reuse the run / session part of the same draws.

Sessions are keyed by (subject, session), so a table pooling several subjects resamples their
sessions together.

The rules that differ between painnet and the study are fields of
:class:`~painnet.evaluation.protocol.EvalProtocol`:

- AUC labels (``auc_labels``): painnet recomputes the median threshold in every draw on the
  draw's own ratings (each draw re-runs exactly the statistic ``compute_metrics`` computes); the
  study labels bins once by the observed pooled median and keeps the labels fixed.
- One-class draws (``one_class``): painnet leaves the AUC of a draw with only one class NaN; the
  study redraws it, and the redrawn set serves every metric of that bin size.
- p and CI (``p_value``, ``ci``): see :func:`summarize_draws`.
- Too few units (``min_units``): with fewer resampled units than that, CI and p are NaN and the
  result's ``reasons`` say why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from painnet.evaluation.metrics import is_constant, median_labels, pearson_r
from painnet.evaluation.protocol import EvalProtocol, as_protocol

log = logging.getLogger(__name__)

LEVELS = ("session", "run", "bin")
NULL_VALUES = {"r": 0.0, "auc": 0.5}
# every statistic bootstrapped, with its null value
BOOT_METRICS = {"r": 0.0, "auc": 0.5, "within_run_r": 0.0, "within_session_r": 0.0}
# Cells (draws x bins) per chunk: small enough that a chunk's float64 arrays (~1 MB each) stay in
# cache across the ~20 passes over them -- 2-3x faster than 2M-cell chunks (measured on the
# 1,530-bin paper table, benchmarks/stage_evaluation.py).
MAX_CELLS_PER_CHUNK = 1 << 17
# With one_class="redraw", give up after drawing this many times n_boot (labels nearly all one
# class); the draws still missing stay NaN and the reason is reported.
MAX_REDRAW_FACTOR = 50


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

    @property
    def session_of_run(self) -> np.ndarray:
        return self.session_of_bin[self.bin_start]


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
        flat = flat[np.broadcast_to(valid, index.shape).reshape(n_rows, -1)]
    counts = np.bincount(flat.ravel(), minlength=n_rows * size)
    return counts.reshape(n_rows, size).astype(np.float64)


def _uniform_ints(rng: np.random.Generator, high: np.ndarray, shape: tuple) -> np.ndarray:
    """Uniform ints in ``[0, high)`` of ``shape`` (``high`` broadcasts to it).

    A scalar bound draws ~4x faster than an array of bounds, so equal sizes (the usual case:
    3 runs per session, 10 bins per run) take that path; unequal sizes scale a uniform float.
    """
    lo, hi = int(np.min(high)), int(np.max(high))
    if lo == hi:
        return rng.integers(0, hi, size=shape)
    scaled = (rng.random(shape) * high).astype(np.int64)
    return np.minimum(scaled, np.asarray(high) - 1)


@dataclass
class CountDraws:
    """Counts of one chunk of draws at every level: bins (d, n_bins), runs (d, n_runs) or None
    (session-level draws), sessions (d, n_sessions)."""

    bins: np.ndarray
    runs: np.ndarray | None
    sessions: np.ndarray

    def subset(self, rows: np.ndarray) -> CountDraws:
        return CountDraws(
            self.bins[rows], None if self.runs is None else self.runs[rows], self.sessions[rows]
        )


def draw_counts(
    hierarchy: BinHierarchy, rng: np.random.Generator, n_draws: int, level: str
) -> CountDraws:
    """Counts of each bin, run and session in ``n_draws`` hierarchical resamples.

    Runs and bins are drawn into padded slots (max runs per session, max bins per run) and the
    slots beyond a session's/run's real size are masked out, so unequal sizes are exact.
    """
    h = hierarchy
    sessions = rng.integers(0, h.n_sessions, size=(n_draws, h.n_sessions))
    session_counts = _row_bincount(sessions, h.n_sessions)
    if level == "session":
        return CountDraws(np.take(session_counts, h.session_of_bin, axis=1), None, session_counts)
    n_run = h.runs_per_session[sessions][..., None]  # (d, S, 1)
    max_runs = int(h.runs_per_session.max())
    local_run = _uniform_ints(rng, n_run, (n_draws, h.n_sessions, max_runs))
    run_valid = None
    if int(h.runs_per_session.min()) < max_runs:
        run_valid = np.arange(max_runs) < n_run
    runs = h.run_start[sessions][..., None] + local_run  # (d, S, R); padded slots stay in range
    run_counts = _row_bincount(runs, h.n_runs, run_valid)
    if level == "run":
        return CountDraws(np.take(run_counts, h.run_of_bin, axis=1), run_counts, session_counts)
    n_bin = h.bins_per_run[runs][..., None]  # (d, S, R, 1)
    max_bins = int(h.bins_per_run.max())
    local_bin = _uniform_ints(rng, n_bin, (*runs.shape, max_bins))
    bin_valid = None
    if run_valid is not None or int(h.bins_per_run.min()) < max_bins:
        bin_valid = np.arange(max_bins) < n_bin
        if run_valid is not None:
            bin_valid = bin_valid & run_valid[..., None]
    bins = h.bin_start[runs][..., None] + local_bin
    return CountDraws(_row_bincount(bins, h.n_bins, bin_valid), run_counts, session_counts)


def draw_bin_counts(
    hierarchy: BinHierarchy, rng: np.random.Generator, n_draws: int, level: str
) -> np.ndarray:
    """Counts of each bin in ``n_draws`` hierarchical resamples: (n_draws, n_bins) float."""
    return draw_counts(hierarchy, rng, n_draws, level).bins


def _chunk_size(hierarchy: BinHierarchy, level: str) -> int:
    h = hierarchy
    slots = {
        "session": h.n_sessions,
        "run": h.n_sessions * int(h.runs_per_session.max()),
        "bin": h.n_sessions * int(h.runs_per_session.max()) * int(h.bins_per_run.max()),
    }[level]
    return max(1, MAX_CELLS_PER_CHUNK // max(slots, h.n_bins, 1))


def iter_bin_counts(
    hierarchy: BinHierarchy, n_boot: int, seed: int, level: str
) -> Iterator[np.ndarray]:
    """Yield the (chunk, n_bins) count matrices of ``n_boot`` draws, in memory-bounded chunks."""
    chunk = _chunk_size(hierarchy, level)
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        n = min(chunk, n_boot - done)
        yield draw_bin_counts(hierarchy, rng, n, level)
        done += n


# --------------------------------------------------------------------------- row statistics


def weighted_pearson_rows(counts: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of (x, y) repeated ``counts[i]`` times, for each row i: (n_rows,) float.

    Equals ``pearsonr(np.repeat(x, c), np.repeat(y, c))``; NaN for < 3 samples or a constant.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if is_constant(x) or is_constant(y):
        return np.full(counts.shape[0], np.nan)
    return _pearson_from_sums(counts @ _pearson_columns(x, y))


def _pearson_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, 6) columns whose count-weighted sums give r (centring keeps them well conditioned)."""
    x = x - x.mean()
    y = y - y.mean()
    return np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=1)


def _pearson_from_sums(sums: np.ndarray) -> np.ndarray:
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
    return _weighted_median_sorted(
        np.take(counts, order, axis=1), np.asarray(values, dtype=np.float64)[order]
    )


def _weighted_median_sorted(sorted_counts: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """Row-wise median for counts already in ascending-value order (one batched search)."""
    cum = np.cumsum(sorted_counts, axis=1)
    n_rows, n_cols = cum.shape
    n = cum[:, -1]
    # rows are non-decreasing; offsetting row i by i * (max total + 1) makes the whole flattened
    # matrix non-decreasing, so one searchsorted finds every row's two middle samples
    offset = (np.arange(n_rows) * (float(n.max(initial=0.0)) + 1.0))[:, None]
    flat = (cum + offset).ravel()
    last = n_cols - 1
    out = np.zeros(n_rows)
    for middle in (np.floor((n - 1) / 2), np.floor(n / 2)):  # 0-based middle positions
        pos = np.searchsorted(flat, middle + offset[:, 0], side="right")
        out += sorted_values[np.minimum(pos - np.arange(n_rows) * n_cols, last)]
    return np.where(n > 0, out / 2, np.nan)


def weighted_auc_rows(
    counts: np.ndarray,
    rating: np.ndarray,
    prediction: np.ndarray,
    median_tie: str = "drop",
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Median-split ROC AUC of ``prediction`` for each row of resample counts: (n_rows,).

    Per row: the threshold is the row's own median rating (``labels=None``); samples above are
    positives, below negatives, at the median dropped (``median_tie="drop"``) or negatives
    (``"low"``). With ``labels`` ((n,) bool, e.g. from the observed median) every row uses
    those fixed labels. The AUC is the Mann-Whitney statistic P(pred_pos > pred_neg) +
    0.5 P(tie), computed from cumulative negative counts over the predictions sorted once
    (ties grouped), so no per-row sort is needed. NaN where a row has no pair.
    """
    auc = _AucRows(np.asarray(rating, float), np.asarray(prediction, float), median_tie, labels)
    return auc(counts)[0]


class _AucRows:
    """Precomputed sort orders of one table's bins for row-wise AUC; call with counts."""

    def __init__(self, rating, prediction, median_tie: str, labels: np.ndarray | None) -> None:
        self.median_tie = median_tie
        self.order = np.argsort(prediction, kind="stable")
        sorted_pred = prediction[self.order]
        self.tie_start = np.flatnonzero(np.r_[True, sorted_pred[1:] != sorted_pred[:-1]])
        self.has_ties = self.tie_start.size < sorted_pred.size
        self.rating_sorted = rating[self.order]
        self.rating_order = np.argsort(rating, kind="stable")
        self.rating_by_value = rating[self.rating_order]
        self.fixed = labels is not None
        if self.fixed:
            labels = np.asarray(labels, dtype=bool)
            self.pos_cols = np.flatnonzero(labels[self.order])  # positions in prediction order
            self.neg_cols = np.flatnonzero(~labels[self.order])
            # negatives strictly below each positive (no ties in this fast path)
            self.neg_below = np.searchsorted(self.neg_cols, self.pos_cols)
            self.pos_mask = labels[self.order].astype(np.float64)

    def __call__(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(AUC (d,), number of positive x negative pairs (d,)) of each row of counts."""
        if self.fixed and not self.has_ties:
            return self._fixed_no_ties(counts)
        c = np.take(counts, self.order, axis=1)
        if self.fixed:
            pos = c * self.pos_mask
            neg = c - pos
        else:
            m = _weighted_median_sorted(
                np.take(counts, self.rating_order, axis=1), self.rating_by_value
            )[:, None]
            pos = c * (self.rating_sorted > m)
            neg = c - pos if self.median_tie == "low" else c * (self.rating_sorted < m)
        if self.has_ties:
            pos = np.add.reduceat(pos, self.tie_start, axis=1)
            neg = np.add.reduceat(neg, self.tie_start, axis=1)
        below = np.cumsum(neg, axis=1)
        below -= 0.5 * neg  # strictly below + half of the tied negatives
        u = np.einsum("ij,ij->i", pos, below)
        n_pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n_pairs > 0, u / n_pairs, np.nan), n_pairs

    def _fixed_no_ties(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.take(counts, self.order[self.pos_cols], axis=1)
        neg = np.take(counts, self.order[self.neg_cols], axis=1)
        cum = np.cumsum(neg, axis=1)
        n_neg = cum[:, -1] if cum.shape[1] else np.zeros(counts.shape[0])
        below = np.zeros_like(pos)
        has_below = self.neg_below > 0
        below[:, has_below] = np.take(cum, self.neg_below[has_below] - 1, axis=1)
        u = np.einsum("ij,ij->i", pos, below)
        n_pairs = pos.sum(axis=1) * n_neg
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n_pairs > 0, u / n_pairs, np.nan), n_pairs


# --------------------------------------------------------------------------- one table


class _TableDraws:
    """Everything precomputed for bootstrapping one sorted binned table."""

    def __init__(
        self, binned: pd.DataFrame, hierarchy: BinHierarchy, protocol: EvalProtocol
    ) -> None:
        rating = binned["rating"].to_numpy(float)
        prediction = binned["prediction"].to_numpy(float)
        self.constant = is_constant(rating) or is_constant(prediction)
        self.columns = None if self.constant else _pearson_columns(rating, prediction)
        labels = None
        self.auc_weight = None
        if protocol.auc_labels == "observed" and rating.size:
            labels, keep = median_labels(rating, protocol.median_tie)
            if not keep.all():  # bins at the observed median are dropped: weight 0 in each draw
                self.auc_weight = keep.astype(np.float64)
        self.auc = _AucRows(rating, prediction, protocol.median_tie, labels)
        self.run_r = _group_r(rating, prediction, hierarchy.run_of_bin, hierarchy.n_runs)
        self.session_r = _group_r(
            rating, prediction, hierarchy.session_of_bin, hierarchy.n_sessions
        )

    def auc_rows(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.auc_weight is not None:
            counts = counts * self.auc_weight
        return self.auc(counts)

    def rows(self, draws: CountDraws, auc: tuple | None = None) -> dict[str, np.ndarray]:
        d = draws.bins.shape[0]
        r = np.full(d, np.nan) if self.constant else _pearson_from_sums(draws.bins @ self.columns)
        auc_values = (auc or self.auc_rows(draws.bins))[0]
        out = {"r": r, "auc": auc_values}
        out["within_run_r"] = _mean_of_group_r(draws.runs, self.run_r, d)
        out["within_session_r"] = _mean_of_group_r(draws.sessions, self.session_r, d)
        return out


def _group_r(rating, prediction, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Pearson r of the bins of each group (run or session): (n_groups,), NaN if undefined."""
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], group.size]
    out = np.full(n_groups, np.nan)
    for s, e in zip(starts, ends, strict=True):
        out[group[s]] = pearson_r(rating[s:e], prediction[s:e])
    return out


def _mean_of_group_r(counts: np.ndarray | None, group_r: np.ndarray, d: int) -> np.ndarray:
    """Per draw: mean of the groups' fixed r over the drawn groups (undefined r left out)."""
    finite = np.isfinite(group_r)
    if counts is None or not finite.any():
        return np.full(d, np.nan)
    c = counts[:, finite]
    total = c.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, (c @ group_r[finite]) / total, np.nan)


# --------------------------------------------------------------------------- draws


def bootstrap_draws(
    binned_tables: list[pd.DataFrame],
    n_boot: int = 10_000,
    seed: int = 0,
    level: str = "auto",
    protocol: EvalProtocol | None = None,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Bootstrap statistics of each table under the **same** hierarchical resamples.

    All tables must share the bin hierarchy (same subject/session/run/bin rows) and, for
    ``one_class="redraw"``, the ratings (the first table's labels decide which draws are
    redrawn); each is sorted with ``sort_bins`` first. Returns ([{"r", "auc", "within_run_r",
    "within_session_r": (n_boot,) each} per table], level).
    """
    draws, level, _ = _bootstrap_draws(binned_tables, n_boot, seed, level, as_protocol(protocol))
    return draws, level


def _bootstrap_draws(
    binned_tables: list[pd.DataFrame],
    n_boot: int,
    seed: int,
    level: str,
    protocol: EvalProtocol,
) -> tuple[list[dict[str, np.ndarray]], str, dict]:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    tables = [sort_bins(t) for t in binned_tables]
    hierarchy = bin_hierarchy(tables[0])
    level = resolve_level(hierarchy, level)
    draws = [{name: np.full(n_boot, np.nan) for name in BOOT_METRICS} for _ in tables]
    info = {"n_redrawn": 0, "redraw_exhausted": False}
    if hierarchy.n_bins == 0:
        return draws, level, info
    stats = [_TableDraws(t, hierarchy, protocol) for t in tables]
    info["units"] = _units(hierarchy, level, stats[0])
    redraw = protocol.one_class == "redraw"
    if redraw and stats[0].auc_rows(np.ones((1, hierarchy.n_bins)))[1][0] == 0:
        # the observed bins hold one class: no draw can hold two, so none is redrawn
        redraw = False
        info["one_class_observed"] = True
    rng = np.random.default_rng(seed)
    chunk = _chunk_size(hierarchy, level)
    filled = attempted = 0
    while filled < n_boot:
        if redraw and attempted >= MAX_REDRAW_FACTOR * n_boot:
            info["redraw_exhausted"] = True
            break
        n = min(chunk, n_boot - filled)
        counts = draw_counts(hierarchy, rng, n, level)
        attempted += n
        first_auc = stats[0].auc_rows(counts.bins)
        if redraw:
            keep = first_auc[1] > 0  # both classes present
            info["n_redrawn"] += int(n - keep.sum())
            if not keep.all():
                counts = counts.subset(keep)
                first_auc = (first_auc[0][keep], first_auc[1][keep])
        stop = filled + counts.bins.shape[0]
        for i, (out, table_stats) in enumerate(zip(draws, stats, strict=True)):
            rows = table_stats.rows(counts, first_auc if i == 0 else None)
            for name, values in rows.items():
                out[name][filled:stop] = values
        filled = stop
    return draws, level, info


# --------------------------------------------------------------------------- summaries


def summarize_draws(
    draws: np.ndarray,
    null: float,
    n_boot: int,
    p_value: str = "capped",
    ci: str = "percentile",
) -> dict[str, float]:
    """95% CI, two-sided p against ``null`` and SE of bootstrap draws.

    ``p_value="capped"`` (painnet): p = 2 x the smaller fraction of finite draws at-or-below /
    at-or-above the null value, floored at 1 / (n_boot + 1) and capped at 1.
    ``p_value="study"``: p = 2 min((k_le + 1)/(n + 1), (k_ge + 1)/(n + 1)), uncapped, with n
    all draws and NaN draws counted in neither tail (Functions/boot2cip.m:20-22).
    ``ci="percentile"`` (painnet): ``np.percentile(finite draws, [2.5, 97.5])``.
    ``ci="study"``: ``sorted[round(0.025 n)]`` and ``sorted[round(0.975 n)]`` as 1-based
    MATLAB indices, rounding halves away from zero, NaN sorted last (boot2cip.m:18-19): for
    n = 10,000 the 250th and 9,750th smallest draws.
    All NaN when no draw is finite.
    """
    d_all = np.asarray(draws, dtype=np.float64)
    d = d_all[np.isfinite(d_all)]
    nan = float("nan")
    if d.size == 0:
        return {"ci_low": nan, "ci_high": nan, "p": nan, "se": nan}
    if ci == "study":
        low, high = _study_ci(d_all)
    elif ci == "percentile":
        low, high = np.percentile(d, [2.5, 97.5])
    else:
        raise ValueError(f"ci must be 'percentile' or 'study', got {ci!r}")
    if p_value == "study":
        n = d_all.size
        k_le, k_ge = np.sum(d <= null), np.sum(d >= null)
        p = float(2.0 * min((k_le + 1) / (n + 1), (k_ge + 1) / (n + 1)))
    elif p_value == "capped":
        tail = min(np.mean(d <= null), np.mean(d >= null))
        p = float(np.clip(2.0 * tail, 1.0 / (n_boot + 1), 1.0))
    else:
        raise ValueError(f"p_value must be 'capped' or 'study', got {p_value!r}")
    se = float(d.std(ddof=1)) if d.size > 1 else nan
    return {"ci_low": float(low), "ci_high": float(high), "p": p, "se": se}


def matlab_round(x: float) -> int:
    """MATLAB ``round``: halves away from zero (Python's ``round`` rounds halves to even)."""
    return int(np.sign(x) * np.floor(abs(x) + 0.5))


def _study_ci(draws: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """boot2cip.m 'perc': 1-based order statistics round(n alpha/2), round(n (1 - alpha/2))."""
    n = draws.size
    ordered = np.sort(draws)  # numpy, like MATLAB's sort, puts NaN last
    lo = min(max(matlab_round(n * alpha / 2), 1), n)
    hi = min(max(matlab_round(n * (1 - alpha / 2)), 1), n)
    return float(ordered[lo - 1]), float(ordered[hi - 1])


def _units(hierarchy: BinHierarchy, level: str, stats: _TableDraws) -> dict[str, tuple]:
    """Resampled units of each statistic: (count, what) for the min_units check."""
    at_level = {
        "bin": (hierarchy.n_bins, "bins"),
        "run": (hierarchy.n_runs, "runs"),
        "session": (hierarchy.n_sessions, "sessions"),
    }[level]
    return {
        "r": at_level,
        "auc": at_level,
        "within_run_r": (int(np.isfinite(stats.run_r).sum()), "runs with a within-run r"),
        "within_session_r": (
            int(np.isfinite(stats.session_r).sum()),
            "sessions with a within-session r",
        ),
    }


def hierarchical_bootstrap(
    binned: pd.DataFrame,
    n_boot: int = 10_000,
    seed: int = 0,
    level: str = "auto",
    protocol: EvalProtocol | None = None,
) -> dict:
    """Bootstrap CIs and p-values of pooled r, AUC, within-run r and within-session r.

    Returns ``{"r": {ci_low, ci_high, p, se}, "auc": {...}, "within_run_r": {...},
    "within_session_r": {...}, "level": str, "n_boot": int, "n_redrawn": int,
    "reasons": {metric: why CI and p are undefined}}`` (null values: r = 0, AUC = 0.5).
    A statistic resampled over fewer than ``protocol.min_units`` units (e.g. 3 runs, 1 session)
    gets NaN CI and p and a reason, never a floor p.
    """
    protocol = as_protocol(protocol)
    draws, level, info = _bootstrap_draws([binned], n_boot, seed, level, protocol)
    draws = draws[0]
    result: dict = {}
    reasons: dict[str, str] = {}
    units = info.get("units", {})
    for name, null in BOOT_METRICS.items():
        summary = summarize_draws(draws[name], null, n_boot, protocol.p_value, protocol.ci)
        count, what = units.get(name, (0, "bins"))
        if count < protocol.min_units and np.isfinite(summary["p"]):
            reasons[name] = (
                f"only {count} {what} to resample (< eval.protocol.min_units="
                f"{protocol.min_units}): a bootstrap CI and p would be meaningless"
            )
            summary = {**summary, "ci_low": np.nan, "ci_high": np.nan, "p": np.nan}
        result[name] = summary
    if info.get("one_class_observed"):
        reasons["auc"] = "the observed bins hold one class only: AUC is undefined"
    if info["redraw_exhausted"]:
        reasons["auc"] = (
            f"one-class draws redrawn {MAX_REDRAW_FACTOR} x n_boot times without filling "
            f"n_boot={n_boot}: labels are (nearly) all one class"
        )
        for name in BOOT_METRICS:
            result[name] = {**result[name], "ci_low": np.nan, "ci_high": np.nan, "p": np.nan}
    if reasons:
        log.info(
            "bootstrap at level %s: CI and p undefined for %s",
            level,
            "; ".join(f"{name} ({why})" for name, why in reasons.items()),
        )
    result["level"] = level
    result["n_boot"] = int(n_boot)
    result["n_redrawn"] = int(info["n_redrawn"])
    result["reasons"] = reasons
    return result
