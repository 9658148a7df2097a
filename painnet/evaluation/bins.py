"""Average a frame-level prediction table into the study's time bins.

The prediction table is the single hand-off between every model (deep or classical) and the
evaluation: one row per frame of a held-out run, with columns

    subject, session, run (str), frame (int), time_s (float, frame onset in s),
    rating (float, NaN where the frame has no valid target), prediction (float),
    fold (int or str), optional run_duration_s (full stored run length in s), optional model.

Time bins follow the reference study: inside each run the usable frames (finite rating and
prediction, in frame order; censored frames are already gone) are cut into ``n_bins`` contiguous
groups, with ``n_bins = max(1, round(run_duration_s / bin_seconds))`` -- 10 one-minute or
5 two-minute bins for a 600 s run -- or a fixed count per run (``EvalProtocol.bins_per_run``, the
study's 10 / 5). Because the count is fixed by the run length and not by the usable frames, a run
that lost its first 30 s still gets 10 "1-minute" bins, each a bit shorter. The groups have equal
frame counts (``EvalProtocol.bin_rule="equal_count"``) or follow MATLAB's
``discretize(1:n_kept, nbin)`` as the study does (``"discretize"``, analysis_rating.m:95).
A session's value is the mean of its run means (``session_value="run_means"``, the study's
analysis_visualize_model_test.m:53-54) or of all its frames (``"frames"``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from painnet.evaluation.protocol import EvalProtocol, as_protocol
from painnet.evaluation.table import BIN_SIZES, REQUIRED_COLUMNS, RUN_KEYS, SESSION_KEYS

BINNED_COLUMNS = [
    "subject",
    "session",
    "run",
    "bin",
    "rating",
    "prediction",
    "n_frames",
    "time_s",
]


def validate_table(table: pd.DataFrame, name: str = "prediction table") -> pd.DataFrame:
    """Check a prediction table and return a normalised copy.

    The copy has string ``subject/session/run``, integer ``frame``, float ``time_s``, ``rating``
    and ``prediction`` (and ``run_duration_s`` when present), is sorted by run then frame, and
    carries an integer ``run_id`` column (runs numbered in sorted key order). Raises ValueError
    naming missing columns, a mix of several models, or duplicated frames.
    """
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{name}: expected a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"{name}: missing required column(s) {missing}; "
            f"expected {list(REQUIRED_COLUMNS)} (+ optional run_duration_s, model)"
        )
    if "model" in table.columns and table["model"].nunique(dropna=False) > 1:
        models = sorted(map(str, table["model"].unique()))
        raise ValueError(
            f"{name}: holds several models {models}; score them separately "
            "(e.g. painnet.evaluation.evaluate_by(table, by=['model']))"
        )
    out = table.copy()
    for col in RUN_KEYS:
        out[col] = out[col].astype(str)
    out["frame"] = out["frame"].astype(np.int64)
    for col in ("time_s", "rating", "prediction"):
        out[col] = pd.to_numeric(out[col], errors="raise").astype(np.float64)
    if "run_duration_s" in out.columns:
        out["run_duration_s"] = pd.to_numeric(out["run_duration_s"]).astype(np.float64)
    # factorise the string keys once; every later grouping uses the integer run_id
    out["run_id"] = out.groupby(RUN_KEYS, sort=True).ngroup().to_numpy()
    out = out.sort_values(["run_id", "frame"], kind="stable").reset_index(drop=True)
    dup = (out["run_id"].diff() == 0).to_numpy() & (out["frame"].diff() == 0).to_numpy()
    if dup.any():
        first = out.loc[dup, RUN_KEYS + ["frame"]].iloc[0].tolist()
        raise ValueError(
            f"{name}: {int(dup.sum())} duplicated (subject, session, run, frame) rows, "
            f"e.g. {first}; one prediction per frame is expected"
        )
    return out


def usable_frames(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of a validated table with a finite rating and prediction (still run/frame order)."""
    keep = np.isfinite(table["rating"].to_numpy()) & np.isfinite(table["prediction"].to_numpy())
    return table.loc[keep].reset_index(drop=True)


def run_durations(table: pd.DataFrame) -> np.ndarray:
    """Length of each run in seconds, indexed by ``run_id`` of a validated table: (n_runs,).

    Uses ``run_duration_s`` where given; otherwise (or where it is NaN) the span of all the run's
    frames in the table -- usable or not -- i.e. max - min onset + the median frame step.
    """
    run_id = table["run_id"]
    time_s = table["time_s"]
    step = time_s.diff().where(run_id.diff() == 0)  # no step across a run boundary
    span = time_s.groupby(run_id).max() - time_s.groupby(run_id).min()
    # a one-frame run has no step: its span is 0 s, i.e. a single bin
    span = (span + step.groupby(run_id).median()).fillna(0.0).to_numpy()
    if "run_duration_s" in table.columns:
        given = table["run_duration_s"].groupby(run_id).max().to_numpy()
        span = np.where(np.isfinite(given), given, span)
    return span


def n_time_bins(duration_s: np.ndarray, bin_seconds: float) -> np.ndarray:
    """``max(1, round(duration / bin_seconds))`` per run, rounding halves up (int array)."""
    n = np.floor(np.asarray(duration_s, dtype=np.float64) / bin_seconds + 0.5)
    return np.maximum(1, np.nan_to_num(n, nan=1.0)).astype(np.int64)


def equal_count_bin_index(position: np.ndarray, n_items: np.ndarray, n_bins: np.ndarray):
    """Bin of each item when ``n_items`` items are split like ``np.array_split(.., n_bins)``.

    All arrays are per item (same shape): the item's 0-based position in its run, the run's item
    count and bin count. The first ``n_items % n_bins`` bins get one extra item.
    """
    q, rem = np.divmod(n_items, n_bins)
    n_big = rem * (q + 1)  # items held by the larger bins
    in_big = position < n_big
    small_q = np.where(q > 0, q, 1)  # q == 0 only when every item sits in a big bin
    return np.where(in_big, position // (q + 1), rem + (position - n_big) // small_q)


def matlab_discretize_edges(xmin: float, xmax: float, n_bins: int) -> np.ndarray:
    """Bin edges (n_bins + 1,) of MATLAB ``[~, E] = discretize(X, n_bins)`` for data in
    ``[xmin, xmax]``.

    MATLAB's documented rule for ``discretize(X, N)`` / ``histcounts(X, N)``: N bins of one
    uniform width rounded to a "nice" value. The provisional width ``(xmax - xmin) / N`` is
    floored to its leading digit times a power of ten; the left edge is ``xmin`` floored to a
    multiple of that; the final width is the smallest multiple of ``p10 = 10**floor(log10(ul -
    ll))`` at or above ``ll = (xmax - left) / N`` (``ul = (xmax - left) / (N - 1)``), so xmax
    falls in the last bin, which is usually short. Checked on the example of issue 12:
    ``discretize(1:304, 5)`` gives edges 0, 70, ..., 350 and bins of 69/70/70/70/25.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    xrange = xmax - xmin
    if not xrange > 0:
        # constant data (one frame): unit-wide bins centred on the value
        left = xmin - math.floor(n_bins / 2)
        return left + np.arange(n_bins + 1, dtype=np.float64)
    raw = xrange / n_bins
    pow10 = 10.0 ** math.floor(math.log10(raw))
    width = pow10 * math.floor(raw / pow10)
    left = min(width * math.floor(xmin / width), xmin)
    if n_bins > 1:
        low = (xmax - left) / n_bins
        high = (xmax - left) / (n_bins - 1)
        p10 = 10.0 ** math.floor(math.log10(high - low))
        width = p10 * math.ceil(low / p10)
    right = max(left + n_bins * width, xmax)
    return np.r_[left, left + np.arange(1, n_bins) * width, right]


def discretize_positions(n_items: int, n_bins: int) -> np.ndarray:
    """0-based bin of items 1..n_items under MATLAB ``discretize(1:n_items, n_bins)`` (n_items,).

    The study's time bins (analysis_rating.m:95): positions of the kept frames, so censored
    frames are gone before binning. A bin may stay empty (e.g. 3 frames in 10 bins).
    """
    if n_items < 1:
        return np.zeros(0, dtype=np.int64)
    edges = matlab_discretize_edges(1.0, float(n_items), n_bins)
    x = np.arange(1, n_items + 1, dtype=np.float64)
    # bin j holds edges[j] <= x < edges[j+1]; the last bin also holds its right edge
    index = np.searchsorted(edges, x, side="right") - 1
    return np.clip(index, 0, n_bins - 1).astype(np.int64)


def bin_predictions(
    table: pd.DataFrame, bin_size: str, protocol: EvalProtocol | None = None
) -> pd.DataFrame:
    """Average ratings and predictions into bins of ``bin_size`` (a key of ``BIN_SIZES``).

    Returns one row per bin with columns subject, session, run (``"all"`` for session bins),
    bin (0-based within run), rating, prediction (means over the bin's usable frames, or for
    session bins the mean of the run means under ``protocol.session_value="run_means"``),
    n_frames and time_s (mean frame onset of the bin, s; for plots). Rows are ordered by run
    then bin. ``protocol`` (default: painnet's) chooses the bin rule and count, see
    :class:`~painnet.evaluation.protocol.EvalProtocol`.
    """
    return bin_validated(validate_table(table), bin_size, protocol)


def bin_validated(
    table: pd.DataFrame, bin_size: str, protocol: EvalProtocol | None = None
) -> pd.DataFrame:
    """``bin_predictions`` for a table already passed through ``validate_table``."""
    if bin_size not in BIN_SIZES:
        raise ValueError(f"unknown bin size {bin_size!r}; choose one of {list(BIN_SIZES)}")
    protocol = as_protocol(protocol)
    frames = usable_frames(table)
    if frames.empty:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in BINNED_COLUMNS})
    run_id = frames["run_id"].to_numpy()
    if bin_size == "session" and protocol.session_value == "run_means":
        return _session_of_run_means(bin_validated(table, "run", protocol))
    if bin_size == "session":
        # one group per session: the first run id of the session stands for it
        group = frames.groupby(SESSION_KEYS, sort=True)["run_id"].transform("min").to_numpy()
        bins = np.zeros(len(frames), dtype=np.int64)
    else:
        group = run_id
        bins = np.zeros(len(frames), dtype=np.int64)
        if BIN_SIZES[bin_size] is not None:
            bins = _time_bin_index(table, run_id, bin_size, protocol)
    values = frames[["rating", "prediction", "time_s"]]
    grouped = values.groupby([group, bins], sort=True)
    binned = grouped.mean()
    binned["n_frames"] = grouped.size().astype(np.int64)
    group_of_bin = binned.index.get_level_values(0).to_numpy()
    keys = frames.groupby("run_id", sort=True)[RUN_KEYS].first().loc[group_of_bin]
    binned = binned.reset_index(drop=True)
    for col in RUN_KEYS:
        binned[col] = keys[col].to_numpy()
    binned["bin"] = grouped.size().index.get_level_values(1).to_numpy().astype(np.int64)
    if bin_size == "session":
        binned["run"] = "all"
    return binned[BINNED_COLUMNS]


def _session_of_run_means(runs: pd.DataFrame) -> pd.DataFrame:
    """Session bins as the mean of the session's run bins (rating, prediction, time_s)."""
    grouped = runs.groupby(SESSION_KEYS, sort=True)
    out = grouped[["rating", "prediction", "time_s"]].mean()
    out["n_frames"] = grouped["n_frames"].sum().astype(np.int64)
    out = out.reset_index()
    out["run"] = "all"
    out["bin"] = np.int64(0)
    return out[BINNED_COLUMNS]


def _time_bin_index(
    table: pd.DataFrame, run_id: np.ndarray, bin_size: str, protocol: EvalProtocol
) -> np.ndarray:
    """Bin index of each usable frame; ``run_id`` (n_usable,) is sorted."""
    starts = np.flatnonzero(np.r_[True, run_id[1:] != run_id[:-1]])
    counts = np.diff(np.r_[starts, run_id.size])
    position = np.arange(run_id.size) - np.repeat(starts, counts)
    n_items = np.repeat(counts, counts)
    fixed = (protocol.bins_per_run or {}).get(bin_size)
    if fixed is not None:
        n_bins = np.full(run_id.size, int(fixed), dtype=np.int64)
    else:
        n_bins = n_time_bins(run_durations(table), BIN_SIZES[bin_size])[run_id]
    if protocol.bin_rule == "equal_count":
        return equal_count_bin_index(position, n_items, n_bins)
    out = np.empty(run_id.size, dtype=np.int64)
    run_bins = n_bins[starts]
    for n, nb in {(int(n), int(b)) for n, b in zip(counts, run_bins, strict=True)}:
        pattern = discretize_positions(n, nb)
        for start in starts[(counts == n) & (run_bins == nb)]:
            out[start : start + n] = pattern
    return out
